"""The shared-memory data path against real processes and the real /dev/shm: same logits as raw frames
and as --local, tensor bytes counted as shm bytes, owner-only arenas, and no leftovers after a run or
after either side is killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import serving, short_endpoint, start_run, wait_line
from tsqp import cli
from tsqp.commands import run as runner
from tsqp.wire import protocol as P
from tsqp import weights as W
from tsqp.untrusted.compute import Compute
from tsqp.commands.diagnose import inspect_endpoint
from tsqp.wire.pipes import make_pipes
from tsqp.untrusted.server import Server
from tsqp.wire.shm import MEMFD_PREFIX, SEALS, Arena, ArenaError, arena_dir

def arenas_of(pid: int) -> list[str]:
    """Arena files a process created (named <pid>-<hex>); other test sessions' files are left out."""
    return sorted(f.name for f in arena_dir().glob(f"{pid}-*"))


def server_maps(server_pid: int, runner_pid: int) -> list[str]:
    """The server's mappings of that runner's arenas (memfds named after the runner's pid)."""
    needle = f"/memfd:{MEMFD_PREFIX}{runner_pid}-"
    return [ln for ln in Path(f"/proc/{server_pid}/maps").read_text().splitlines() if needle in ln]


def run_here(*argv: str) -> dict:
    """`tsqp run ...` in this process (the server is a real process); returns its JSON result."""
    args = cli.parser().parse_args(["run", *argv])
    cli.resolve(args)
    return runner.run(args)


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


def reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)


LONG = ("--tokens", "2048")     # random:tiny: a run that lasts a while after it connected


@pytest.fixture(scope="module")
def tiny():
    with serving("random:tiny") as (endpoint, proc):
        yield endpoint, proc


# ---- the data path ---------------------------------------------------------------------------------

def test_shm_same_logits_as_frames_and_local_and_counts_shm_bytes(tiny, tmp_path):
    endpoint, _ = tiny
    common = ("--tokens", "64")
    res, logits = {}, {}
    for mode, extra in {"local": ("--local", "--model", "random:tiny", "--device", "cpu", "--dtype", "float32"),
                        "frames": ("--endpoint", endpoint, "--transport", "frames"),
                        "shm": ("--endpoint", endpoint, "--transport", "shm")}.items():
        res[mode] = run_here(*common, *extra, "--dump-logits", str(tmp_path / f"{mode}.npy"))
        logits[mode] = np.load(tmp_path / f"{mode}.npy")
    assert res["shm"]["settings"]["transport"] == "shm"
    for mode in ("frames", "shm"):
        assert logits[mode].shape == logits["local"].shape == (512,)
        assert np.abs(logits[mode] - logits["local"]).max() <= 1e-5, mode
    assert np.abs(logits["shm"] - logits["frames"]).max() <= 1e-5

    s, f = res["shm"]["stats"], res["frames"]["stats"]
    assert s["rpc_calls"] == f["rpc_calls"] > 0
    assert s["shm_sent_bytes"] > 0 and s["shm_received_bytes"] > 0
    assert f["shm_sent_bytes"] == f["shm_received_bytes"] == 0
    # the socket carries only control messages: a small fraction of the tensor bytes
    assert s["sent_bytes"] + s["received_bytes"] < 0.01 * (s["shm_sent_bytes"] + s["shm_received_bytes"])
    # the frames run's socket bytes are its tensors plus headers like the shm run's (those add offsets:
    # at most ~30 bytes per tensor), so what shm moved equals the frames run's tensor bytes
    slack = 100 * f["rpc_calls"]
    assert abs((f["sent_bytes"] - s["shm_sent_bytes"]) - s["sent_bytes"]) <= slack
    assert abs((f["received_bytes"] - s["shm_received_bytes"]) - s["received_bytes"]) <= slack
    assert f["sent_bytes"] - s["shm_sent_bytes"] > 0 and f["received_bytes"] - s["shm_received_bytes"] > 0
    assert arenas_of(os.getpid()) == []          # the run left nothing in /dev/shm


def test_arena_is_a_sealed_memfd_and_its_directory_owner_only():
    """Behaviour changed on purpose (issue 14): the arena is a memfd sealed against shrinking and growing, not
    a file in /dev/shm, so no one, its creator included, can truncate it under a mapping (SIGBUS)."""
    import fcntl
    arena = Arena.create(1 << 20)
    try:
        assert not (arena_dir() / arena.name).exists()             # nothing in /dev/shm
        link = os.readlink(f"/proc/self/fd/{arena.fd}")
        assert link == f"/memfd:{MEMFD_PREFIX}{arena.name} (deleted)"
        assert fcntl.fcntl(arena.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        assert os.fstat(arena.fd).st_size == arena.size == 1 << 20
        with pytest.raises(PermissionError):
            os.ftruncate(arena.fd, 0)
        dst = arena_dir().lstat()
        assert stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == os.getuid()
        assert arena.name.startswith(f"{os.getpid()}-")
    finally:
        arena.close()


def test_control_message_outside_the_arena_gets_an_error_naming_it():
    cfg, weights = W.load("random:tiny", torch.float32, "cpu")
    norms = W.norm_weights(weights)
    server = Server(Compute(cfg, weights, "cpu"), norms, "ipc:///nonexistent/never-bound.ipc", "random:tiny")
    peer = b"runner"
    arena = Arena.create(1 << 20)
    try:
        assert P.decode(server.handle(peer, [P.encode({"type": "hello"})])[0])["type"] == "welcome"
        head = P.decode(server.handle(peer, [P.encode({"type": "attach",
                                                       "arena": {"name": arena.name, "size": arena.size}})])[0])
        assert head["type"] == "attached"

        def call(x_offset, out_offset):
            x = P.TensorMeta("float32", (4, cfg.hidden_size), x_offset)
            out = P.TensorMeta("float32", (4, cfg.qkv_size), out_offset)
            return P.decode(server.handle(peer, [P.encode_call("qkv", 0, 7, [x], out)])[0])

        ok = call(0, 4096)
        assert ok["type"] == "result", ok
        again = call(0, 4096)                                           # served from the checked views
        assert again["type"] == "result" and again["output"] == ok["output"], again
        for x_offset, out_offset in [(arena.size - 256, 4096),          # input runs past the end
                                     (0, arena.size)]:                  # output starts past it
            err = call(x_offset, out_offset)
            assert err["type"] == "error" and err["id"] == 7, err
            assert "op qkv" in err["error"] and "outside" in err["error"] and str(arena.size) in err["error"], err
        err = P.decode(server.handle(peer, [P.encode({"type": "echo", "shm": True, "nbytes": 4096,
                                                      "src": 0, "dst": arena.size - 1024})])[0])
        assert err["type"] == "error" and "outside" in err["error"], err
        for echo, why in [({"nbytes": 8192, "src": 0, "dst": 4096}, "overlap"),
                          ({"nbytes": 6, "src": 0, "dst": 4096}, "nbytes")]:
            err = P.decode(server.handle(peer, [P.encode({"type": "echo", "shm": True, **echo})])[0])
            assert err["type"] == "error" and why in err["error"], err
        # the session still works after the bad messages
        assert call(0, 4096)["type"] == "result"
    finally:
        server.drop(peer)
        arena.close()


def test_diagnose_reports_the_live_server(tiny):
    endpoint, server = tiny
    rep = inspect_endpoint(endpoint)
    assert rep["status"] == "live" and rep["problems"] == [], rep
    s = rep["server"]
    assert (s["model"], s["dtype"], s["device"], s["pid"]) == ("random:tiny", "float32", "cpu", server.pid)
    assert rep["mode"] == "0o600" and rep["owner_uid"] == os.getuid() and rep["is_socket"]


# ---- lifecycle: no leftovers -----------------------------------------------------------------------

def test_runner_killed_before_attach_leaves_pipes_the_next_run_removes(tiny):
    """Its arena was a memfd and died with it; only its control pipes' names remain, until the next runner."""
    endpoint, _ = tiny
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                   # a runner that dies after creating its arena, before the server attaches
        try:
            os.close(r)
            arena = Arena.create(1 << 20)
            make_pipes(arena.path)     # and its doorbell's pipes
            os.write(w, arena.name.encode())
            time.sleep(60)
        finally:
            os._exit(0)
    try:
        os.close(w)
        name = os.read(r, 200).decode()
        assert arenas_of(pid) == [name + ".rep", name + ".req"]
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert arenas_of(pid) == [name + ".rep", name + ".req"]   # nobody opened them: the names stay ...
    run_here("--endpoint", endpoint, "--tokens", "8", "--no-warmup")
    assert arenas_of(pid) == []                          # ... until the next runner creates its arena
    assert arenas_of(os.getpid()) == []


def test_runner_sigkilled_mid_run_leaves_nothing_and_the_server_serves_on(tiny):
    endpoint, server = tiny
    proc = start_run("--endpoint", endpoint, *LONG, "--transport", "shm")
    try:
        wait_line(proc, "Connected to")
        assert arenas_of(proc.pid) == []                 # attached: the server unlinked the pipes at once
        assert server_maps(server.pid, proc.pid)         # only the two mappings hold the memory
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        reap(proc)
    assert arenas_of(proc.pid) == []
    wait_for(lambda: not server_maps(server.pid, proc.pid), 10, "the server unmaps the dead runner's arena")
    out = run_here("--endpoint", endpoint, "--tokens", "16", "--no-warmup")
    assert out["stats"]["shm_sent_bytes"] > 0
    assert arenas_of(os.getpid()) == []


def test_server_sigkilled_mid_run_leaves_nothing_and_a_new_server_takes_the_endpoint(tmp_path):
    endpoint = short_endpoint()
    sock = Path(endpoint.removeprefix("ipc://"))
    # the runner starts first (it waits for the hello), so the two start-ups overlap
    proc = start_run("--endpoint", endpoint, *LONG, "--timeout", "2", "--connect-timeout", "60")
    with serving("random:tiny", endpoint=endpoint) as (_, server):
        try:
            wait_line(proc, "Connected to")
            server.send_signal(signal.SIGKILL)
            server.wait(10)
            _, err = proc.communicate(timeout=30)
        finally:
            reap(proc)
    assert proc.returncode == 2 and endpoint in err, err
    assert arenas_of(proc.pid) == []
    assert sock.exists()                                  # SIGKILL left a stale socket file ...
    with serving("random:tiny", endpoint=endpoint) as (_, again):   # ... which the new server removes
        out = run_here("--endpoint", endpoint, "--tokens", "16", "--no-warmup",
                       "--dump-logits", str(tmp_path / "r.npy"))
        assert out["stats"]["shm_received_bytes"] > 0
        assert server_maps(again.pid, os.getpid()) == []     # the finished run's arena is gone there too
    assert arenas_of(os.getpid()) == []
    assert not sock.exists()
    sock.parent.rmdir()


def test_arena_allocator_is_first_fit_and_hands_out_the_same_regions_again():
    arena = Arena.anonymous(1 << 16)
    a, b = arena.alloc(1000), arena.alloc(1000)            # rounded up to 1024 each (256-byte alignment)
    assert (a, b) == (0, 1024)
    arena.free(a)
    assert arena.alloc(500) == 0                            # the first hole that fits
    assert arena.alloc(600) == 2048                         # the 512-byte hole left at 512 does not
    with pytest.raises(ArenaError, match="raise --arena-mb"):
        arena.alloc(1 << 16)
    arena.live.clear()
    x = arena.empty((4, 8), torch.float32)
    arena.free(arena.offset_of(x))
    assert arena.empty((4, 8), torch.float32) is x          # same region, shape, dtype: the same view
    arena.close()
