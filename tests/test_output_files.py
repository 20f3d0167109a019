"""Output files (--json, --dump-logits, --plot) never follow a link planted at their path (issue 14): in a directory
others can write, a symlink there would otherwise make a run overwrite a file of the runner's user."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import run_here
from tsqp.commands.files import OutputError, write_json, write_npy, write_output

LOCAL = ("--local", "--model", "random:tiny", "--device", "cpu", "--tokens", "4", "--no-warmup")


@pytest.fixture
def victim(tmp_path):
    """A file of this user that an attacker would like overwritten, and a link to it where a run will write."""
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    return target


@pytest.mark.parametrize("flag, name", [("--json", "out.json"), ("--dump-logits", "out.npy")])
def test_run_refuses_a_symlink_at_its_output_path(tmp_path, victim, capsys, flag, name):
    link = tmp_path / name
    link.symlink_to(victim)
    assert run_here(*LOCAL, flag, str(link)) == 2
    err = capsys.readouterr().err
    assert f"{link} is a symbolic link; refusing to write through it" in err and "Traceback" not in err, err
    assert victim.read_text() == "keep me" and link.is_symlink()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []      # no temporary left behind


def test_run_writes_and_replaces_regular_files(tmp_path, capsys):
    out, logits = tmp_path / "r.json", tmp_path / "l"          # numpy's naming: '.npy' appended
    out.write_text("old")
    assert run_here(*LOCAL, "--json", str(out), "--dump-logits", str(logits)) == 0
    result = json.loads(out.read_text())
    saved = np.load(tmp_path / "l.npy")
    assert saved.shape == (512,) and saved.dtype == np.float32 and int(saved.argmax()) == result["argmax"]
    assert out.stat().st_mode & 0o777 == 0o644 & ~current_umask()


def current_umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_a_link_swapped_in_after_the_check_is_replaced_not_followed(tmp_path, victim, monkeypatch):
    """The race the check alone would lose: the link appears between the check and the write. The data goes to
    a fresh temporary and a rename replaces the link itself; the link's target is untouched."""
    path = tmp_path / "race.json"
    real_open = os.open

    def plant_then_open(p, flags, mode=0o777):
        if str(p).endswith(".tmp") and not path.is_symlink():
            path.symlink_to(victim)                  # the attacker wins the race to the path
        return real_open(p, flags, mode)
    monkeypatch.setattr(os, "open", plant_then_open)
    write_json(path, {"a": 1})
    assert victim.read_text() == "keep me"
    assert not path.is_symlink() and json.loads(path.read_text()) == {"a": 1}


def test_a_directory_or_device_at_the_path_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="exists and is not a regular file"):
        write_output(tmp_path / "d", b"x")
    with pytest.raises(OutputError, match="not a regular file"):
        write_output("/dev/null", b"x")


def test_npy_helper_round_trips(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert write_npy(tmp_path / "a.npy", a) == tmp_path / "a.npy"
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)


def test_bench_and_diagnose_write_through_the_same_helper():
    """One helper for every output file: no command writes a path by itself."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent / "tsqp" / "commands"
    for name in ("run.py", "bench.py", "diagnose.py"):
        text = (root / name).read_text()
        assert "write_text(" not in text and "np.save(" not in text and "savefig(" not in text, name
        assert "from .files import" in text, name
