"""Owner-only directories: where the control pipes, the ipc sockets, the key files and recordings live.

One helper for every place that needs one (wire/shm.py, wire/transport.py, wire/keys.py, untrusted/record.py),
so the checks cannot drift apart: what is created is 0700 through the umask (never a chmod by path, which a
swapped link could redirect), and a directory that must be ours is checked through a descriptor opened
without following a link.
"""
from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path


def owner_name(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def squatted(d: Path, uid: int, remedy: str) -> str:
    """The message for a directory of ours by name that another user made first (a denial of service: it is
    refused, so nothing of theirs is used)."""
    return (f"{d} belongs to {owner_name(uid)}, not to this user (uid {os.getuid()}): another user created it "
            f"first, and it cannot be used; {remedy}")


def create_private(d: Path, parents: bool = True) -> None:
    """Create d and (parents) its missing parents, each 0700 whatever the umask; an existing d is left as
    it is. Without parents, a missing parent raises FileNotFoundError."""
    old = os.umask(0o077)
    try:
        d.mkdir(mode=0o700, parents=parents, exist_ok=True)     # exist_ok: another process may create it meanwhile
    finally:
        os.umask(old)


def private_dir(d: Path, error: type[Exception] = PermissionError, repair: bool = False,
                parents: bool = True, remedy: str | None = None) -> Path:
    """Create d (and missing parents) 0700. d must then be a directory, not a link, owned by this user;
    when its mode is not 0700 it is reset through its descriptor (repair) or, if others may write to it,
    refused with `error`. remedy: how to choose another, said when another user owns d."""
    create_private(d, parents)
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:                    # a link (ELOOP) or not a directory
        raise error(f"{d} is not a directory owned by uid {os.getuid()} ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise error(squatted(d, st.st_uid, remedy) if remedy else
                        f"{d} is not a directory owned by uid {os.getuid()} (it belongs to uid {st.st_uid})")
        mode = stat.S_IMODE(st.st_mode)
        if repair and mode != 0o700:
            os.fchmod(fd, 0o700)
        elif not repair and mode & 0o022:
            raise error(f"{d} is writable by other users (mode {oct(mode)}); chmod 700 it")
    finally:
        os.close(fd)
    return d
