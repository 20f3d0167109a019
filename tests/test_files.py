"""The one owner-only directory helper (tsqp/files.py) behind the arena directory, the ipc socket's parents
and the keys directory: modes checked with os.lstat on a real file system."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tsqp import files
from tsqp.wire import keys as K


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


class Refused(RuntimeError):
    pass


def test_created_directories_are_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        d = files.private_dir(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    assert d == tmp_path / "a" / "b" / "c"
    for p in (tmp_path / "a", tmp_path / "a" / "b", d):
        assert stat.S_ISDIR(os.lstat(p).st_mode) and mode(p) == 0o700, p


def test_a_directory_others_may_write_is_refused_or_repaired(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(Refused, match="writable by other users"):
        files.private_dir(d, Refused)
    assert mode(d) == 0o777                                      # refused, not changed
    with pytest.raises(K.SecurityError, match="writable by other users"):
        K.private_dir(d)                                         # the keys directory's rule
    os.chmod(d, 0o750)
    assert files.private_dir(d, Refused) == d and mode(d) == 0o750   # readable by the group: allowed
    files.private_dir(d, Refused, repair=True)
    assert mode(d) == 0o700                                      # the arena directory's rule: reset


def test_a_link_is_not_a_directory(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(Refused, match="not a directory owned by"):
        files.private_dir(link, Refused, repair=True)


def test_without_parents_a_missing_parent_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.private_dir(tmp_path / "missing" / "d", parents=False)
    assert not (tmp_path / "missing").exists()
    assert mode(files.private_dir(tmp_path / "d", parents=False)) == 0o700
