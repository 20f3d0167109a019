"""Faults between real processes: a server or a runner killed mid-request, two runners at once, the
session limit, and clean shutdown on SIGINT/SIGTERM (socket file and arenas gone)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import RUN_ENV, run_here, serving, short_endpoint, start_run, wait_line
from tsqp.wire import protocol as P
from tsqp.wire.client import RemoteOffload
from tsqp.wire.shm import MEMFD_PREFIX, arena_dir
from tsqp.wire.transport import Client

def tsqp(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsqp.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=RUN_ENV)


def info(endpoint: str) -> dict:
    c = Client(endpoint, timeout_s=5)
    try:
        c.send([P.encode({"type": "info"})])
        return P.decode(c.recv("info")[0])
    finally:
        c.close()


def wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def arena_maps(server_pid: int, runner_pid: int) -> list[str]:
    """The server's mappings of arenas that runner created (memfds named after the runner's pid)."""
    needle = f"/memfd:{MEMFD_PREFIX}{runner_pid}-"
    return [line for line in Path(f"/proc/{server_pid}/maps").read_text().splitlines() if needle in line]


def logits_close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), np.abs(a - b).max()


@pytest.fixture(scope="module")
def tiny():
    with serving("random:tiny") as (endpoint, proc):
        yield endpoint, proc


@pytest.fixture(scope="module")
def small():
    with serving("random:small", extra=("--max-sessions", "2")) as (endpoint, proc):
        yield endpoint, proc


def remote_vs_local(tmp_path: Path, endpoint: str, model: str, *args: str) -> None:
    """A run through the server gives the same logits as the in-process baseline."""
    assert run_here("--endpoint", endpoint, "--no-warmup", "--dump-logits", str(tmp_path / "r.npy"), *args) == 0
    logits_close(np.load(tmp_path / "r.npy"), local_logits(tmp_path, "l", model, *args))


def local_logits(tmp_path: Path, name: str, model: str, *args: str) -> np.ndarray:
    out = tmp_path / f"{name}.npy"
    assert run_here("--local", "--model", model, "--device", "cpu", "--no-warmup", "--dump-logits", str(out),
                    *args) == 0
    return np.load(out)


# ---- the server dies ---------------------------------------------------------------------------------

def test_server_killed_mid_request_is_reported_and_a_restart_is_picked_up(tmp_path):
    endpoint = short_endpoint()
    sock = Path(endpoint.removeprefix("ipc://"))
    try:
        with serving("random:small", endpoint=endpoint) as (_, server):
            runner = start_run("--endpoint", endpoint, "--tokens", "256", "--timeout", "3", "--connect-timeout", "10")
            try:
                wait_line(runner, "Connected to")
                runner.send_signal(signal.SIGSTOP)     # mid-run for sure while the server dies
                server.send_signal(signal.SIGKILL)
                server.wait(10)
                runner.send_signal(signal.SIGCONT)
                t0 = time.monotonic()
                _, err = runner.communicate(timeout=30)
                waited = time.monotonic() - t0
            finally:
                runner.kill()
                runner.wait(10)
        assert runner.returncode not in (0, None)
        assert waited < 3 + 6, waited                   # the --timeout, plus the bye's second and exit
        assert endpoint in err and "within 3 s" in err, err
        assert "op " in err, err                         # the step it waited for: "op qkv (layer 3)"
        assert not list(arena_dir().glob(f"{runner.pid}-*"))
        assert sock.exists()                             # SIGKILL left the socket file behind ...

        with serving("random:tiny", endpoint=endpoint):  # ... and a new server takes it over by itself
            remote_vs_local(tmp_path, endpoint, "random:tiny", "--tokens", "16")
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)


# ---- the runner dies ---------------------------------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time, torch
    from tsqp.wire.client import RemoteOffload
    r = RemoteOffload(sys.argv[1], "shm", timeout_s=30)
    p = r.submit("embed", None, torch.arange(8))
    p.result()
    r.submit("embed", None, torch.arange(4096) % r.cfg.vocab_size)   # in flight when it dies
    print("holding", flush=True)
    time.sleep(60)
""")


def test_runner_killed_server_frees_its_arena_and_serves_others(tiny, tmp_path):
    endpoint, server = tiny
    holder = subprocess.Popen([sys.executable, "-c", HOLD, endpoint], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=RUN_ENV)
    try:
        wait_line(holder, "holding")
        assert arena_maps(server.pid, holder.pid), "the server maps the runner's arena"
        before = info(endpoint)["sessions"]
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        wait_for(lambda: not arena_maps(server.pid, holder.pid), 10, "the server unmaps the dead runner's arena")
        assert info(endpoint)["sessions"] == before - 1
    finally:
        holder.kill()
        holder.wait(10)
    remote_vs_local(tmp_path, endpoint, "random:tiny", "--tokens", "24")


# ---- two runners, and the limit ----------------------------------------------------------------------

def test_two_runners_at_once_each_get_their_own_correct_result(small, tmp_path):
    endpoint, _ = small
    prompts = {"a": ("--tokens", "64"),
               "b": ("--prompt-ids", ",".join(str(i * 37 % 30000) for i in range(1, 49)))}
    wire = {"a": ("--chunks", "2"), "b": ("--transport", "frames")}
    procs = {}
    for k, a in prompts.items():
        procs[k] = start_run("--endpoint", endpoint, "--dump-logits", str(tmp_path / f"{k}.npy"), *a, *wire[k])
        wait_line(procs[k], "Connected to")
        if k == "a":
            procs[k].send_signal(signal.SIGSTOP)    # paused mid-run until the second runner is connected too
    try:
        assert info(endpoint)["sessions"] == 2
    finally:
        procs["a"].send_signal(signal.SIGCONT)
    for p in procs.values():
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    for k, a in prompts.items():
        logits_close(np.load(tmp_path / f"{k}.npy"), local_logits(tmp_path, f"local-{k}", "random:small", *a))


def test_session_limit_refuses_clearly(small, capsys):
    endpoint, _ = small      # --max-sessions 2
    held = [RemoteOffload(endpoint, "shm", timeout_s=10) for _ in range(2)]
    try:
        assert run_here("--endpoint", endpoint, "--tokens", "8") == 2
        err = capsys.readouterr().err
        assert "session limit (2 sessions, --max-sessions)" in err and endpoint in err, err
    finally:
        held.pop().close()
    try:
        assert run_here("--endpoint", endpoint, "--tokens", "8") == 0    # a slot again
    finally:
        held.pop().close()


# ---- signals -----------------------------------------------------------------------------------------

def test_sigint_and_sigterm_to_runners_close_their_sessions_and_arenas(small):
    endpoint, _ = small
    runners = {sig: start_run("--endpoint", endpoint, "--tokens", "256") for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for r in runners.values():
            wait_line(r, "Connected to")
        assert info(endpoint)["sessions"] == 2
        for sig, r in runners.items():
            r.send_signal(sig)
        for r in runners.values():
            _, err = r.communicate(timeout=20)
            assert r.returncode == 130 and "interrupted" in err, (r.returncode, err)
            assert "Traceback" not in err
            assert not list(arena_dir().glob(f"{r.pid}-*"))
    finally:
        for r in runners.values():
            r.kill()
            r.wait(10)
    wait_for(lambda: info(endpoint)["sessions"] == 0, 5, "the runners' byes closed their sessions")


def test_sigterm_to_server_shuts_down_cleanly():
    endpoint = short_endpoint()
    sock = Path(endpoint.removeprefix("ipc://"))
    try:
        with serving("random:tiny", endpoint=endpoint) as (_, server):
            session = RemoteOffload(endpoint, "shm", timeout_s=5)     # a live session with a mapped arena
            try:
                assert arena_maps(server.pid, os.getpid())
                assert sock.exists() and sock.stat().st_mode & 0o777 == 0o600
                server.send_signal(signal.SIGTERM)
                out = server.communicate(timeout=10)[0].decode(errors="replace")    # launch pipes bytes
            finally:
                session.close()
            assert server.returncode == 0, out
            assert "server stopped" in out and "Traceback" not in out, out
            assert not sock.exists()
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)
