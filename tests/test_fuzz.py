"""Bad input: named cases, then hypothesis against Server.handle in-process and against a live server.
No input may crash the server or touch another session; a real session still gets correct results."""
from __future__ import annotations

import json
import signal

import numpy as np

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import serving
from tsqp.wire import protocol as P
from tsqp import weights as W
from tsqp.untrusted.compute import Compute
from tsqp.wire.client import RemoteOffload
from tsqp.untrusted.server import Server
from tsqp.wire.shm import Arena
from tsqp.wire.transport import Client, ServerTimeout

GOOD, FUZZ, FUZZ_SHM = b"good", b"fuzz", b"fuzz-shm"


def raw(header: dict) -> bytes:
    return json.dumps(header).encode()


def call(op, layer, metas, **extra) -> bytes:
    return P.encode({"type": "call", "id": 7, "op": op, "layer": layer, "inputs": metas, **extra})


@pytest.fixture(scope="module")
def server():
    """An in-process server on random:tiny with three sessions: `good` and `fuzz-shm` own shm arenas."""
    cfg, weights = W.load("random:tiny", torch.float32, "cpu")
    compute = Compute(cfg, weights, "cpu")
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    srv = Server(compute, norms, "ipc:///nonexistent/never-bound.ipc", "random:tiny", max_sessions=4)
    arenas = {}
    for peer in (GOOD, FUZZ_SHM):
        assert P.decode(srv.handle(peer, [P.encode({"type": "hello"})])[0])["type"] == "welcome"
        arenas[peer] = Arena.create(1 << 20)
        head = P.decode(srv.handle(peer, [P.encode({"type": "attach", "arena": {"name": arenas[peer].name,
                                                                                "size": arenas[peer].size}})])[0])
        assert head["type"] == "attached", head
    srv.handle(FUZZ, [P.encode({"type": "hello"})])
    yield srv, compute, arenas
    for a in arenas.values():
        a.close()


def good_qkv(srv: Server, compute: Compute, arena: Arena) -> None:
    """The `good` session computes layer 1's qkv correctly in its arena."""
    cfg = compute.cfg
    x = arena.base[:8 * cfg.hidden_size * 4].view(torch.float32).view(8, cfg.hidden_size)
    x.copy_(torch.randn(8, cfg.hidden_size, generator=torch.Generator().manual_seed(5)))
    out_off = 64 * 1024
    head = P.decode(srv.handle(GOOD, [call("qkv", 1, [{"dtype": "float32", "shape": [8, cfg.hidden_size],
                                                        "offset": 0}], output={"offset": out_off})])[0])
    assert head["type"] == "result", head
    y = arena.base[out_off:out_off + 8 * cfg.qkv_size * 4].view(torch.float32).view(8, cfg.qkv_size)
    want, _ = compute.run("qkv", 1, [x.clone()])
    torch.testing.assert_close(y, want)


def error_of(reply: list) -> str:
    head = P.decode(reply[0])
    assert head["type"] == "error", head
    return head["error"]


# ---- named bad inputs ----------------------------------------------------------------------------------

def test_named_bad_inputs_get_an_error_naming_the_problem(server):
    srv, compute, arenas = server
    D = compute.cfg.hidden_size
    f32 = lambda shape, off=None: {"dtype": "float32", "shape": shape, **({} if off is None else {"offset": off})}
    cases = {
        "not JSON": (FUZZ, [b"\x00\xffgarbage"]),
        "truncated header": (FUZZ, [call("qkv", 0, [f32([2, D])])[:-9]]),
        "no frames": (FUZZ, []),
        "unknown op": (FUZZ, [call("softmax", 0, [f32([2, D])]), bytes(2 * D * 4)]),
        "unknown version": (FUZZ, [raw({"v": 99, "type": "call"})]),
        "unknown dtype": (FUZZ, [call("qkv", 0, [{"dtype": "float8", "shape": [2, D]}]), bytes(2 * D)]),
        "shape and bytes disagree": (FUZZ, [call("qkv", 0, [f32([2, D])]), bytes(2 * D * 4 - 4)]),
        "truncated tensor frame": (FUZZ, [call("qkv", 0, [f32([2, D])])]),
        "layer out of range": (FUZZ, [call("qkv", 2, [f32([2, D])]), bytes(2 * D * 4)]),
        "negative layer": (FUZZ, [call("qkv", -1, [f32([2, D])]), bytes(2 * D * 4)]),
        "offset outside the arena": (FUZZ_SHM, [call("qkv", 0, [f32([2, D], (1 << 20) - 8)], output={"offset": 0})]),
        "output outside the arena": (FUZZ_SHM, [call("qkv", 0, [f32([2, D], 0)], output={"offset": 1 << 40})]),
        "negative offset": (FUZZ_SHM, [call("qkv", 0, [f32([2, D], -256)], output={"offset": 4096})]),
        "huge shape": (FUZZ_SHM, [call("qkv", 0, [f32([2**31 - 1, D], 0)], output={"offset": 4096})]),
        "token id outside vocab": (FUZZ, [call("embed", None, [{"dtype": "int64", "shape": [1]}]),
                                          torch.tensor([10**9]).numpy().tobytes()]),
        "call without session": (b"stranger", [call("qkv", 0, [f32([2, D])]), bytes(2 * D * 4)]),
        "attach another name": (FUZZ, [P.encode({"type": "attach", "arena": {"name": "../../etc/passwd",
                                                                            "size": 4096}})]),
        "unknown type": (FUZZ, [P.encode({"type": "shutdown"})]),
    }
    for name, (peer, frames) in cases.items():
        msg = error_of(srv.handle(peer, frames))
        assert msg, name
    assert "unknown op 'softmax'" in error_of(srv.handle(*cases["unknown op"]))
    assert "version 99" in error_of(srv.handle(*cases["unknown version"]))
    assert "layer 2 out of range" in error_of(srv.handle(*cases["layer out of range"]))
    assert "outside" in error_of(srv.handle(*cases["offset outside the arena"]))
    good_qkv(srv, compute, arenas[GOOD])


# ---- hypothesis, in-process ----------------------------------------------------------------------------

OPS = st.sampled_from(P.OPS + ("", "QKV", "lm_head\x00"))
DTYPES = st.sampled_from(tuple(P.WIRE_DTYPES) + ("float64", "uint8", ""))
DIM = st.one_of(st.integers(0, 160), st.sampled_from([128, 384, 512, 2**31 - 1, 2**31, -1]))
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(), max_size=3))
META = st.fixed_dictionaries({"dtype": DTYPES, "shape": st.lists(DIM, max_size=5)},
                             optional={"offset": st.one_of(st.integers(-8, (1 << 20) + 8).map(lambda o: o // 8 * 8),
                                                           JUNK)})
HEADER = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), JUNK),
     "type": st.sampled_from(["call", "call", "call", "hello", "attach", "info", "echo", "bye", "x"])},
    optional={"op": OPS, "layer": st.one_of(st.integers(-3, 4), JUNK), "id": JUNK,
              "inputs": st.one_of(st.lists(META, max_size=3), JUNK),
              "output": st.one_of(st.fixed_dictionaries({"offset": st.integers(-8, 1 << 21)}), JUNK),
              "arena": st.one_of(st.fixed_dictionaries({"name": st.text(max_size=30), "size": JUNK}), JUNK),
              "shm": st.booleans(), "nbytes": JUNK, "src": JUNK, "dst": JUNK, "pid": JUNK})
FRAMES = st.lists(st.binary(max_size=2048), max_size=3)
MESSAGE = st.one_of(
    st.tuples(HEADER.map(lambda h: json.dumps(h).encode()), FRAMES).map(lambda t: [t[0], *t[1]]),
    FRAMES,
)


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(peer=st.sampled_from([FUZZ, FUZZ_SHM, b"other"]), frames=MESSAGE)
def test_fuzz_handle_never_raises(server, peer, frames):
    srv, _, arenas = server
    if FUZZ not in srv.sessions:      # a fuzzed hello or bye ended it: give the fuzzer its sessions back
        srv.handle(FUZZ, [P.encode({"type": "hello"})])
    if FUZZ_SHM not in srv.sessions or srv.sessions[FUZZ_SHM].arena is None:
        srv.handle(FUZZ_SHM, [P.encode({"type": "hello"})])
        arenas[FUZZ_SHM].close()
        arenas[FUZZ_SHM] = a = Arena.create(1 << 20)
        srv.handle(FUZZ_SHM, [P.encode({"type": "attach", "arena": {"name": a.name, "size": a.size}})])
    reply = srv.handle(peer, frames)
    srv.reap()                         # fuzzed pids and sessions go through the liveness check too
    head = P.decode(reply[0])
    assert head["type"] in ("welcome", "attached", "result", "info", "echo", "bye", "error")


def test_after_fuzzing_the_good_session_is_intact(server):
    srv, compute, arenas = server
    assert GOOD in srv.sessions and srv.sessions[GOOD].arena is not None
    good_qkv(srv, compute, arenas[GOOD])


# ---- a live server -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live():
    with serving("random:tiny", extra=("--max-message-mb", "1")) as (endpoint, proc):
        yield endpoint, proc


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(frames=MESSAGE)
def test_fuzz_live_server_answers_everything(live, frames):
    endpoint, proc = live
    c = Client(endpoint, timeout_s=5)
    try:
        c.send(frames or [b""])
        head = P.decode(c.recv("a fuzz reply")[0])
        assert head["type"] in ("welcome", "attached", "result", "info", "echo", "bye", "error")
        assert "internal server error" not in head.get("error", ""), head     # handle() answered it itself
        c.send([P.encode({"type": "bye"})])      # end a session the fuzz may have opened
        assert P.decode(c.recv("bye")[0])["type"] == "bye"
    finally:
        c.close()
    assert proc.poll() is None


def run_logits(tmp_path, *args: str) -> np.ndarray:
    """`tsqp run` in this process with --dump-logits; the last position's logits."""
    from tsqp.cli import main
    out = tmp_path / f"{len(list(tmp_path.iterdir()))}.npy"
    old = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["run", "--no-warmup", "--tokens", "32", "--dump-logits", str(out), *args]) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    return np.load(out)


def test_live_server_survives_and_a_session_stays_correct(live, tmp_path):
    endpoint, proc = live
    victim = RemoteOffload(endpoint, "shm", timeout_s=10)
    try:
        ids = torch.arange(0, 40) * 11 % victim.cfg.vocab_size
        before = victim.submit("embed", None, ids).result().clone()
        # a shm attacker with offsets all over its own arena, and a frames one with mismatched sizes
        attacker = RemoteOffload(endpoint, "shm", timeout_s=10, arena_bytes=1 << 20)
        D = attacker.cfg.hidden_size
        try:
            for off in (-8, 0, (1 << 20) - 8, 1 << 20, 1 << 30):
                attacker.client.send([call("qkv", 0, [{"dtype": "float32", "shape": [4, D], "offset": off}],
                                           output={"offset": 0})])
                assert P.decode(attacker.client.recv("reply")[0])["type"] == "error"
        finally:
            attacker.close()
        after = victim.submit("embed", None, ids).result()
        torch.testing.assert_close(after, before)
        x = torch.randn(5, D)
        y = victim.submit("gate_up", 1, x).result()
        assert y.shape == (5, 2 * victim.cfg.intermediate_size) and torch.isfinite(y).all()
        victim.client.send([call("qkv", 9, [{"dtype": "float32", "shape": [5, D], "offset": 0}],
                                 output={"offset": 4096})])     # past the runner's own check
        assert "layer 9 out of range" in error_of(victim.client.recv("reply"))
    finally:
        victim.close()
    assert proc.poll() is None
    got = run_logits(tmp_path, "--endpoint", endpoint)
    want = run_logits(tmp_path, "--local", "--model", "random:tiny", "--device", "cpu")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_oversized_message_is_dropped_and_the_server_keeps_serving(live):
    endpoint, proc = live                  # --max-message-mb 1
    big = Client(endpoint, timeout_s=1.5)
    try:
        big.send([P.encode({"type": "echo"}), bytes(2 << 20)])
        with pytest.raises(ServerTimeout):
            big.recv("the echo of an oversized message")
    finally:
        big.close()
    ok = Client(endpoint, timeout_s=5)
    try:
        ok.send([P.encode({"type": "echo"}), bytes(512 << 10)])     # under the cap: served
        reply = ok.recv("echo")
        assert P.decode(reply[0])["type"] == "echo" and len(reply[1]) == 512 << 10
    finally:
        ok.close()
    assert proc.poll() is None
