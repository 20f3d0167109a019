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
from tsqp.ops import output_of
from tsqp.untrusted.compute import Compute
from tsqp.wire.client import RemoteOffload
from tsqp.untrusted.server import Server
from tsqp.wire.shm import Arena
from tsqp.wire.transport import Client, ServerTimeout

GOOD, FUZZ, FUZZ_SHM = b"good", b"fuzz", b"fuzz-shm"


def raw(header: dict) -> bytes:
    return json.dumps(header).encode()


def meta(dtype: str, shape, offset=None) -> P.TensorMeta:
    return P.TensorMeta(dtype, tuple(shape), offset)


def call(op, layer, metas: list[P.TensorMeta], output: P.TensorMeta | None = None, cfg=None) -> bytes:
    """A binary call; the output defaults to what the op would give (frames: no offset)."""
    if output is None:
        out_dtype, out_shape = ("float32", (metas[0].shape[0], 8)) if cfg is None else \
            output_of(cfg, "float32", op, layer, [(m.dtype, m.shape) for m in metas])
        output = P.TensorMeta(out_dtype, out_shape)
    return P.encode_call(op, layer, 7, metas, output)


def raw_call(version=P.VERSION, kind=P.CALL, code=2, layer=0, magic=P.MAGIC, rid=7, records=()) -> bytes:
    """Any header the struct can hold, valid or not."""
    return P.HEAD.pack(magic, version, kind, code, len(records), layer, rid, 0.0) + b"".join(
        P.TENSOR.pack(*r) for r in records)


@pytest.fixture(scope="module")
def server():
    """An in-process server on random:tiny with three sessions: `good` and `fuzz-shm` own shm arenas."""
    cfg, weights = W.load("random:tiny", torch.float32, "cpu")
    compute = Compute(cfg, weights, "cpu")
    norms = W.norm_weights(weights)
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
    head = P.decode(srv.handle(GOOD, [call("qkv", 1, [meta("float32", (8, cfg.hidden_size), 0)],
                                           meta("float32", (8, cfg.qkv_size), out_off))])[0])
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
    Q = compute.cfg.qkv_size
    f32 = lambda shape, off=None: meta("float32", shape, off)
    out = lambda T, off=None: meta("float32", (T, Q), off)
    cases = {
        "not JSON": (FUZZ, [b"\x00\xffgarbage"]),
        "truncated header": (FUZZ, [call("qkv", 0, [f32([2, D])], out(2))[:-9]]),
        "no frames": (FUZZ, []),
        "unknown op": (FUZZ, [raw_call(code=99, records=[(1, 2, -1, 2, D, 0, 0), (1, 2, -1, 2, Q, 0, 0)]),
                              bytes(2 * D * 4)]),
        "unknown version": (FUZZ, [raw_call(version=99)]),
        "unknown control version": (FUZZ, [raw({"v": 99, "type": "hello"})]),
        "unknown dtype": (FUZZ, [raw_call(records=[(42, 2, -1, 2, D, 0, 0), (1, 2, -1, 2, Q, 0, 0)]), bytes(2 * D)]),
        "shape and bytes disagree": (FUZZ, [call("qkv", 0, [f32([2, D])], out(2)), bytes(2 * D * 4 - 4)]),
        "truncated tensor frame": (FUZZ, [call("qkv", 0, [f32([2, D])], out(2))]),
        "wrong output asked for": (FUZZ, [call("qkv", 0, [f32([2, D])], out(3)), bytes(2 * D * 4)]),
        "layer out of range": (FUZZ, [call("qkv", 2, [f32([2, D])], out(2)), bytes(2 * D * 4)]),
        "negative layer": (FUZZ, [raw_call(layer=-2, records=[(1, 2, -1, 2, D, 0, 0), (1, 2, -1, 2, Q, 0, 0)]),
                                  bytes(2 * D * 4)]),
        "offset outside the arena": (FUZZ_SHM, [call("qkv", 0, [f32([2, D], (1 << 20) - 8)], out(2, 0))]),
        "output outside the arena": (FUZZ_SHM, [call("qkv", 0, [f32([2, D], 0)], out(2, 1 << 40))]),
        "negative offset": (FUZZ_SHM, [raw_call(records=[(1, 2, -256, 2, D, 0, 0), (1, 2, 4096, 2, Q, 0, 0)])]),
        "huge shape": (FUZZ_SHM, [call("qkv", 0, [f32([2**31 - 1, D], 0)], out(2**31 - 1, 4096))]),
        "token id outside vocab": (FUZZ, [call("embed", None, [meta("int64", [1])], meta("float32", (1, D))),
                                          torch.tensor([10**9]).numpy().tobytes()]),
        "call without session": (b"stranger", [call("qkv", 0, [f32([2, D])], out(2)), bytes(2 * D * 4)]),
        "attach another name": (FUZZ, [P.encode({"type": "attach", "arena": {"name": "../../etc/passwd",
                                                                            "size": 4096}})]),
        "unknown type": (FUZZ, [P.encode({"type": "shutdown"})]),
    }
    for name, (peer, frames) in cases.items():
        msg = error_of(srv.handle(peer, frames))
        assert msg, name
    assert "unknown op code 99" in error_of(srv.handle(*cases["unknown op"]))
    assert "version 99" in error_of(srv.handle(*cases["unknown version"]))
    assert "version 99" in error_of(srv.handle(*cases["unknown control version"]))
    assert "asks for a float32[3" in error_of(srv.handle(*cases["wrong output asked for"]))
    assert "layer 2 out of range" in error_of(srv.handle(*cases["layer out of range"]))
    assert "outside" in error_of(srv.handle(*cases["offset outside the arena"]))
    good_qkv(srv, compute, arenas[GOOD])


# ---- hypothesis, in-process ----------------------------------------------------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(), max_size=3))
CONTROL = st.fixed_dictionaries(
    {"v": st.one_of(st.just(P.VERSION), JUNK),
     "type": st.sampled_from(["hello", "attach", "info", "echo", "bye", "call", "result", "x"])},
    optional={"arena": st.one_of(st.fixed_dictionaries({"name": st.text(max_size=30), "size": JUNK}), JUNK),
              "shm": st.booleans(), "nbytes": JUNK, "src": JUNK, "dst": JUNK, "pid": JUNK, "pipes": JUNK})
DIM = st.one_of(st.integers(0, 160), st.sampled_from([128, 384, 512, 2**31 - 1, 2**32 - 1]))
RECORD = st.tuples(st.integers(0, 8), st.integers(0, 6),
                   st.one_of(st.integers(-8, (1 << 20) + 8).map(lambda o: o // 8 * 8), st.integers(-2**63, 2**63 - 1)),
                   DIM, DIM, DIM, DIM)
BINARY = st.builds(raw_call, version=st.one_of(st.just(P.VERSION), st.integers(0, 255)),
                   kind=st.sampled_from([P.CALL, P.CALL, P.RESULT, 0, 7]), code=st.integers(0, 12),
                   layer=st.integers(-3, 4), magic=st.sampled_from([P.MAGIC, P.MAGIC, P.MAGIC, 0]),
                   rid=st.integers(0, 2**64 - 1), records=st.lists(RECORD, max_size=4))
FRAMES = st.lists(st.binary(max_size=2048), max_size=3)
MESSAGE = st.one_of(
    st.tuples(CONTROL.map(lambda h: json.dumps(h).encode()), FRAMES).map(lambda t: [t[0], *t[1]]),
    st.tuples(BINARY, FRAMES).map(lambda t: [t[0], *t[1]]),
    st.tuples(BINARY, st.integers(1, 40)).map(lambda t: [t[0][:-t[1]]]),      # truncated
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
                attacker.client.send([raw_call(records=[(1, 2, off, 4, D, 0, 0),
                                                        (1, 2, 0, 4, attacker.cfg.qkv_size, 0, 0)])])
                assert P.decode(attacker.client.recv("reply")[0])["type"] == "error"
        finally:
            attacker.close()
        after = victim.submit("embed", None, ids).result()
        torch.testing.assert_close(after, before)
        x = torch.randn(5, D)
        y = victim.submit("gate_up", 1, x).result()
        assert y.shape == (5, 2 * victim.cfg.intermediate_size) and torch.isfinite(y).all()
        victim.client.send([call("qkv", 9, [meta("float32", (5, D), 0)],
                                 meta("float32", (5, victim.cfg.qkv_size), 4096))])   # past the runner's own check
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
