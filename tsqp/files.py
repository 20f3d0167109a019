"""Owner-only directories: where the arena files, the ipc sockets and the key files live.

One helper for the three places that need one (wire/shm.py, wire/transport.py, wire/keys.py), so the
checks cannot drift apart: what is created is 0700 whatever the umask, and a directory that must be
ours is checked without following a link.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def create_private(d: Path, parents: bool = True) -> None:
    """Create d and (parents) its missing parents, each 0700 whatever the umask; an existing d is left as
    it is. Without parents, a missing parent raises FileNotFoundError."""
    missing = []
    p = d
    while not p.exists() and (parents or not missing):
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir(mode=0o700, exist_ok=True)       # exist_ok: another process may create it meanwhile
        os.chmod(p, 0o700)


def private_dir(d: Path, error: type[Exception] = PermissionError, repair: bool = False,
                parents: bool = True) -> Path:
    """Create d (and missing parents) 0700. d must then be a directory, not a link, owned by this user;
    when its mode is not 0700 it is reset (repair) or, if others may write to it, refused with `error`."""
    create_private(d, parents)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise error(f"{d} is not a directory owned by uid {os.getuid()}")
    mode = stat.S_IMODE(st.st_mode)
    if repair and mode != 0o700:
        os.chmod(d, 0o700)
    elif not repair and mode & 0o022:
        raise error(f"{d} is writable by other users (mode {oct(mode)}); chmod 700 it")
    return d
