"""A malicious server against the runner (issue 14): a fake server speaking the protocol lies on purpose, and the
runner must end each case with a clear error within its deadline, never a traceback, a hang or silently wrong
output. The fake is the real server logic (`Server.handle`, in a thread here) whose answers a `lie` rewrites, so
everything it does not lie about is what a real server says."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RUN_ENV, short_endpoint
from tsqp import weights as W
from tsqp.config import PEER_LIMITS
from tsqp.local import LocalOffload
from tsqp.trusted.generate import Sampling, check_logits, generate
from tsqp.trusted.model import TrustedModel
from tsqp.untrusted.compute import Compute
from tsqp.untrusted.server import Server
from tsqp.wire import protocol as P
from tsqp.wire.client import Budget, RemoteError, RemoteOffload, largest_result
from tsqp.wire.hello import Expected
from tsqp.wire.transport import ServerTimeout

TOKENS = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
CLEAN_ERRORS = (RemoteError, ServerTimeout, ValueError)    # ConnectionLost is a ServerTimeout


class FakeServer:
    """An honest in-process server on `model` behind a ROUTER socket in a thread, with hooks to lie:
      on_hello(head, frames) -> [messages]   the welcome (head: the decoded JSON, frames: the norms' bytes)
      on_call(m, reply, session) -> [messages]   a call's honest reply (frames) -> what is sent instead
      every = (period_s, message)            sent to the runner unasked, over and over, once it said hello
    A message is a list of frames; [] sends nothing."""

    def __init__(self, model: str = "random:tiny"):
        self.cfg, weights = W.load(model, torch.float32, "cpu")
        self.norms = W.norm_weights(weights)
        # sessions refused at the hello never say bye: room for all of them
        self.server = Server(Compute(self.cfg, weights, "cpu"), self.norms, "ipc:///nonexistent/fake.ipc", model,
                             max_sessions=100_000)
        self.endpoint = short_endpoint("fake")
        self.reset()
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def reset(self) -> None:
        self.on_hello = self.on_call = self.every = None
        self.calls = 0

    def _loop(self, ready: threading.Event) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        ready.set()
        peer, next_unasked = None, math.inf
        try:
            while not self.stopping.is_set():
                if sock.poll(1 if self.every else 10):
                    peer, *body = sock.recv_multipart()
                    for message in self._answer(peer, body):
                        sock.send_multipart([peer, *message], copy=False)
                if self.every is None or peer is None:
                    next_unasked = math.inf
                    continue
                now = time.monotonic()
                if next_unasked == math.inf:
                    next_unasked = now + self.every[0]
                while next_unasked <= now:            # all that fell due (a ROUTER drops what the peer cannot take)
                    sock.send_multipart([peer, *self.every[1]], copy=False)
                    next_unasked += self.every[0]
        finally:
            sock.close(linger=0)

    def _answer(self, peer: bytes, body: list) -> list:
        reply = self.server.handle(peer, body)
        try:
            if P.is_binary(body[0]):
                self.calls += 1
                if self.on_call is not None:
                    return self.on_call(P.unpack(body[0]), reply, self.server.sessions.get(peer))
            elif P.decode(body[0])["type"] == "hello" and self.on_hello is not None:
                return self.on_hello(P.decode(reply[0]), [bytes(f) for f in reply[1:]])
        except Exception as e:      # a broken lie: reported by the fixture, never passed off as the runner's fault
            self.errors.append(e)
        return [reply]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(10)
        assert not self.errors, self.errors


@pytest.fixture(scope="module")
def fake():
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture
def liar(fake):
    fake.reset()
    yield fake
    fake.reset()
    assert not fake.errors, fake.errors


def welcome(head: dict, frames: list) -> list:
    return [[P.encode(head), *frames]]


def connect(fake: FakeServer, transport: str = "frames", **kw) -> RemoteOffload:
    kw = {"timeout_s": 3.0, "connect_timeout_s": 3.0, "control": "socket", "arena_bytes": 16 * 2**20, **kw}
    return RemoteOffload(fake.endpoint, transport, **kw)


def prefill(remote: RemoteOffload, ids: torch.Tensor = TOKENS, chunks: int = 1) -> torch.Tensor:
    model = TrustedModel(remote.cfg, remote.norms, remote)
    return check_logits(model.prefill(ids, model.new_cache(ids.numel()), chunks), "the prefill")


def refused(fake: FakeServer, match: str, within_s: float = 4.0, **kw) -> str:
    """Connect and prefill; the runner must raise a clean error matching `match` within `within_s`."""
    t0 = time.monotonic()
    remote = None
    with pytest.raises(CLEAN_ERRORS) as e:
        remote = connect(fake, **kw)
        prefill(remote)
    if remote is not None:
        remote.close()
    assert time.monotonic() - t0 < within_s, f"took {time.monotonic() - t0:.1f} s: {e.value}"
    text = str(e.value)
    assert re.search(match, text), text
    assert "\n" not in text and "\x1b" not in text, text
    return text


# ---- the welcome: every field checked ------------------------------------------------------------------

def set_config(**changes):
    def lie(head, frames):
        head["config"].update(changes)
        return welcome(head, frames)
    return lie


def scale_norm(factor: float, name: str = "model.norm.weight"):
    def lie(head, frames):
        i = head["norms"].index(name)
        t = torch.frombuffer(bytearray(frames[i]), dtype=torch.float32) * factor
        frames[i] = t.numpy().tobytes()
        return welcome(head, frames)
    return lie


BAD_WELCOMES = {
    # field: (lie, what the error must say)
    "nan norm": (scale_norm(math.nan), r"norm model\.norm\.weight holds non-finite"),
    "inf norm": (scale_norm(math.inf, "model.layers.1.post_attention_layernorm.weight"), r"holds non-finite"),
    "eos covering every token": (set_config(eos_token_id=list(range(512))),
                                 r"'eos_token_id' is \[0, 1, 2.*at most 64 token ids"),
    "eos covering a small vocabulary": (set_config(vocab_size=4, bos_token_id=None, eos_token_id=[0, 1, 2, 3]),
                                        r"'eos_token_id'.*cover the whole vocabulary"),
    "eos outside the vocab": (set_config(eos_token_id=[512]), r"'eos_token_id'.*0\.\.511"),
    "huge vocab": (set_config(vocab_size=2**40), rf"'vocab_size' is 1099511627776; expected an integer in 1\.\.{2**20}"),
    "huge head_dim": (set_config(head_dim=2**20), r"'head_dim'.*1\.\.1024"),
    "odd head_dim": (set_config(head_dim=33), r"'head_dim'.*even"),
    "heads not a multiple of kv heads": (set_config(num_kv_heads=3), r"'num_kv_heads'.*divisor"),
    "vocab as a string": (set_config(vocab_size="512"), r"'vocab_size' is '512'"),
    "layers as a float": (set_config(num_layers=2.0), r"'num_layers' is 2\.0"),
    "layers as a bool": (set_config(num_layers=True), r"'num_layers' is True"),
    "zero layers": (set_config(num_layers=0), r"'num_layers' is 0"),
    "nan eps": (set_config(rms_norm_eps=math.nan), r"'rms_norm_eps' is nan"),
    "negative eps": (set_config(rms_norm_eps=-1e-5), r"'rms_norm_eps'.*finite number in \(0, 1\)"),
    "infinite theta": (set_config(rope_theta=math.inf), r"'rope_theta' is inf"),
    "scaling with a missing field": (set_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                                     r"'rope_scaling'.*exactly"),
    "scaling of another type": (set_config(rope_scaling={"rope_type": "yarn", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64}), r"'yarn'"),
    "scaling dividing by zero": (set_config(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 64}),
                                 r"high_freq_factor.*must exceed"),
    "bos outside the vocab": (set_config(bos_token_id=-1), r"'bos_token_id'"),
    "an unknown config field": (set_config(sliding_window=4096), r"unknown field 'sliding_window'"),
    "a missing config field": (lambda h, f: (h["config"].pop("head_dim"), welcome(h, f))[1], r"missing field 'head_dim'"),
    "config not an object": (lambda h, f: welcome({**h, "config": [1, 2]}, f), r"'config' is \[1, 2\], not an object"),
    "unknown dtype": (lambda h, f: welcome({**h, "dtype": "float64"}, f), r"'dtype' is 'float64'"),
    "dtype missing": (lambda h, f: welcome({k: v for k, v in h.items() if k != "dtype"}, f), r"'dtype' is None"),
    "a frame missing": (lambda h, f: welcome(h, f[:-1]), r"4 tensor frame\(s\) for 5 norm weights"),
    "an extra frame": (lambda h, f: welcome(h, [*f, b"\0" * 512]), r"6 tensor frame\(s\) for 5 norm weights"),
    "a short frame": (lambda h, f: welcome(h, [f[0][:-4], *f[1:]]), r"frame of 508 bytes"),
    "norm names of another model": (lambda h, f: welcome({**h, "norms": [n.replace("layers.1", "layers.7")
                                                                         for n in h["norms"]]}, f),
                                    r"'norms'.*expected the 5 norm weights of a 2-layer model"),
    "norm of the wrong shape": (lambda h, f: welcome({**h, "tensors": [{"dtype": "float32", "shape": [64, 2]}] * 5},
                                                     f), r"float32\[64, 2\]; expected float32\[128\]"),
    "norm of the wrong dtype": (lambda h, f: welcome({**h, "tensors": [{"dtype": "int64", "shape": [64]}] * 5}, f),
                                r"int64\[64\]; expected float32\[128\]"),
    "a model name that is not text": (lambda h, f: welcome({**h, "model": {"x": 1}}, f), r"'model' is \{'x': 1\}"),
    "a fingerprint that is not hex": (lambda h, f: welcome({**h, "fingerprint": "zz" * 10}, f), r"'fingerprint'"),
    "not a welcome": (lambda h, f: welcome({**h, "type": "attached"}, f), r"'attached' message where a welcome"),
    "not JSON": (lambda h, f: [[b"{not json", *f]], r"bad reply to the hello.*neither a binary header nor JSON"),
    "a result instead": (lambda h, f: [[P.encode_result("qkv", 0, 1, P.TensorMeta("float32", (1, 4)), 0.0)]],
                         r"a 'result' message where a welcome"),
    "an error with terminal escapes": (lambda h, f: [[P.error("\x1b[2J\x1b[31mowned\n" * 200)]],
                                       r"\?\[2J\?\[31mowned"),
    "an oversized error": (lambda h, f: [[P.error("x" * 70000)]], r"control message of \d+ bytes exceeds 65536"),
}


@pytest.mark.parametrize("case", list(BAD_WELCOMES))
@pytest.mark.parametrize("transport", ["frames", "shm"])
def test_a_bad_welcome_is_refused_naming_the_field(liar, case, transport):
    lie, match = BAD_WELCOMES[case]
    liar.on_hello = lie
    text = refused(liar, match, transport=transport)
    assert len(text) < 600, text            # one short line, whatever the server sent


def test_an_honest_welcome_is_taken_and_gives_the_local_logits(liar):
    """The other side of the coin: the same fake, not lying, gives what --local gives, bit for bit."""
    cfg, weights = W.load("random:tiny", torch.float32, "cpu")
    local = TrustedModel(cfg, W.norm_weights(weights), LocalOffload(Compute(cfg, weights, "cpu")))
    want = local.prefill(TOKENS, local.new_cache(TOKENS.numel()))
    for transport in ("frames", "shm"):
        remote = connect(liar, transport)
        try:
            assert torch.equal(prefill(remote), want), transport
        finally:
            remote.close()


# ---- a runner with its own model takes nothing from the server -------------------------------------------

@pytest.fixture(scope="module")
def own_fake(checkpoints):
    """A fake serving a real checkpoint (llama3 rope scaling, GQA); the runner holds its own copy."""
    path = checkpoints["gqa_llama3_tied"]
    server = FakeServer(str(path))
    yield server, path
    server.close()


def expected(path: Path) -> Expected:
    return Expected(str(path), W.load_config(str(path)), lambda dtype: W.load_norms(str(path), dtype)[1])


@pytest.mark.parametrize("lie, match", [
    (set_config(rms_norm_eps=1e-6), r"field 'rms_norm_eps' is 1e-06 there, 1e-05 here"),
    (set_config(rope_theta=10000.0), r"field 'rope_theta' is 10000\.0 there, 500000\.0 here"),
    (set_config(rope_scaling={"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     r"field 'rope_scaling' is .*'factor': 16\.0.* there, .*'factor': 8\.0"),
    (set_config(eos_token_id=[0]), r"field 'eos_token_id' is \[0\] there, \[2\] here"),
    (set_config(bos_token_id=0), r"field 'bos_token_id' is 0 there, 1 here"),
    (set_config(max_position_embeddings=128), r"field 'max_position_embeddings' is 128 there, 256 here"),
    (scale_norm(1.01), r"norm model\.norm\.weight\[0\] is [-0-9.e]+ there, [-0-9.e]+ here"),
    (scale_norm(1.01, "model.layers.0.input_layernorm.weight"), r"norm model\.layers\.0\.input_layernorm"),
])
def test_a_runner_with_its_own_model_refuses_any_difference(own_fake, lie, match):
    server, path = own_fake
    server.reset()
    server.on_hello = lie
    text = refused(server, f"differs from {re.escape(str(path))}: {match}", expect=expected(path))
    assert "refusing it" in text


def test_a_runner_with_its_own_model_uses_its_own_config_and_norms(own_fake):
    """Honest: the runner's config and norms are its own objects, equal to the server's bit for bit."""
    server, path = own_fake
    server.reset()
    remote = connect(server, expect=expected(path))
    try:
        cfg, norms = W.load_norms(str(path), torch.float32)
        assert remote.cfg == cfg and remote.cfg.rope_scaling["factor"] == 8.0
        assert remote.norms.keys() == norms.keys() and all(torch.equal(remote.norms[k], norms[k]) for k in norms)
        assert torch.isfinite(prefill(remote)).all()
    finally:
        remote.close()


def test_the_cli_refuses_a_server_that_differs_from_its_model(own_fake):
    """As a user sees it: exit 2, one line naming the field and both values, no traceback."""
    server, path = own_fake
    server.reset()
    server.on_hello = set_config(rms_norm_eps=1e-6)
    r = subprocess.run([sys.executable, "-m", "tsqp.cli", "run", "--endpoint", server.endpoint, "--model", str(path),
                        "--tokens", "4", "--no-warmup"], capture_output=True, text=True, env=RUN_ENV, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "field 'rms_norm_eps' is 1e-06 there, 1e-05 here" in r.stderr, r.stderr


# ---- resources bounded by the runner ---------------------------------------------------------------------

def huge_model(head, frames):
    """A consistent welcome of a model at the runner's limits (its norms and all): valid, but too big."""
    D = PEER_LIMITS["hidden_size"]
    head["config"].update(vocab_size=PEER_LIMITS["vocab_size"], hidden_size=D, intermediate_size=2**18,
                          num_heads=64, num_kv_heads=64, head_dim=1024, num_layers=2)
    head["config"]["rope_scaling"]["original_max_position_embeddings"] = 8192
    head["tensors"] = [{"dtype": "float32", "shape": [D]}] * len(frames)
    return welcome(head, [torch.ones(D).numpy().tobytes()] * len(frames))


def arena_memfds() -> set[str]:
    """This process's open arenas: memfds named tsqp-<pid>-<hex> (shm.Arena)."""
    fds = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("/memfd:tsqp-"):
            fds.add(target)
    return fds


def test_a_model_beyond_the_runners_budget_is_refused_before_any_allocation(liar):
    liar.on_hello = huge_model
    before = arena_memfds()
    refused(liar, r"the arena would take 896 MiB \(the served model random:tiny: 2 layers, hidden 65536, "
                         r"vocab 1048576; 128 tokens\), above this runner's limit of 256 MiB \(--max-arena-mb\)",
                   transport="shm", budget=Budget(tokens=128, max_bytes=256 * 2**20),
                   arena_bytes=lambda cfg: 2 * 128 * (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * 4)
    assert arena_memfds() == before                                        # no arena was created
    refused(liar, r"the KV cache would take 4096 MiB", budget=Budget(tokens=4096, max_bytes=256 * 2**20))
    refused(liar, r"the largest result would take 512 MiB",
            budget=Budget(tokens=128, max_bytes=256 * 2**20))


def test_a_frame_over_the_receive_cap_drops_the_connection_at_once(liar):
    """An extra 8 MiB frame in the welcome, to a shared-memory runner whose largest frame is a norm: libzmq drops
    the connection without reading the frame, and the runner says so at once (not at its 3 s deadline)."""
    big = bytes(8 * 2**20)
    liar.on_hello = lambda head, frames: welcome(head, [*frames, big])
    text = refused(liar, r"dropped while waiting for the hello.*receive cap of 262144 bytes", within_s=2.0,
                   transport="shm")
    assert "went away" in text


def test_a_frames_runner_without_the_model_takes_no_big_frame_before_it_knows_the_model(liar):
    """Over frames, a runner without --model hears the model from the hello: until then its cap is a control
    message's, so a 64 MiB frame in the welcome is dropped unread; its results then get a cap sized from the
    (checked) config and its own tokens, on a second connection whose hello must equal the first."""
    big = bytes(64 * 2**20)
    liar.on_hello = lambda head, frames: welcome(head, [*frames, big])
    before = rss_kib()
    refused(liar, r"dropped while waiting for the hello.*receive cap of 262144 bytes", within_s=2.0)
    assert (rss_kib() - before) / 1024 < 32                     # the 64 MiB never reached this process
    liar.reset()
    budget = Budget(tokens=512)                 # results up to 3 MiB: more than the hello's cap
    remote = connect(liar, budget=budget)
    try:
        assert remote.receive_cap == largest_result(remote.cfg, 512, False) > 262144
        cfg, weights = W.load("random:tiny", torch.float32, "cpu")
        local = TrustedModel(cfg, W.norm_weights(weights), LocalOffload(Compute(cfg, weights, "cpu")))
        assert torch.equal(prefill(remote), local.prefill(TOKENS, local.new_cache(TOKENS.numel())))
    finally:
        remote.close()
    # a result frame over that cap: the connection drops and the runner names the wait at once
    liar.on_call = lambda m, reply, session: [[reply[0], bytes(remote.receive_cap + 1)]]
    refused(liar, r"dropped while waiting for op .*receive cap", within_s=2.0, budget=budget)


def test_a_second_hello_that_differs_is_refused(liar):
    hellos = []

    def lie(head, frames):
        hellos.append(1)
        if len(hellos) > 1:
            head["config"]["rms_norm_eps"] = head["config"]["rms_norm_eps"] * 2
        return welcome(head, frames)
    liar.on_hello = lie
    refused(liar, r"second hello differs from its first", budget=Budget(tokens=512))


# The runner is started by a small launcher process: a child's peak RSS (wait4's ru_maxrss) counts the memory
# of the process it was forked from, and this test process may hold gigabytes by then.
MEASURE = textwrap.dedent("""
    import os, sys
    pid = os.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "tsqp.cli", "run", *sys.argv[2:]])
    _, status, usage = os.wait4(pid, 0)
    with open(sys.argv[1], "w") as f:
        f.write(str(usage.ru_maxrss))
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def run_measured(argv: list[str], timeout_s: float = 120) -> tuple[int, str, int]:
    """`tsqp run ARGV` as a process: (exit status, stderr, its peak RSS in KiB, from the kernel)."""
    with tempfile.TemporaryDirectory() as d:
        peak = Path(d) / "maxrss"
        proc = subprocess.Popen([sys.executable, "-c", MEASURE, str(peak), *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=RUN_ENV, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise AssertionError(f"tsqp run {argv} hung") from None
        return proc.returncode, err, int(peak.read_text())


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_a_reply_flood_does_not_grow_the_runners_memory(liar):
    """2000 unasked 200 KiB messages (400 MiB) thrown at a runner busy with its own work: ZeroMQ holds at most
    the runner's receive queue of them; the next wait reads one and ends the run naming it."""
    junk = P.encode_result("qkv", 0, 10**6, P.TensorMeta("float32", (1, 4)), 0.0)
    payload = bytes(200 * 1024)
    remote = connect(liar, "shm")
    try:
        before = rss_kib()
        liar.every = (0.001, [payload])
        time.sleep(2.0)                                          # the runner is busy elsewhere meanwhile
        grown_mib = (rss_kib() - before) / 1024
        liar.every = None
        assert grown_mib < 64, f"the runner's memory grew by {grown_mib:.0f} MiB"
        liar.on_call = lambda m, reply, s: [[junk]]
        with pytest.raises(RemoteError, match=r"bad reply|broke the protocol|failed op"):
            prefill(remote)
    finally:
        remote.close()


# ---- results: checked against what was asked -------------------------------------------------------------

def result_lie(op: str, make):
    """Lie on the first reply to `op`: make(m, reply, session) -> the messages sent instead."""
    def lie(m, reply, session):
        return make(m, reply, session) if m.op == op else [reply]
    return lie


def meta(dtype, shape, offset=None):
    return P.TensorMeta(dtype, tuple(shape), offset)


BAD_RESULTS = {
    "lm_head of 100 logits": (result_lie("lm_head", lambda m, r, s: [[
        P.encode_result("lm_head", None, m.id, meta("float32", (1, 100)), 0.0), bytes(400)]]),
        r"reply to op lm_head is float32\[1, 100\].*asked for float32\[1, 512\]"),
    "float16 for float32": (result_lie("qkv", lambda m, r, s: [[
        P.encode_result("qkv", m.layer, m.id, meta("float16", m.tensors[-1].shape), 0.0),
        bytes(2 * math.prod(m.tensors[-1].shape))]]), r"reply to op qkv is float16\[8, 256\].*asked for float32"),
    "another layer": (result_lie("down", lambda m, r, s: [[P.encode_result("down", 1 - m.layer, m.id,
                                                                           m.tensors[-1], 0.0), *r[1:]]]),
                      r"reply to op down \(layer 0\) is a result of op down \(layer 1\)"),
    "another op": (result_lie("o", lambda m, r, s: [[P.encode_result("down", m.layer, m.id, m.tensors[-1], 0.0),
                                                     *r[1:]]]), r"reply to op o \(layer 0\) is a result of op down"),
    "a call as the reply": (result_lie("embed", lambda m, r, s: [[P.encode_call("embed", None, m.id,
                                                                               [meta("int64", (8,))],
                                                                               meta("float32", (8, 128)))]]),
                            r"reply to op embed is a call"),
    "two records": (result_lie("qkv", lambda m, r, s: [[P.pack(P.RESULT, "qkv", m.layer, m.id,
                                                               [m.tensors[-1], m.tensors[-1]], 0.0), *r[1:]]]),
                    r"holds 2 tensor records"),
    "no tensor frame": (result_lie("gate_up", lambda m, r, s: [[r[0]]]), r"needs 1 tensor frame, got 0"),
    "an extra frame": (result_lie("gate_up", lambda m, r, s: [[*r, b"x"]]), r"needs 1 tensor frame, got 2"),
    "a short frame": (result_lie("down", lambda m, r, s: [[r[0], bytes(r[1])[:-4]]]),
                      r"answering op down \(layer 0\): frame of 4092 bytes"),
    "compute time NaN": (result_lie("qkv", lambda m, r, s: [[P.encode_result("qkv", m.layer, m.id, m.tensors[-1],
                                                                             math.nan), *r[1:]]]),
                         r"reports compute_s nan"),
    "compute time infinite": (result_lie("qkv", lambda m, r, s: [[P.encode_result("qkv", m.layer, m.id,
                                                                                  m.tensors[-1], math.inf), *r[1:]]]),
                              r"reports compute_s inf"),
    "an unknown id": (result_lie("o", lambda m, r, s: [[P.with_id(bytes(r[0]), m.id + 1000), *r[1:]]]),
                      r"a reply with id \d+, which no call in flight has"),
    "a reply twice": (lambda m, r, s: [r, r] if m.op == "embed" else [r],
                      r"a reply with id 1, which no call in flight has"),
    "a truncated header": (result_lie("qkv", lambda m, r, s: [[bytes(r[0])[:30], *r[1:]]]),
                           r"header of 30 bytes does not hold"),
    "an error with escapes": (result_lie("down", lambda m, r, s: [[P.error("\x1b]0;pwned\x07" * 300, m.id)]]),
                              r"failed op down \(layer 0\): \?\]0;pwned\?"),
    "junk": (result_lie("qkv", lambda m, r, s: [[os.urandom(64)]]), r"broke the protocol|bad reply|failed op"),
}


@pytest.mark.parametrize("case", list(BAD_RESULTS))
def test_a_bad_result_over_frames_is_refused_naming_the_op(liar, case):
    lie, match = BAD_RESULTS[case]
    liar.on_call = lie
    text = refused(liar, match)
    assert len(text) < 600, text


@pytest.mark.parametrize("case, lie, match", [
    ("another offset", lambda m, r, s: [[P.encode_result(m.op, m.layer, m.id, meta(m.tensors[-1].dtype,
                                                                                   m.tensors[-1].shape, 0), 0.0)]],
     r"\(offset 0\); asked for float32\[8, 128\] \(offset \d+\)"),
    ("a tensor frame with a shm result", lambda m, r, s: [[r[0], bytes(16)]], r"came with 1 tensor frame"),
    ("float16 for float32", lambda m, r, s: [[P.encode_result(m.op, m.layer, m.id, meta(
        "float16", m.tensors[-1].shape, m.tensors[-1].offset), 0.0)]], r"is float16\[8, 128\]"),
])
def test_a_bad_result_over_shared_memory_is_refused(liar, case, lie, match):
    liar.on_call = result_lie("embed", lie)
    refused(liar, match, transport="shm")


# ---- non-finite logits -----------------------------------------------------------------------------------

def poison():
    """NaN in every lm_head reply (shm: written into the arena; frames: the frame)."""
    def lie(m, reply, session):
        if m.op != "lm_head" or session is None:
            return [reply]
        out = m.tensors[-1]
        if out.offset is not None:
            session.arena.view(out).fill_(math.nan)
            return [reply]
        return [[reply[0], torch.full(out.shape, math.nan).numpy().tobytes()]]
    return lie


@pytest.mark.parametrize("transport", ["frames", "shm"])
def test_non_finite_logits_fail_the_prefill(liar, transport):
    liar.on_call = poison()
    refused(liar, r"the logits of the prefill hold 512 non-finite value\(s\) \(NaN or inf\) among 512",
            transport=transport)


def test_non_finite_logits_fail_generation_naming_the_decode_step(liar):
    seen = {"lm_head": 0}

    def lie(m, reply, session):
        if m.op == "lm_head":
            seen["lm_head"] += 1
            if seen["lm_head"] == 3:        # the prefill's, decode step 1's, then decode step 2's
                return poison()(m, reply, session)
        return [reply]
    liar.on_call = lie
    remote = connect(liar)
    try:
        model = TrustedModel(remote.cfg, remote.norms, remote)
        with pytest.raises(ValueError, match=r"the logits of decode step 2 hold 512 non-finite"):
            generate(model, TOKENS, 6, Sampling(), ignore_eos=True)
    finally:
        remote.close()


def test_the_cli_fails_on_nan_logits_instead_of_reporting_token_0(liar):
    liar.on_call = poison()
    rc, err, _ = run_measured(["--endpoint", liar.endpoint, "--transport", "frames", "--tokens", "8",
                               "--no-warmup", "--connect-timeout", "20"])
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "non-finite" in err and "next token" not in err, err


def test_the_cli_over_frames_without_a_model_takes_no_gigabyte_frame(liar):
    """The issue's case, as a user runs it: `tsqp run --transport frames` without --model, and a welcome with
    an extra 1 GiB frame. The runner's first connection takes a control message's size at most: the frame
    is dropped unread and the run ends with one line, its memory that of a runner that never saw it."""
    liar.on_hello = lambda head, frames, big=bytes(2**30): welcome(head, [*frames, big])
    try:
        rc, err, peak_kib = run_measured(["--endpoint", liar.endpoint, "--transport", "frames", "--tokens", "8",
                                          "--no-warmup", "--connect-timeout", "20"])
    finally:
        liar.reset()                    # the gigabyte goes with the lie
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "receive cap" in err, err
    assert peak_kib < 700 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"


# ---- deadlines: one per call, from its submit --------------------------------------------------------------

def test_junk_every_half_second_fails_within_the_timeout(liar):
    """The issue's case: nothing answers the call, replies with unknown ids arrive every 0.5 s, --timeout 3."""
    junk = P.encode_result("qkv", 0, 10**9, meta("float32", (1, 4)), 0.0)
    liar.on_call = lambda m, reply, s: []
    liar.every = (0.5, [junk])
    t0 = time.monotonic()
    refused(liar, r"a reply with id 1000000000, which no call in flight has", within_s=3.5)
    assert time.monotonic() - t0 < 3.5


@pytest.mark.parametrize("transport, control", [("frames", "socket"), ("shm", "socket")])
def test_silence_times_out_at_the_deadline(liar, transport, control):
    liar.on_call = lambda m, reply, s: []
    t0 = time.monotonic()
    refused(liar, r"no reply from .* within 3 s while waiting for op embed", transport=transport, control=control,
            within_s=4.0)
    assert time.monotonic() - t0 >= 2.9


def test_the_deadline_counts_from_submit_whatever_else_arrives(liar):
    """Two interleaved chunks keep two calls in flight; every call is answered but one (layer 1's qkv of the
    first chunk), and the other chunk's replies keep arriving: that call still fails 3 s after its submit."""
    held = {}

    def lie(m, reply, session):
        if m.op == "qkv" and m.layer == 1 and not held:
            held["at"] = time.monotonic()
            return []
        return [reply]
    liar.on_call = lie
    remote = connect(liar)
    try:
        with pytest.raises(ServerTimeout, match=r"within 3 s while waiting for op qkv \(layer 1\)"):
            prefill(remote, chunks=2)
        assert 2.9 <= time.monotonic() - held["at"] < 3.6
    finally:
        remote.close()


# ---- the control pipes, read by the runner -----------------------------------------------------------------

def pipe_runner(liar) -> tuple[RemoteOffload, object]:
    """A shm runner with control pipes, and the server side's end of them (the fake serves nothing on them)."""
    remote = connect(liar, "shm", control="pipes")
    session = [s for s in liar.server.sessions.values() if s.pipes is not None][-1]     # the newest
    return remote, session.pipes


def test_pipes_a_trickled_reply_times_out_at_the_deadline(liar):
    remote, pipes = pipe_runner(liar)
    try:
        model = TrustedModel(remote.cfg, remote.norms, remote)
        stop = threading.Event()

        def trickle():                      # a length promising 100 bytes, then a byte every 0.1 s
            os.write(pipes.out_fd, (100).to_bytes(4, "little"))
            while not stop.wait(0.1):
                os.write(pipes.out_fd, b"x")
        t = threading.Thread(target=trickle, daemon=True)
        t0 = time.monotonic()
        t.start()
        with pytest.raises(ServerTimeout, match=r"within 3 s while waiting for op embed \(control pipes\)"):
            model.prefill(TOKENS, model.new_cache(TOKENS.numel()))
        stop.set()
        t.join(5)
        assert 2.9 <= time.monotonic() - t0 < 4.0
    finally:
        remote.close()


@pytest.mark.parametrize("data, match", [
    ((2**31).to_bytes(4, "little"), r"control pipe.*length 2147483648 exceeds 65536"),
    ((70000).to_bytes(4, "little") + bytes(70000), r"length 70000 exceeds 65536"),
    ((5).to_bytes(4, "little") + b"junk!", r"broke the protocol|bad reply"),
])
def test_pipes_malformed_replies_are_named(liar, data, match):
    remote, pipes = pipe_runner(liar)
    try:
        model = TrustedModel(remote.cfg, remote.norms, remote)
        os.write(pipes.out_fd, data[:65536])
        with pytest.raises(RemoteError, match=match):
            model.prefill(TOKENS, model.new_cache(TOKENS.numel()))
    finally:
        remote.close()


def test_pipes_a_flood_is_read_in_bounded_steps(liar):
    """A server writing replies without pause: the runner reads a bounded amount, finds the first unknown id,
    and stops, instead of reading (and buffering) for as long as the writer keeps up."""
    remote, pipes = pipe_runner(liar)
    junk = P.encode_result("qkv", 0, 10**6, meta("float32", (1, 4)), 0.0)
    message = len(junk).to_bytes(4, "little") + junk
    stop = threading.Event()

    def flood():                        # 64 messages per write: under PIPE_BUF, so each write is whole or nothing
        while not stop.is_set():
            try:
                os.write(pipes.out_fd, message * 64)
            except BlockingIOError:
                time.sleep(0.0001)
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        model = TrustedModel(remote.cfg, remote.norms, remote)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"a reply with id 1000000, which no call in flight has"):
            model.prefill(TOKENS, model.new_cache(TOKENS.numel()))
        assert time.monotonic() - t0 < 1.0
        assert len(remote.channel.pipes.buf) < remote.channel.pipes.read_limit
    finally:
        stop.set()
        t.join(5)
        remote.close()


# ---- hypothesis: generated welcomes and results never crash or hang the runner ------------------------------

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12),
                 st.lists(st.integers(-5, 600), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                            max_size=2))
CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id"]
TOP_KEYS = ["type", "dtype", "model", "device", "fingerprint", "norms", "tensors", "config", "v"]
EDIT = st.one_of(
    st.tuples(st.just("config"), st.sampled_from(CONFIG_KEYS), JUNK),
    st.tuples(st.just("top"), st.sampled_from(TOP_KEYS), JUNK),
    st.tuples(st.just("drop"), st.sampled_from(CONFIG_KEYS + TOP_KEYS), st.none()),
    st.tuples(st.just("frames"), st.integers(-5, 3), st.binary(max_size=600)),
)


def apply_edits(head: dict, frames: list, edits) -> list:
    for kind, key, value in edits:
        if kind == "config" and isinstance(head.get("config"), dict):
            head["config"][key] = value
        elif kind == "top":
            head[key] = value
        elif kind == "drop":
            (head["config"] if key in CONFIG_KEYS and isinstance(head.get("config"), dict) else head).pop(key, None)
        elif key < 0:
            frames = frames[:key]
        else:
            frames = frames[:key] + [value] + frames[key:]
    return [[P.encode(head), *frames]]


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(EDIT, min_size=1, max_size=3), transport=st.sampled_from(["frames", "shm"]))
def test_fuzz_welcomes_never_crash_or_hang_the_runner(liar, edits, transport):
    liar.reset()
    liar.on_hello = lambda head, frames: apply_edits(head, frames, edits)
    t0 = time.monotonic()
    remote = None
    try:
        remote = connect(liar, transport, timeout_s=2.0, connect_timeout_s=2.0)
        assert torch.isfinite(prefill(remote)).all()        # an edit the runner may take (a name, a fingerprint)
    except CLEAN_ERRORS as e:
        assert str(e) and "\n" not in str(e), repr(e)
    finally:
        if remote is not None:
            remote.close()
    assert time.monotonic() - t0 < 4.5


RECORD = st.tuples(st.integers(0, 8), st.integers(0, 5), st.sampled_from([-1, 0, 256, 4096, -1]),
                   st.integers(0, 600), st.integers(0, 600), st.integers(0, 3), st.integers(0, 3))
REPLY = st.one_of(
    st.just("honest"), st.just("honest"),
    st.builds(lambda recs, frames, kind, code, layer: ("raw", kind, code, layer, recs, frames),
              st.lists(RECORD, max_size=3), st.lists(st.binary(max_size=256), max_size=2),
              st.sampled_from([P.RESULT, P.RESULT, P.CALL, 9]), st.integers(0, 10), st.integers(-2, 3)),
    st.tuples(st.just("bytes"), st.lists(st.binary(max_size=300), min_size=1, max_size=3)),
    st.tuples(st.just("json"), st.dictionaries(st.sampled_from(["v", "type", "id", "error", "op"]), JUNK)),
    st.tuples(st.just("scale"), st.sampled_from([math.nan, math.inf, -1.0, 0.0, 1e30])),
)


def forge(plan, m: P.Message, reply: list, session) -> list:
    if plan == "honest":
        return [reply]
    kind = plan[0]
    if kind == "raw":
        _, k, code, layer, recs, frames = plan
        head = P.HEAD.pack(P.MAGIC, P.VERSION, k, code, len(recs), layer, m.id, 0.0) + b"".join(
            P.TENSOR.pack(*r) for r in recs)
        return [[head, *frames]]
    if kind == "bytes":
        return [plan[1]]
    if kind == "json":
        return [[json.dumps(plan[1], default=str).encode()]]
    out = m.tensors[-1]                                   # "scale": honest header, the values scaled
    if out.offset is not None and session is not None and session.arena is not None:
        session.arena.view(out).mul_(plan[1])
        return [reply]
    if len(reply) == 2 and out.dtype == "float32":
        return [[reply[0], (torch.frombuffer(bytearray(reply[1]), dtype=torch.float32) * plan[1]).numpy().tobytes()]]
    return [reply]


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(plans=st.lists(REPLY, min_size=10, max_size=10), transport=st.sampled_from(["frames", "shm"]))
def test_fuzz_results_never_crash_or_hang_the_runner(liar, plans, transport):
    liar.reset()
    calls = iter(plans)
    liar.on_call = lambda m, reply, session: forge(next(calls, "honest"), m, reply, session)
    t0 = time.monotonic()
    remote = connect(liar, transport, timeout_s=1.5)
    try:
        logits = prefill(remote)
        assert torch.isfinite(logits).all()
    except CLEAN_ERRORS as e:
        assert str(e) and "\n" not in str(e), repr(e)
    finally:
        remote.close()
    assert time.monotonic() - t0 < 4.5
