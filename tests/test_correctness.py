"""The runtime against the oracle: transformers' LlamaForCausalLM (float32) on the same checkpoint and input.

Through the real two-process path: `tsqp serve` subprocesses (one per checkpoint x dtype, started together),
the trusted runner in this process via RemoteOffload, and the `tsqp run` CLI with --dump-logits.
float32: max abs error <= 1e-4 * max|ref|. bfloat16: same argmax and cosine >= 0.999.
"""
from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CHECKPOINTS, hf_logits, run_cli_many, serving_all
from tsqp import weights as W
from tsqp.untrusted.compute import Compute
from tsqp.config import PRESETS, ModelConfig
from tsqp.trusted.model import Elementwise, KVCache, Rope, TrustedModel, rope_tables
from tsqp.local import LocalOffload
from tsqp.wire.client import RemoteOffload
from tsqp.stats import Stats

T = 24            # long enough that a wrong rope (e.g. scaling ignored) shows above 1e-4
DTYPES = ("float32", "bfloat16")


def prompt(vocab: int, n: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def assert_close(logits: torch.Tensor, ref: torch.Tensor, dtype: str) -> None:
    assert logits.shape == ref.shape and logits.dtype == torch.float32
    if dtype == "float32":
        err = float((logits - ref).abs().max())
        assert err <= 1e-4 * float(ref.abs().max()), f"max abs error {err:.3g} vs max|ref| {float(ref.abs().max()):.3g}"
    else:
        cos = float(F.cosine_similarity(logits, ref, dim=0))
        assert int(logits.argmax()) == int(ref.argmax()), f"argmax {int(logits.argmax())} != {int(ref.argmax())}"
        assert cos >= 0.999, f"cosine {cos:.6f}"


@pytest.fixture(scope="module")
def oracle(checkpoints):
    """name -> (ids [T], reference logits [V]) from transformers, float32."""
    out = {}
    for name, path in checkpoints.items():
        ids = prompt(ModelConfig.from_dir(path).vocab_size)
        out[name] = ids, hf_logits(path, ids)
    return out


@pytest.fixture(scope="module")
def servers(checkpoints):
    """(checkpoint, dtype) -> endpoint of a real `tsqp serve` process."""
    keys = [(name, dtype) for name in CHECKPOINTS for dtype in DTYPES]
    # one torch thread each: the models are tiny and the test machine has 2 cores
    with serving_all([dict(model=checkpoints[n], dtype=d, extra=("--threads", "1")) for n, d in keys]) as started:
        yield {k: ep for k, (ep, _) in zip(keys, started)}


def remote_logits(endpoint: str, ids: torch.Tensor, policy: str, transport: str, chunks: int) -> torch.Tensor:
    stats = Stats()
    remote = RemoteOffload(endpoint, transport, timeout_s=30, stats=stats)
    try:
        model = TrustedModel(remote.cfg, remote.norms, remote, policy, stats)
        logits = model.prefill(ids, model.new_cache(ids.numel()), chunks)
    finally:
        remote.close()
    # one request per offloaded step; seed adds QK^T and PV per layer
    per_layer = 6 if policy == "seed" else 4
    assert stats.rpc_calls == chunks * (1 + per_layer * remote.cfg.num_layers) + 1
    return logits


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("transport", ["shm", "frames"])
@pytest.mark.parametrize("policy", ["linear", "seed", "flash"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_two_process_matches_transformers(servers, oracle, name, dtype, policy, transport, chunks):
    ids, ref = oracle[name]
    logits = remote_logits(servers[name, dtype], ids, policy, transport, chunks)
    assert_close(logits, ref, dtype)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_prefill_then_decode_matches_transformers(servers, oracle, name):
    """The KV cache across calls: prefill T-1 tokens, decode the last one (T=1 with start > 0)."""
    ids, ref = oracle[name]
    remote = RemoteOffload(servers[name, "float32"], "shm", timeout_s=30)
    try:
        model = TrustedModel(remote.cfg, remote.norms, remote, "linear")
        cache = KVCache(remote.cfg, ids.numel())
        model.prefill(ids[:-1], cache, 2)
        logits = model.decode(int(ids[-1]), cache)
    finally:
        remote.close()
    assert_close(logits, ref, "float32")


@pytest.mark.parametrize("policy", ["linear", "seed", "flash"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_local_matches_transformers(checkpoints, oracle, name, dtype, policy):
    ids, ref = oracle[name]
    cfg, weights = W.load(str(checkpoints[name]), W.torch_dtype(dtype), "cpu")
    norms = W.norm_weights(weights)
    model = TrustedModel(cfg, norms, LocalOffload(Compute(cfg, weights, "cpu")), policy)
    assert_close(model.prefill(ids, model.new_cache(ids.numel()), 3), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_elementwise_matches_transformers(checkpoints, oracle, dtype):
    """--compile: RMSNorm, RoPE and SiLU fused by torch.compile (C++ through inductor) against the oracle."""
    ids, ref = oracle["gqa_llama3_tied"]
    cfg, weights = W.load(str(checkpoints["gqa_llama3_tied"]), W.torch_dtype(dtype), "cpu")
    norms = W.norm_weights(weights)
    model = TrustedModel(cfg, norms, LocalOffload(Compute(cfg, weights, "cpu")), "linear", fused=True)
    assert_close(model.prefill(ids, KVCache(cfg, ids.numel())), ref, dtype)
    assert model.ew.fused            # compiled, not fallen back to eager


@pytest.mark.parametrize("T,start", [(5, 0), (3, 6)])     # a prompt, and a later chunk of it
def test_compiled_steps_match_eager(T, start):
    """Each fused step against its eager form, writing into KV-cache views as the model does."""
    H, KV, hd, D, I = 4, 2, 8, 32, 48
    rope = Rope(SimpleNamespace(head_dim=hd, rope_theta=10000.0, rope_scaling=None))
    cos, sin = rope_tables(*rope.tables(start, T))
    qkv = torch.randn(T, (H + 2 * KV) * hd).bfloat16()
    h, y, w = torch.randn(T, D), torch.randn(T, D).bfloat16(), torch.rand(D)
    gate_up = torch.randn(T, 2 * I).bfloat16()
    outs = []
    for ew in (Elementwise(fused=False), Elementwise(fused=True)):
        k, v = torch.zeros(2, KV, 9, hd, dtype=torch.bfloat16), torch.zeros(2, KV, 9, hd, dtype=torch.bfloat16)
        q, normed, act = torch.empty(T, H, hd, dtype=torch.bfloat16), torch.empty(T, D).bfloat16(), \
            torch.empty(T, I).bfloat16()
        ew.call("rope_qkv", qkv, cos, sin, q, k[1, :, start:start + T].transpose(0, 1),
                v[1, :, start:start + T].transpose(0, 1))
        h_next = ew.call("add_rmsnorm", h.clone(), y, w, 1e-5, normed)
        ew.call("silu_mul", gate_up, act)
        assert ew.fused == (len(outs) == 1)
        outs.append((q, k, v, h_next, normed, act))
    for eager, fused in zip(*outs):
        torch.testing.assert_close(fused.float(), eager.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(outs[1][2][1, :, start:start + T].transpose(0, 1), qkv[:, (H + KV) * hd:].view(T, KV, hd))
    assert not outs[1][1][0].any() and not outs[1][1][1, :, :start].any()    # nothing written outside the slot


def test_compile_failure_falls_back_to_eager(monkeypatch, capsys):
    """No C++ compiler (e.g. inside an SGX enclave): --compile warns once and computes eagerly."""
    def broken(f, **kw):
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    ew = Elementwise(fused=True)
    gate_up, out = torch.randn(3, 8), torch.empty(3, 4)
    ew.call("silu_mul", gate_up, out)
    assert torch.equal(out, F.silu(gate_up[:, :4]) * gate_up[:, 4:])
    assert not ew.fused and "--compile failed" in capsys.readouterr().err


CLI_CASES = [("gqa_llama3_tied", "float32", "seed", "frames"), ("mha_plain_untied", "bfloat16", "linear", "shm")]


def test_cli_dump_logits_matches_transformers(servers, oracle, tmp_path):
    """`tsqp run --dump-logits` (a second process) against the oracle; the cases run at once."""
    argvs = []
    for i, (name, dtype, policy, transport) in enumerate(CLI_CASES):
        ids = oracle[name][0]
        argvs.append(["run", "--endpoint", servers[name, dtype], "--prompt-ids", ",".join(map(str, ids.tolist())),
                      "--policy", policy, "--transport", transport, "--chunks", 2, "--no-warmup",
                      "--dump-logits", tmp_path / f"{i}.npy"])
    for i, ((name, dtype, *_), r) in enumerate(zip(CLI_CASES, run_cli_many(argvs))):
        assert r.returncode == 0, r.stderr
        logits = np.load(tmp_path / f"{i}.npy")
        assert logits.dtype == np.float32
        assert_close(torch.from_numpy(logits), oracle[name][1], dtype)


def test_random_preset_matches_transformers():
    """The built-in preset's weights, given to transformers as a LlamaForCausalLM, agree with --local.
    (rope_scaling is copied: transformers edits the dict it is given, and the presets share theirs.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, weights = W.load("random:tiny@3", torch.float32)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling), max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings)).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}   # tied: lm_head is the embedding
    ids = prompt(cfg.vocab_size)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, -1]
    norms = W.norm_weights(weights)
    model = TrustedModel(cfg, norms, LocalOffload(Compute(cfg, weights, "cpu")))
    assert_close(model.prefill(ids, KVCache(cfg, ids.numel())), ref, "float32")


# ---- the random presets --------------------------------------------------------------------------------

def test_random_preset_is_deterministic_for_a_seed():
    _, a = W.load("random:tiny@5", torch.float32)
    _, b = W.load("random:tiny@5", torch.float32)
    _, c = W.load("random:tiny@6", torch.float32)
    _, d = W.load("random:tiny", torch.float32)
    _, e = W.load("random:tiny@0", torch.float32)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(not torch.equal(a[k], c[k]) for k in a)
    assert all(torch.equal(d[k], e[k]) for k in d)      # no seed means seed 0


# Llama-3.2-1B's config.json as published (meta-llama/Llama-3.2-1B)
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}


def test_llama_32_1b_preset_has_the_exact_shapes():
    """Config only: the weights (1.2 B parameters) are not built in the tests."""
    cfg = W.load_config("random:llama-3.2-1b")
    assert cfg is PRESETS["llama-3.2-1b"]
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.vocab_size) == (16, 2048, 32, 8, 64, 8192, 128256)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA_32_1B["rope_scaling"]
    published = ModelConfig.from_hf(LLAMA_32_1B, "Llama-3.2-1B/config.json")
    for f in fields(ModelConfig):
        if f.name != "eos_token_id":     # the instruct variant lists three; the preset takes those
            assert getattr(cfg, f.name) == getattr(published, f.name), f.name
    # Llama-3.2-1B has 1,235,814,400 parameters (tied head counted once)
    assert sum(int(np.prod(s)) for s in W.expected_shapes(cfg).values()) == 1_235_814_400


def test_score_gives_every_positions_logits_as_prefill_gives_the_last(checkpoints):
    """TrustedModel.score (teacher-forced evaluation) row i equals prefill of ids[:i+1]'s last logits."""
    cfg, weights = W.load(str(checkpoints["gqa_llama3_tied"]), torch.float32, "cpu")
    model = TrustedModel(cfg, W.norm_weights(weights), LocalOffload(Compute(cfg, weights, "cpu")), "linear")
    ids = prompt(cfg.vocab_size)[:9]
    every = model.score(ids, model.new_cache(ids.numel()))
    assert every.shape == (9, cfg.vocab_size)
    for i in (0, 4, 8):
        torch.testing.assert_close(every[i], model.prefill(ids[:i + 1], model.new_cache(i + 1)), rtol=1e-5, atol=1e-5)
