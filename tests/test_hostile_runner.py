"""Hostile runners against a real server, and another local user against both sides (issue 14).

Each attack is made by hand with raw sockets, memfds and pipes against real `tsqp serve` processes, and ends
in a clear error within its deadline; a well-behaved runner in its own process (the bystander) is served
correctly all along, its every result checked against the same weights computed here. The second local
user is a real one (`useradd`; skipped, saying why, where this machine does not allow it); its processes
start as root, import what they need, then drop to that uid for good.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from conftest import RUN_ENV, free_tcp_endpoint, run_cli, run_here, serving, short_endpoint, start_run, wait_line
from tsqp import weights as W
from tsqp.untrusted.compute import Compute
from tsqp.untrusted.handlers import Handlers
from tsqp.wire import protocol as P
from tsqp.wire.client import RemoteOffload
from tsqp.wire.keys import SecurityError, check_bound
from tsqp.wire.pipes import LENGTH, Channel, make_pipes, open_pipe
from tsqp.wire.shm import MEMFD_PREFIX, Arena, arena_dir
from tsqp.wire.transport import Client, TransportError

MAX_REQUEST_MB, MAX_QUEUED_MB = 64, 16
REPLY_MS = 10_000


@pytest.fixture(scope="module")
def server():
    with serving("random:tiny", extra=("--max-request-mb", str(MAX_REQUEST_MB), "--max-queued-mb",
                                       str(MAX_QUEUED_MB), "--max-sessions", "32")) as (endpoint, proc):
        yield endpoint, proc


@pytest.fixture(scope="module")
def tiny():
    """The server's weights rebuilt here (the preset is deterministic): the oracle."""
    cfg, weights = W.load("random:tiny", torch.float32)
    return cfg, Compute(cfg, weights, "cpu")


# ---- a well-behaved runner, in its own process --------------------------------------------------------

BYSTANDER = textwrap.dedent("""
    import json, select, sys, time, torch
    from tsqp import weights as W
    from tsqp.untrusted.compute import Compute
    from tsqp.wire.client import RemoteOffload
    cfg, weights = W.load("random:tiny", torch.float32)
    oracle = Compute(cfg, weights, "cpu")
    x = torch.randn(8, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(16) * 7 % cfg.vocab_size
    want = {"qkv": oracle.run("qkv", 1, [x])[0], "embed": oracle.run("embed", None, [ids])[0]}
    r = RemoteOffload(sys.argv[1], "shm", timeout_s=30)
    print("ready", flush=True)
    calls, errors, slowest = 0, [], 0.0
    while not select.select([sys.stdin], [], [], 0.02)[0]:
        for op, layer, arg in (("qkv", 1, x), ("embed", None, ids)):
            t0 = time.monotonic()
            try:
                p = r.submit(op, layer, arg)
                y = p.result()
                slowest = max(slowest, time.monotonic() - t0)
                if not torch.allclose(y, want[op], rtol=1e-5, atol=1e-6):
                    errors.append(f"{op}: wrong result")
                p.release()
            except Exception as e:
                errors.append(f"{op}: {type(e).__name__}: {e}")
                break
            calls += 1
    r.close()
    print(json.dumps({"calls": calls, "errors": errors[:5], "slowest_s": slowest}), flush=True)
""")


@contextmanager
def bystander(endpoint: str):
    """A runner calling qkv and embed in a loop, each result checked; yields a dict filled at exit with
    {calls, errors, slowest_s}."""
    proc = subprocess.Popen([sys.executable, "-c", BYSTANDER, endpoint], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=RUN_ENV)
    summary: dict = {}
    try:
        wait_line(proc, "ready")
        yield summary
        out, err = proc.communicate(input="stop\n", timeout=60)
        assert proc.returncode == 0, err
        summary.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def served_well(summary: dict, slowest_s: float = 2.0) -> None:
    assert summary["calls"] > 0 and summary["errors"] == [], summary
    assert summary["slowest_s"] < slowest_s, summary


# ---- raw hostile clients ------------------------------------------------------------------------------

class Raw:
    """A bare DEALER socket speaking the protocol by hand."""

    def __init__(self, endpoint: str, source: str | None = None, rcvhwm: int | None = None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if rcvhwm is not None:           # a runner that does not read: tiny buffers on its side
            self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
            self.sock.setsockopt(zmq.RCVBUF, 4096)
        where = endpoint if source is None else endpoint.replace("tcp://", f"tcp://{source}:0;")
        self.sock.connect(where)

    def ask(self, *frames, timeout_ms: int = REPLY_MS) -> tuple[dict, list]:
        self.sock.send_multipart(list(frames), copy=False)
        if not self.sock.poll(timeout_ms):
            raise AssertionError("the server did not answer")
        reply = self.sock.recv_multipart()
        return P.decode(reply[0]), reply[1:]

    def control(self, header: dict, *frames) -> dict:
        return self.ask(P.encode(header), *frames)[0]

    def close(self) -> None:
        self.sock.close(linger=0)


def info(endpoint: str) -> dict:
    raw = Raw(endpoint)
    try:
        return raw.control({"type": "info"})
    finally:
        raw.close()


def error_of(head: dict, *words: str) -> str:
    assert head["type"] == "error", head
    for w in words:
        assert w in head["error"], f"{w!r} not in {head['error']!r}"
    return head["error"]


def wait_for(cond, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def maps_of(server_pid: int, needle: str) -> list[str]:
    return [ln for ln in Path(f"/proc/{server_pid}/maps").read_text().splitlines() if needle in ln]


def read_log(proc: subprocess.Popen, pattern: str, timeout_s: float = 10.0) -> str:
    """The server's output (stdout and stderr), read on from where the last call stopped, up to a match of
    the regular expression `pattern`."""
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    os.set_blocking(fd, False)
    try:
        while not re.search(pattern, seen.decode(errors="replace")):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the server's output within {timeout_s} s: {seen[-2000:]!r}")
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            if not chunk:
                raise AssertionError(f"the server exited: {seen[-2000:]!r}")
            seen += chunk
    finally:
        os.set_blocking(fd, True)
    return seen.decode(errors="replace")


def attach(raw: Raw, arena: Arena, pipes: bool = False) -> dict:
    assert raw.control({"type": "hello"})["type"] == "welcome"
    return raw.control({"type": "attach", "arena": {"name": arena.name, "size": arena.size}, "pipes": pipes})


def embed_call(D: int, rid: int, ids_at: int = 0, out_at: int = 4096, n: int = 1) -> bytes:
    return P.encode_call("embed", None, rid, [P.TensorMeta("int64", (n,), ids_at)],
                         P.TensorMeta("float32", (n, D), out_at))


# ==== a malicious runner against the server =============================================================

def test_an_arena_its_runner_could_truncate_is_refused_and_a_sealed_one_cannot_be(server, tiny):
    """The SIGBUS attack: truncating the arena after attach. A sealed memfd cannot be truncated, by anyone;
    an unsealed one, or a file in /dev/shm named like an arena, is refused at attach, so nothing the server
    maps can shrink under it."""
    endpoint, proc = server
    cfg, oracle = tiny
    D = cfg.hidden_size
    with bystander(endpoint) as summary:
        # 1. the real thing: sealed, attached, then truncated: the kernel refuses; the session still works
        raw, arena = Raw(endpoint), Arena.create(1 << 20)
        try:
            assert attach(raw, arena)["type"] == "attached"
            with pytest.raises(PermissionError):
                os.ftruncate(arena.fd, 0)
            arena.view(P.TensorMeta("int64", (1,), 0)).fill_(5)
            head, _ = raw.ask(embed_call(D, 1))
            assert head["type"] == "result", head
            torch.testing.assert_close(arena.view(P.TensorMeta("float32", (1, D), 4096)),
                                       oracle.run("embed", None, [torch.tensor([5])])[0])
        finally:
            raw.close()
            arena.close()
        # 2. an unsealed memfd named like an arena: refused, then truncated to 0 (the server never mapped it)
        raw = Raw(endpoint)
        name = f"{os.getpid()}-{os.urandom(8).hex()}"
        fd = os.memfd_create(MEMFD_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, 1 << 20)
            assert raw.control({"type": "hello"})["type"] == "welcome"
            head = raw.control({"type": "attach", "arena": {"name": name, "size": 1 << 20}})
            error_of(head, "not sealed against shrinking")
            os.ftruncate(fd, 0)
            assert not maps_of(proc.pid, name)
        finally:
            os.close(fd)
            raw.close()
        # 3. an old-style arena file in /dev/shm (a runner could truncate it at will): not an arena any more
        raw = Raw(endpoint)
        name = f"{os.getpid()}-{os.urandom(8).hex()}"
        planted = arena_dir() / name
        planted.write_bytes(bytes(1 << 16))
        try:
            assert raw.control({"type": "hello"})["type"] == "welcome"
            error_of(raw.control({"type": "attach", "arena": {"name": name, "size": 1 << 16}}), "holds no memfd")
            planted.unlink()
        finally:
            planted.unlink(missing_ok=True)
            raw.close()
        # 4. the scenario in a process of its own: attach, truncate, keep calling, exit
        attacker = subprocess.run([sys.executable, "-c", TRUNCATER, endpoint], capture_output=True, text=True,
                                  timeout=60, env=RUN_ENV)
        assert attacker.returncode == 0, attacker.stderr
        assert "truncate refused: Operation not permitted" in attacker.stdout, attacker.stdout
        assert "served after the attempt" in attacker.stdout, attacker.stdout
    assert proc.poll() is None
    served_well(summary)


TRUNCATER = textwrap.dedent("""
    import os, sys, torch
    from tsqp.wire.client import RemoteOffload
    r = RemoteOffload(sys.argv[1], "shm", timeout_s=10)
    try:
        os.ftruncate(r.arena.fd, 0)
        print("truncated")
    except OSError as e:
        print("truncate refused:", e.strerror)
    y = r.submit("embed", None, torch.arange(4)).result()
    print("served after the attempt", tuple(y.shape))
    r.close()
""")


def test_requests_too_large_are_refused_before_anything_is_allocated(server, tiny):
    """A qk call whose output grows with T*S, an embed of millions of ids: refused naming --max-request-mb,
    the server's memory unmoved."""
    endpoint, proc = server
    cfg, _ = tiny
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    T = S = 4096                        # scores [H, T, S] float32: 256 MiB, inputs 4 MiB
    ids = 4 * 2**20                     # 4 Mi ids: 32 MiB of int64 in, 2 GiB of float32 rows out
    with bystander(endpoint) as summary:
        raw = Raw(endpoint)
        try:
            assert raw.control({"type": "hello"})["type"] == "welcome"
            before = rss_mb(proc.pid)
            q, k = P.TensorMeta("float32", (H, T, hd)), P.TensorMeta("float32", (KV, S, hd))
            t0 = time.monotonic()
            head, _ = raw.ask(P.encode_call("qk", 0, 1, [q, k], P.TensorMeta("float32", (H, T, S))),
                              bytes(q.nbytes), bytes(k.nbytes))
            error_of(head, "op qk", "--max-request-mb", f"{MAX_REQUEST_MB} MiB")
            x = P.TensorMeta("int64", (ids,))
            head, _ = raw.ask(P.encode_call("embed", None, 2, [x], P.TensorMeta("float32", (ids, cfg.hidden_size))),
                              bytes(x.nbytes))
            error_of(head, "op embed", "--max-request-mb")
            assert time.monotonic() - t0 < 10
            assert rss_mb(proc.pid) - before < 200, "the refused outputs were not allocated"
            # within the limit, the same ops are served
            head, frames = raw.ask(P.encode_call("qk", 0, 3, [P.TensorMeta("float32", (H, 4, hd)),
                                                              P.TensorMeta("float32", (KV, 6, hd))],
                                                 P.TensorMeta("float32", (H, 4, 6))),
                                   bytes(H * 4 * hd * 4), bytes(KV * 6 * hd * 4))
            assert head["type"] == "result" and len(frames[0]) == H * 4 * 6 * 4, head
        finally:
            raw.close()
    assert proc.poll() is None
    served_well(summary)


def test_a_runner_that_never_reads_its_replies_loses_its_session_not_the_server_its_memory(server, tiny):
    endpoint, proc = server
    cfg, _ = tiny
    T = 2048                    # lm_head over frames: 1 MiB in, 4 MiB out per call; 100 calls would be 400 MiB
    with bystander(endpoint) as summary:
        sessions = info(endpoint)["sessions"]
        before = rss_mb(proc.pid)
        raw = Raw(endpoint, rcvhwm=1)
        try:
            raw.sock.send_multipart([P.encode({"type": "hello"})])
            x = P.TensorMeta("float32", (T, cfg.hidden_size))
            call = P.encode_call("lm_head", None, 0, [x], P.TensorMeta("float32", (T, cfg.vocab_size)))
            payload = bytes(x.nbytes)
            for i in range(100):
                raw.sock.send_multipart([P.with_id(call, i + 1), payload], copy=False)
            read_log(proc, r"dropped a session of uid \d+: .*(of its replies are unread|its replies pile up)", 60)
            wait_for(lambda: info(endpoint)["sessions"] == sessions, 10, "the reader-less session is gone")
            assert rss_mb(proc.pid) - before < MAX_QUEUED_MB + 150, "unread replies bounded by --max-queued-mb"
        finally:
            raw.close()
    assert proc.poll() is None
    served_well(summary)


def test_a_flooded_pipe_is_served_in_turn_with_the_others(server, tiny):
    """Runner A writes 500 gate_up calls into its control pipe at once; runner B then sends one. The server
    serves one call per pipe per turn, so B's reply comes after a few of A's, not after all 500 (it used to
    read A's whole pipe and serve it in one go)."""
    endpoint, _ = server
    cfg, _ = tiny
    T, D, I = 64, cfg.hidden_size, cfg.intermediate_size
    call = P.encode_call("gate_up", 0, 1, [P.TensorMeta("float32", (T, D), 0)],
                         P.TensorMeta("float32", (T, 2 * I), 1 << 16))
    runners = []
    try:
        for _ in range(2):
            raw, arena = Raw(endpoint), Arena.create(1 << 20)
            req, rep = make_pipes(arena.path)
            pipes = Channel(open_pipe(rep), open_pipe(req))
            runners.append((raw, arena, pipes))
            assert attach(raw, arena, pipes=True)["type"] == "attached"
        (_, _, a), (_, _, b) = runners
        flood = b"".join(LENGTH.pack(len(call)) + P.with_id(call, i + 1) for i in range(500))
        assert os.write(a.out_fd, flood) == len(flood)             # 46 KB: one write, in the pipe at once
        t0 = time.monotonic()
        b.send(P.with_id(call, 1), 2.0)
        got = []
        while not got and time.monotonic() - t0 < 10:
            b.wait(1.0)
            got = b.receive()
        assert got and P.unpack(got[0]).id == 1, got
        a_replies = []
        while a.wait(0.0):
            a_replies += a.receive()
        assert len(a_replies) < 100, f"{len(a_replies)} of A's 500 calls were served before B's one"
        deadline = time.monotonic() + 30
        while len(a_replies) < 500 and time.monotonic() < deadline:      # and A's calls all get served
            a.wait(1.0)
            a_replies += a.receive()
        assert sorted(P.unpack(r).id for r in a_replies) == list(range(1, 501))
    finally:
        for raw, arena, pipes in runners:
            pipes.close()
            raw.close()
            arena.close()


def test_a_full_reply_pipe_costs_its_own_session_and_stalls_no_one(server, tiny):
    """Calls through the control pipes, replies never read: once its reply pipe is full the session ends at
    once; the server never waits on it (it used to, a second per call, for everyone)."""
    endpoint, proc = server
    cfg, _ = tiny
    with bystander(endpoint) as summary:
        sessions = info(endpoint)["sessions"]
        raw, arena = Raw(endpoint), Arena.create(1 << 20)
        req, rep = make_pipes(arena.path)
        pipes = Channel(open_pipe(rep), open_pipe(req))      # reads replies (never), writes calls
        try:
            assert attach(raw, arena, pipes=True)["type"] == "attached"
            arena.view(P.TensorMeta("int64", (1,), 0)).fill_(3)
            sent = 0
            t0 = time.monotonic()
            try:
                for i in range(3000):            # ~60 bytes of reply each: a 64 KiB pipe is full after ~1000
                    pipes.send(embed_call(cfg.hidden_size, i + 1), 2.0)
                    sent += 1
            except TimeoutError:
                pass                             # the server stopped reading them: it dropped the session
            read_log(proc, r"dropped a session of uid \d+: its reply pipe is full, it does not read its replies", 30)
            assert sent >= 1000 and time.monotonic() - t0 < 20
            wait_for(lambda: info(endpoint)["sessions"] == sessions, 10, "the session is gone")
        finally:
            pipes.close()
            raw.close()
            arena.close()
    assert proc.poll() is None
    served_well(summary, slowest_s=0.9)          # never the old one-second stall


def test_token_ids_are_checked_on_the_copy_that_is_used(server, tiny):
    """A runner flips a token id between a valid one and 10**9 while its embed calls are served: each reply is
    a row of the table (of the id the server checked: the copy may catch the id mid-write, torn into another
    valid one) or the vocabulary error, never an indexing failure or garbage."""
    endpoint, proc = server
    cfg, oracle = tiny
    D = cfg.hidden_size
    raw, arena = Raw(endpoint), Arena.create(1 << 20)
    ids = arena.view(P.TensorMeta("int64", (1,), 0))
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            ids.fill_(7)
            ids.fill_(10**9)

    flipper = threading.Thread(target=flip, daemon=True)
    try:
        assert attach(raw, arena)["type"] == "attached"
        flipper.start()
        kinds = {"result": 0, "error": 0}
        for i in range(300):
            head, _ = raw.ask(embed_call(D, i + 1))
            kinds[head["type"]] += 1
            if head["type"] == "error":
                error_of(head, "outside the vocabulary")
            else:
                row = arena.view(P.TensorMeta("float32", (1, D), 4096))
                assert (oracle.embed == row).all(1).any(), "a row of the embedding table"
        assert sum(kinds.values()) == 300
    finally:
        stop.set()
        flipper.join(5)
        raw.close()
        arena.close()
    assert proc.poll() is None


def test_a_huge_header_is_refused_by_its_length_before_any_copy(server, tiny):
    endpoint, proc = server
    cfg, oracle = tiny
    big = 64 * 2**20
    raw = Raw(endpoint)
    try:
        error_of(raw.ask(b"{" + bytes(big))[0], f"a header frame of {big + 1} bytes")
        error_of(raw.ask(bytes([P.MAGIC, P.VERSION]) + bytes(2**12))[0], f"a call header of {2 + 2**12} bytes")
    finally:
        raw.close()
    assert proc.poll() is None

    class Uncopyable:        # its length is all the server may look at
        def __len__(self):
            return 400 * 2**20

        def __bytes__(self):
            raise AssertionError("the header was copied before its length was checked")

    handlers = Handlers(oracle, {}, None, "ipc:///nonexistent/x.ipc", "random:tiny")
    error_of(P.decode(handlers.handle(b"x", [Uncopyable()])[0]), f"a header frame of {400 * 2**20} bytes")


def test_a_control_message_on_a_pipe_is_named_as_such_whatever_its_length(tiny):
    """JSON on a control pipe is refused as not a call, also when it is longer than any call header (the
    length check is for binary headers only)."""
    from tsqp.untrusted.sessions import Sessions
    _, oracle = tiny
    handlers = Handlers(oracle, {}, Sessions(8, 0, lambda fd, added: None), "ipc:///nonexistent/x.ipc",
                        "random:tiny")
    for pad in (0, 1000):
        error_of(P.decode(handlers.call(b"x", P.encode({"type": "info", "pad": "x" * pad}))[0]),
                 "the control pipes carry calls only")


def test_sessions_live_as_long_as_their_connection_never_a_pid_the_runner_names(server):
    """Eight hellos claiming pid 1: they end when their sockets close, at once; a hello naming a dead pid
    lives while its connection does."""
    endpoint, proc = server
    base = info(endpoint)["sessions"]
    raws = [Raw(endpoint) for _ in range(8)]
    for r in raws:
        assert r.control({"type": "hello", "pid": 1})["type"] == "welcome"
    assert info(endpoint)["sessions"] == base + 8
    for r in raws:
        r.close()
    took = wait_for(lambda: info(endpoint)["sessions"] == base, 5, "the closed connections' sessions end")
    assert took < 3, took

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    raw = Raw(endpoint)
    try:
        assert raw.control({"type": "hello", "pid": dead.pid})["type"] == "welcome"
        time.sleep(2.5)                                      # the old reaper looked every second
        assert info(endpoint)["sessions"] == base + 1
    finally:
        raw.close()
    wait_for(lambda: info(endpoint)["sessions"] == base, 5, "its session ends with its connection")


def test_sessions_are_counted_per_user():
    """Over tcp the user is the client's address (with --insecure) or its CurveZMQ key: one address holding
    its quota does not keep another from being served."""
    endpoint = free_tcp_endpoint()
    with serving("random:tiny", endpoint=endpoint, extra=("--insecure", "--max-sessions-per-user", "2")) as (_, proc):
        mine = [Raw(endpoint, source="127.0.0.2") for _ in range(3)]
        other = Raw(endpoint, source="127.0.0.3")
        try:
            for r in mine[:2]:
                assert r.control({"type": "hello"})["type"] == "welcome"
            error_of(mine[2].control({"type": "hello"}), "127.0.0.2 already holds 2 sessions",
                     "--max-sessions-per-user 2")
            assert other.control({"type": "hello"})["type"] == "welcome"
            mine[0].close()
            wait_for(lambda: mine[2].control({"type": "hello"})["type"] == "welcome", 5, "a slot again")
        finally:
            for r in [*mine[1:], other]:
                r.close()
        assert proc.poll() is None


def test_a_busy_server_is_not_taken_for_stale():
    """A server stopped dead (SIGSTOP) still holds its endpoint's lock: a second `tsqp serve` is refused at
    once, naming it, instead of replacing its socket after a one-second probe."""
    endpoint = short_endpoint()
    with serving("random:tiny", endpoint=endpoint) as (_, first):
        first.send_signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            r = run_cli("serve", "--model", "random:tiny", "--device", "cpu", "--endpoint", endpoint, timeout_s=60)
            assert r.returncode == 2, r.stderr
            assert f"a live server already answers on {endpoint} (pid {first.pid} holds" in r.stderr, r.stderr
        finally:
            first.send_signal(signal.SIGCONT)
        assert info(endpoint)["pid"] == first.pid
        assert time.monotonic() - t0 < 30


def test_wildcard_binds_are_decided_by_the_resolved_address(capsys):
    from tsqp.cli import main
    port = free_tcp_endpoint().rpartition(":")[2]
    for host in ("0", "0.0", "0x0", "0.0.0.0", "*", "[::]", "[::0]"):
        rc = main(["serve", "--model", "random:tiny", "--device", "cpu", "--endpoint", f"tcp://{host}:{port}",
                   "--insecure"])
        err = capsys.readouterr().err
        assert rc == 2 and "every network interface" in err and "--public" in err, (host, err)
    with pytest.raises(SecurityError, match="every network interface"):
        check_bound("tcp://0.0.0.0:5555", public=False)          # what libzmq reports it bound, after the fact
    check_bound("tcp://127.0.0.1:5555", public=False)
    check_bound("tcp://0.0.0.0:5555", public=True)


# ==== another local user ================================================================================

AS_USER = textwrap.dedent("""
    # starts as root, imports what it needs, then becomes USER for good (it could not read root's Python)
    import json, os, pwd, select, sys, time
    import zmq, zmq.auth.thread, zmq.utils.monitor
    import tsqp.cli, tsqp.commands.serve, tsqp.untrusted.server, tsqp.weights, tsqp.untrusted.compute
    import tsqp.untrusted.intmm, tsqp.untrusted.faults, tsqp.wire.client
    tsqp.cli.parser()                 # its subcommands' lazy imports too
    user = pwd.getpwnam(sys.argv[1])
    os.setgroups([])
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)
    assert os.getuid() == user.pw_uid and os.geteuid() == user.pw_uid
    if sys.argv[2] == "serve":
        sys.exit(tsqp.cli.main(sys.argv[2:]))
    exec(sys.argv[2])
""")

IMPOSTOR = textwrap.dedent("""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(sys.argv[3])
    print("bound", flush=True)
    got = 0
    while not select.select([sys.stdin], [], [], 0)[0]:
        if sock.poll(50):
            sock.recv_multipart()
            got += 1
    print("received", got, flush=True)
""")

TRESPASSER = textwrap.dedent("""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        sock.bind(sys.argv[3])
        print("bound")
    except zmq.ZMQError as e:
        print("bind refused:", e.strerror)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(sys.argv[4])
    dealer.send(b'{"v":2,"type":"hello"}')
    print("answered" if dealer.poll(1500) else "no answer", flush=True)
""")


@pytest.fixture(scope="module")
def other_user():
    """A second local user for this module's tests (removed afterwards)."""
    if os.getuid() != 0:
        print("SKIP: creating a second local user needs root")
        pytest.skip("creating a second local user needs root")
    useradd, userdel = shutil.which("useradd"), shutil.which("userdel")
    if not useradd or not userdel:
        print("SKIP: this machine has no useradd/userdel")
        pytest.skip("this machine has no useradd/userdel")
    name = f"tsqpt{os.getpid()}"
    made = subprocess.run([useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        print(f"SKIP: useradd failed: {made.stderr.strip()}")
        pytest.skip(f"useradd failed: {made.stderr.strip()}")
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run([userdel, name], capture_output=True)


def as_user(user, what: str, *args: str) -> subprocess.Popen:
    """`what` (Python source, or "serve") run by `user`; its output piped, stdin open."""
    return subprocess.Popen([sys.executable, "-c", AS_USER, user.pw_name, what, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**RUN_ENV, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


def their_dir(user) -> Path:
    d = Path(tempfile.mkdtemp(prefix="tsqp-o-", dir="/tmp"))
    os.chown(d, user.pw_uid, user.pw_gid)
    return d


def test_another_user_who_binds_first_gets_nothing(other_user, tmp_path):
    """The default endpoint squatted: another user binds a socket in a directory of theirs. Our runner and our
    server refuse it, naming its owner; the impostor receives nothing."""
    d = their_dir(other_user)
    endpoint = f"ipc://{d}/gpu_server.ipc"
    impostor = as_user(other_user, IMPOSTOR, endpoint)
    try:
        wait_line(impostor, "bound", timeout_s=30)
        r = run_cli("run", "--endpoint", endpoint, "--tokens", 8, "--no-warmup", "--connect-timeout", 3)
        assert r.returncode == 2 and f"belongs to uid {other_user.pw_uid}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        r = run_cli("serve", "--model", "random:tiny", "--device", "cpu", "--endpoint", endpoint)
        assert r.returncode == 2 and f"belongs to uid {other_user.pw_uid}" in r.stderr, r.stderr
        out, _ = impostor.communicate(input="stop\n", timeout=30)
        assert "received 0" in out, out
    finally:
        if impostor.poll() is None:
            impostor.kill()
            impostor.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_a_runner_waiting_for_its_server_can_only_meet_its_own(other_user, tmp_path):
    """The runner starts before its server (and would reconnect the same way): the endpoint is in our own
    0700 directory, where the other user can neither bind nor connect; our server, once up, serves it."""
    endpoint = short_endpoint()
    runner = start_run("--endpoint", endpoint, "--tokens", "16", "--no-warmup", "--connect-timeout", "60",
                       "--dump-logits", str(tmp_path / "r.npy"))
    try:
        trespasser = as_user(other_user, TRESPASSER, f"{endpoint[:-4]}-evil.ipc", endpoint)
        out, _ = trespasser.communicate(timeout=60)
        assert "bind refused: Permission denied" in out, out
        with serving("random:tiny", endpoint=endpoint):
            _, err = runner.communicate(timeout=60)
            assert runner.returncode == 0, err
            trespasser = as_user(other_user, TRESPASSER, f"{endpoint[:-4]}-evil.ipc", endpoint)
            out, _ = trespasser.communicate(timeout=60)
            assert "bind refused" in out and "no answer" in out, out       # even with the server up
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.communicate(timeout=10)
    assert run_here("--local", "--model", "random:tiny", "--device", "cpu", "--tokens", "16", "--no-warmup",
                    "--dump-logits", str(tmp_path / "l.npy")) == 0
    assert np.array_equal(np.load(tmp_path / "r.npy"), np.load(tmp_path / "l.npy"))


def test_peer_credentials_are_checked_on_both_sides(other_user):
    """SO_PEERCRED, past the file system: the other user's real `tsqp serve`, and root (who may connect to
    any socket file) as its client. The server refuses the root runner naming both uids; the runner refuses
    the server naming both uids."""
    d = their_dir(other_user)
    endpoint = f"ipc://{d}/s.ipc"
    server = as_user(other_user, "serve", "--model", "random:tiny", "--device", "cpu", "--endpoint", endpoint)
    try:
        wait_line(server, "ready in", timeout_s=60)
        raw = Raw(endpoint)
        try:
            msg = error_of(raw.control({"type": "hello"}), "refused", f"uid {os.getuid()}",
                           f"uid {other_user.pw_uid}")
            assert "SO_PEERCRED" in msg
        finally:
            raw.close()
        client = Client(endpoint, timeout_s=10)
        try:
            client.send([P.encode({"type": "info"})])
            with pytest.raises(TransportError, match=f"runs as uid {other_user.pw_uid} .*not as this user "
                                                     f"\\(uid {os.getuid()}\\)"):
                client.recv("info")
        finally:
            client.close()
        with pytest.raises(TransportError, match=f"belongs to uid {other_user.pw_uid}"):
            RemoteOffload(endpoint, "shm", connect_timeout_s=3)          # the directory check comes first
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_serve_refuses_directories_others_could_write(other_user, tmp_path):
    """Theirs, world-writable, /tmp itself (the old default path), a planted link at the socket path: refused,
    and nothing's mode changed (there is no chmod by path to trick)."""
    theirs = their_dir(other_user)
    open_dir = Path(tempfile.mkdtemp(prefix="tsqp-w-", dir="/tmp"))
    os.chmod(open_dir, 0o777)                          # no sticky bit: anyone may replace entries
    victim = tmp_path / "victim"
    victim.write_text("x")
    os.chmod(victim, 0o644)
    mine = Path(short_endpoint().removeprefix("ipc://")).parent
    (mine / "s.ipc").symlink_to(victim)
    try:
        cases = {theirs / "s.ipc": f"belongs to uid {other_user.pw_uid}",
                 open_dir / "s.ipc": "writable by other users",
                 Path("/tmp/tsqp_gpu_server.ipc"): f"as the default ipc:///tmp/tsqp-{os.getuid()}/gpu_server.ipc",
                 mine / "s.ipc": "not a unix socket"}
        results = [run_cli("serve", "--model", "random:tiny", "--device", "cpu", "--endpoint", f"ipc://{p}")
                   for p in cases]
        for (path, words), r in zip(cases.items(), results):
            assert r.returncode == 2 and words in r.stderr, (path, r.stderr)
            assert "Traceback" not in r.stderr
        assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and (mine / "s.ipc").is_symlink()
        r = run_cli("run", "--endpoint", f"ipc://{open_dir}/s.ipc", "--tokens", 4, "--connect-timeout", 2)
        assert r.returncode == 2 and "writable by other users" in r.stderr, r.stderr
    finally:
        shutil.rmtree(theirs, ignore_errors=True)
        shutil.rmtree(open_dir, ignore_errors=True)
