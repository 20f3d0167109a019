"""The continuous-batching engine (tsqp/trusted/engine) on the real SmolLM2 GGUF, in-process: 16 chats
batched give each the tokens it gets alone (greedy, and seeded sampling), with far fewer offloaded calls;
under --protect otp --verify every stream's logits are bit-identical to its solo run; the scheduler's
admission, KV budget, cancellation and fairness on the same model."""
from __future__ import annotations

import pytest
import torch

from tsqp import weights as W
from tsqp.local import LocalOffload
from tsqp.stats import Stats
from tsqp.trusted.chat import ChatTemplate
from tsqp.trusted.engine.kv import BLOCK_TOKENS, kv_bytes_per_token
from tsqp.trusted.engine.sequence import Request
from tsqp.trusted.engine.step import Engine
from tsqp.trusted.generate import Sampling
from tsqp.trusted.model import TrustedModel
from tsqp.trusted.protect.masked import ProtectedOffload, QuantizedModel
from tsqp.trusted.tokenizer import Tokenizer
from tsqp.untrusted.compute import Compute
from tsqp.untrusted.intmm import IntCompute

TOPICS = ["the sea", "a cat", "Paris", "the moon", "bread", "winter", "a robot", "music", "trees", "the sun",
          "a dragon", "coffee", "rain", "a river", "chess", "the stars"]
MiB = 2**20


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(cfg, float32 weights, tokenizer, chat template) loaded once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # two shared cores: one thread each side is fastest
    cfg, weights = W.load(str(smollm2_gguf), torch.float32, "cpu")
    tokenizer = Tokenizer(smollm2_gguf)
    yield cfg, weights, tokenizer, ChatTemplate.from_source(str(smollm2_gguf), tokenizer)
    torch.set_num_threads(threads)


def chats(smollm2, n: int) -> list[list[int]]:
    _, _, tokenizer, template = smollm2
    return [template.prompt_ids(tokenizer, [{"role": "user", "content": f"Write one sentence about {t}."}])
            for t in TOPICS[:n]]


def plain_model(smollm2) -> TrustedModel:
    cfg, weights, _, _ = smollm2
    compute = Compute(cfg, weights, "cpu")
    return TrustedModel(cfg, W.norm_weights(weights), LocalOffload(compute, Stats()))


def protected_model(smollm2, quantized) -> TrustedModel:
    cfg, weights, _, _ = smollm2
    offload = ProtectedOffload(LocalOffload(IntCompute(cfg, weights, "cpu"), Stats()), cfg, quantized, verify=True,
                               pool_tokens=16, background=False)
    return TrustedModel(cfg, W.norm_weights(weights), offload)


class Recorder:
    """One request's tokens and (optionally) each step's logits, and how it ended."""

    def __init__(self, keep_logits: bool = False):
        self.tokens, self.logits, self.end, self.keep = [], [], None, keep_logits

    def request(self, ids, max_new, sampling=Sampling(), stop_ids=frozenset()) -> Request:
        def on_token(token, logits):
            self.tokens.append(token)
            if self.keep:
                self.logits.append(logits.clone())
            return False
        return Request(ids, max_new, sampling, frozenset(stop_ids), on_token,
                       lambda reason, error: setattr(self, "end", (reason, error)))


def run_alone_and_together(engine_of, prompts, max_new, samplings, keep_logits=False):
    """Each prompt alone on a fresh engine, then all of them on one: (alone, together) Recorders."""
    alone = []
    for ids, s in zip(prompts, samplings):
        engine, r = engine_of(), Recorder(keep_logits)
        engine.add(r.request(ids, max_new, s))
        engine.run()
        alone.append(r)
    engine = engine_of()
    together = [Recorder(keep_logits) for _ in prompts]
    for r, ids, s in zip(together, prompts, samplings):
        engine.add(r.request(ids, max_new, s))
    engine.run()
    return alone, together, engine


@pytest.mark.parametrize("n", [4, pytest.param(16, marks=pytest.mark.slow)])
def test_chats_batched_give_what_each_gets_alone(smollm2, n):
    """n chats at once, a quarter of them seeded sampled (16: 12 greedy and 4 sampled, ~50 s): every stream's
    tokens equal its solo run's, and the batch made one offloaded call per op per step for all of them."""
    model = plain_model(smollm2)
    prompts = chats(smollm2, n)
    samplings = [Sampling()] * (n - n // 4) + [Sampling.make(0.9, 40, 0.95, seed=100 + i) for i in range(n // 4)]
    engines, together_calls = [], []

    def engine_of():                      # the last one made runs every prompt together: count its calls
        if len(engines) == n:
            together_calls.append(-model.offload.stats.rpc_calls)
        engines.append(Engine(model, 256 * MiB, 16, 64))
        return engines[-1]
    alone, together, engine = run_alone_and_together(engine_of, prompts, 12, samplings)
    together_calls[0] += model.offload.stats.rpc_calls
    for i, (a, t) in enumerate(zip(alone, together)):
        assert a.end == ("length", None) and t.end == ("length", None)
        assert t.tokens == a.tokens, f"stream {i} ({TOPICS[i]}): batched {t.tokens} alone {a.tokens}"
    assert len({tuple(t.tokens) for t in together}) == n             # n different answers, not one repeated
    # one call per op per step, for every row: embed, 4 per layer, and the LM head when a row wants logits
    calls_per_step = 2 + 4 * model.cfg.num_layers
    assert engine.steps * (calls_per_step - 1) <= together_calls[0] <= engine.steps * calls_per_step
    assert engine.steps <= 12 + sum(-(-len(p) // 48) for p in prompts)   # decode steps + prefill chunks (48)
    assert together_calls[0] * (n // 4) < model.offload.stats.rpc_calls - together_calls[0]   # vs the solo runs


@pytest.mark.parametrize("n", [2, pytest.param(16, marks=pytest.mark.slow)])
def test_protected_batched_logits_are_bit_identical_to_solo(smollm2, n):
    """--protect otp --verify: n chats at once (16: ~160 s), every row with its own fresh pad, every result checked; each
    stream's logits at every step equal its solo run's bit for bit (the integer arithmetic is exact and the
    trusted side's math is per row and per sequence)."""
    cfg, weights, _, _ = smollm2
    quantized = QuantizedModel(cfg, weights)
    prompts = chats(smollm2, n)
    models = []

    def engine_of():
        models.append(protected_model(smollm2, quantized))
        return Engine(models[-1], 256 * MiB, 16, 64)
    alone, together, engine = run_alone_and_together(engine_of, prompts, 4, [Sampling()] * n, keep_logits=True)
    for i, (a, t) in enumerate(zip(alone, together)):
        assert t.end == ("length", None) and len(t.logits) == 4
        for step, (x, y) in enumerate(zip(a.logits, t.logits)):
            assert torch.equal(x, y), f"stream {i} step {step}: max diff {(x - y).abs().max()}"
    offload = models[-1].offload
    assert offload.checked_rows >= sum(len(p) for p in prompts)      # every row was checked
    pool = offload.pool.stats()
    assert pool["pads_consumed"] >= sum(len(p) + 3 for p in prompts) * (4 * cfg.num_layers)


# ---- the scheduler on the real model ----------------------------------------------------------------------
def test_admission_waits_for_the_kv_budget_and_refuses_what_never_fits(smollm2):
    model = plain_model(smollm2)
    per_block = BLOCK_TOKENS * kv_bytes_per_token(model.cfg, 4)
    engine = Engine(model, 4 * per_block, 16, 64)                   # room for 64 positions
    prompts = chats(smollm2, 3)
    first, second = Recorder(), Recorder()
    engine.add(first.request(prompts[0][:30], 2))                  # 32 positions: 2 blocks
    engine.add(second.request(prompts[1][:40], 8))                 # 48 positions: 3 blocks, waits
    engine.step()
    assert [len(engine.scheduler.running), len(engine.scheduler.waiting)] == [1, 1]
    engine.run()
    assert first.end == ("length", None) and second.end == ("length", None) and engine.kv.used == 0
    with pytest.raises(ValueError, match="positions of KV cache"):
        engine.add(Recorder().request(prompts[2], 64 - len(prompts[2]) + 1))


def test_cancelled_leaves_at_the_next_step_and_a_long_prompt_never_stalls_decodes(smollm2):
    model = plain_model(smollm2)
    engine = Engine(model, 256 * MiB, 16, 40)                       # prefill chunks of 24 tokens
    prompts = chats(smollm2, 4)
    rs = [Recorder() for _ in range(3)]
    for r, ids in zip(rs, prompts):
        engine.add(r.request(ids, 50))
    while any(s.prefilling for s in engine.scheduler.running) or not engine.scheduler.running:
        engine.step()
    long_prompt = (prompts[3] * 10)[:300]
    late = Recorder()
    engine.add(late.request(long_prompt, 2))
    for _ in range(4):
        before = {id(s): s.computed for s in engine.scheduler.running}
        rows = engine.step()
        assert rows <= 40
        decoding = [s for s in engine.scheduler.running if s.request.ids is not long_prompt]
        assert all(s.computed == before[id(s)] + 1 for s in decoding)   # every decode advanced this step
    cancel = engine.scheduler.running[0].request.cancelled
    cancel.set()
    n = len(rs[0].tokens)
    engine.step()
    assert rs[0].end == ("cancelled", None) and len(rs[0].tokens) == n
    engine.run()
    assert late.end == ("length", None) and engine.kv.used == 0


# ---- a server caught altering a result -------------------------------------------------------------------
class FlippingCompute:
    """IntCompute that flips one bit of every result, as `tsqp serve --protect otp --inject-faults flip` does."""

    def __init__(self, compute):
        from tsqp.untrusted.faults import FaultInjector
        self.compute, self.faults = compute, FaultInjector("flip")

    def __getattr__(self, name):
        return getattr(self.compute, name)

    def run(self, op, layer, inputs, out=None):
        y, seconds = self.compute.run(op, layer, inputs, out)
        return self.faults.apply(op, layer, y), seconds


class FlippedSession:
    def __init__(self, smollm2, quantized):
        cfg, weights, _, _ = smollm2
        self.offload = ProtectedOffload(LocalOffload(FlippingCompute(IntCompute(cfg, weights, "cpu")), Stats()), cfg,
                                        quantized, verify=True, pool_tokens=16, background=False)
        self.model = TrustedModel(cfg, W.norm_weights(weights), self.offload)

    def alive(self, timeout_s):
        return True

    def close(self):
        self.offload.close()


@pytest.mark.parametrize("reconnect", [False, True])
def test_a_failed_verification_ends_every_request_and_shuts_the_server_out(smollm2, capsys, reconnect):
    """Every request in the engine gets the error; the failure is logged (op, layer, session, time) and
    counted; by default later requests fail at once without a new session, with reconnect each gets one."""
    import threading

    from tsqp.trusted.engine.loop import EngineLoop, ServerShutOut
    from tsqp.trusted.protect.freivalds import VerificationError
    cfg, weights, _, _ = smollm2
    quantized = QuantizedModel(cfg, weights)
    loop = EngineLoop(lambda: FlippedSession(smollm2, quantized), lambda s: Engine(s.model, 64 * MiB, 4, 36),
                      "in-process", idle_s=60, check_s=1, reconnect_after_verification_failure=reconnect)
    try:
        def ask(n: int) -> list:
            ends, done = [], threading.Event()

            def on_end(reason, error):
                ends.append((reason, error))
                if len(ends) == n:
                    done.set()
            for ids in chats(smollm2, n):
                loop.submit(Request(ids, 4, on_end=on_end))
            assert done.wait(120), "the requests did not end"
            return ends
        first = ask(2)
        assert all(reason == "error" and isinstance(e, VerificationError) for reason, e in first)
        assert len({str(e) for _, e in first}) == 1                     # the same error for every request
        second = ask(1)
        assert second[0][0] == "error" and isinstance(second[0][1], VerificationError)
        assert isinstance(second[0][1], ServerShutOut) != reconnect     # at once, or from a fresh session
        h = loop.health
        assert h.verification_failures == 1 + reconnect and h.sessions_opened == 1 + reconnect
        assert h.state == ("serving" if reconnect else "shut out") or h.state == "unavailable"
        assert h.failures[0]["op"] == "qkv" and h.failures[0]["layer"] == 0 and h.failures[0]["session"] == 1
    finally:
        loop.close(30)
    log = capsys.readouterr().err
    assert log.count("VERIFICATION FAILED") == 1 + reconnect and "op 'qkv' layer 0" in log
