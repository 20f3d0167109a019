"""Output files (--json, --dump-logits, --plot), written so that a link planted at the path is never followed.

In a directory other users can write (/tmp), one of them could place a symlink at the path a run will write,
and have the run overwrite a file of the runner's user. So the data goes to a fresh temporary file beside the
target (created exclusively, O_NOFOLLOW), which is then renamed over the target: a rename replaces a link, it
never writes through one. An existing link at the path is refused outright, naming it.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import stat
from pathlib import Path


class OutputError(ValueError):
    """An output path the runner will not write; the message names it."""


def write_output(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, never through a symlink; returns the path."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{path} is a symbolic link; refusing to write through it (remove it or choose "
                          f"another path)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path} exists and is not a regular file")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, obj) -> Path:
    return write_output(path, json.dumps(obj, indent=1).encode())


def write_npy(path: str | Path, array) -> Path:
    """As numpy.save names it: '.npy' is appended to a path without it."""
    import numpy as np

    path = Path(path)
    if path.suffix != ".npy":
        path = path.with_name(path.name + ".npy")
    buf = io.BytesIO()
    np.save(buf, array)
    return write_output(path, buf.getvalue())


def write_figure(path: str | Path, fig, **kwargs) -> Path:
    """A matplotlib figure, in the format its name says."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    return write_output(path, buf.getvalue())
