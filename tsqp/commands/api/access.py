"""Who on this host can reach `tsqp api`, and with which key (issue 29, item 5).

  tcp on 127.0.0.1   every local user (loopback has no owner): give it a key
  --unix PATH        the socket is 0600 in a 0700 directory of this user: this user (and root) only

The key never needs the command line, which every local user reads in /proc/PID/cmdline: `--api-key-file`
(a file only its owner can read) or the environment variable TSQP_API_KEY (/proc/PID/environ is the owner's
alone). `--api-key` still works, with a warning.
"""
from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from ... import files
from ...wire.transport import TransportError, check_private_dir

ENV_KEY = "TSQP_API_KEY"


def api_key_of(args, environ=os.environ) -> tuple[str | None, list[str]]:
    """(the key, warnings): from --api-key-file, --api-key or TSQP_API_KEY, at most one of them."""
    given = [name for name, v in (("--api-key-file", args.api_key_file), ("--api-key", args.api_key)) if v]
    if len(given) > 1:
        raise ValueError("give one of --api-key-file and --api-key")
    if args.api_key_file:
        return read_key_file(Path(args.api_key_file)), []
    if args.api_key:
        return checked_key(args.api_key, "--api-key"), [
            f"WARNING: --api-key on the command line is readable by every local user in /proc/{os.getpid()}/cmdline"
            f"; use --api-key-file PATH (mode 0600) or the environment variable {ENV_KEY}"]
    key = environ.get(ENV_KEY)
    return (checked_key(key, ENV_KEY) if key else None), []


def read_key_file(path: Path) -> str:
    """The key in `path`, which must be a regular file of this user that no one else can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ValueError(f"--api-key-file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError(f"--api-key-file {path}: not a regular file of this user (uid {os.getuid()})")
        if st.st_mode & 0o077:
            raise ValueError(f"--api-key-file {path} is readable or writable by other users (mode "
                             f"{oct(stat.S_IMODE(st.st_mode))}): chmod 600 {path}")
        data = os.read(fd, 4097)
    finally:
        os.close(fd)
    if len(data) > 4096:
        raise ValueError(f"--api-key-file {path}: more than 4096 bytes; a key is one line")
    return checked_key(data.decode("utf-8", errors="replace").strip(), f"--api-key-file {path}")


def checked_key(key: str, where: str) -> str:
    if not key or not key.isprintable() or " " in key:
        raise ValueError(f"{where}: the key must be one word of printable characters")
    return key


def bind_unix(path: str) -> socket.socket:
    """A listening unix socket at `path`, 0600 (made under umask 177, never a chmod by path) in a directory
    of this user's that no one else can write (created 0700 when missing). A stale socket of ours is replaced;
    one a server still listens on is refused."""
    p = Path(os.path.abspath(path))
    files.create_private(p.parent)
    try:
        check_private_dir(p.parent, f"--unix {p}")
    except TransportError as e:
        raise ValueError(str(e)) from None
    if p.exists() or p.is_symlink():
        st = p.lstat()
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError(f"--unix {p}: exists and is not a socket of this user; refusing to replace it")
        if in_use(p):
            raise ValueError(f"--unix {p}: a server already listens there")
        p.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(p))
    except OSError as e:
        sock.close()
        raise ValueError(f"--unix {p}: cannot listen there ({e.strerror})") from None
    finally:
        os.umask(old)
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def in_use(p: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(p))
        return True
    except OSError:
        return False
    finally:
        probe.close()
