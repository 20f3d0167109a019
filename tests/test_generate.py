"""Generation: greedy tokens against transformers' generate, KV-cached decode against a full recompute,
sampling filters against transformers' logits warpers, and `tsqp run --prompt` with a tokenizer.json
built here with the `tokenizers` library.

Through the real two-process path: one `tsqp serve` process on a transformers checkpoint (GQA, llama3
rope, head_dim != hidden/heads), the runner in this process (RemoteOffload) or as the `tsqp run` CLI.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import tsqp.trusted.model
from conftest import CHECKPOINTS, make_checkpoint, serving
from tsqp.config import ModelConfig
from tsqp.ops import matmul_widths
from tsqp.trusted.generate import Sampling, filter_logits, generate, sample
from tsqp.trusted.model import TrustedModel
from tsqp.wire.client import RemoteOffload
from tsqp.commands.run import open_tokenizer
from tsqp.stats import Stats
from tsqp.trusted.tokenizer import Tokenizer, TokenizerError

NEW = 32
POLICIES = getattr(tsqp.trusted.model, "POLICIES", ("linear", "seed"))
SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the quick brown fox jumps over the lazy dog",
             "café crème brûlée, naïve résumé", "tokens stream out one at a time", "東京 ünïcödé ok"]


def build_tokenizer(vocab_size: int):
    """A byte-level BPE (Llama-3's kind) trained on a few sentences, with a BOS post-processor: every id of
    the checkpoint's vocabulary decodes to bytes, so random generations exercise split UTF-8 characters."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= vocab_size
    return tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", seed=7, **CHECKPOINTS["gqa_llama3_tied"])
    build_tokenizer(ModelConfig.from_dir(path).vocab_size).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def endpoint(ckpt):
    with serving(ckpt) as (ep, _):
        yield ep


@pytest.fixture(scope="module")
def remote(endpoint):
    """The trusted runner's side of the wire in this process, over raw frames (the CLI tests use shm)."""
    remote = RemoteOffload(endpoint, "frames", timeout_s=60.0, stats=Stats())
    yield remote
    remote.close()


@pytest.fixture(scope="module")
def model(remote):
    return TrustedModel(remote.cfg, remote.norms, remote, "linear", remote.stats)


def run_cli(*args, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    """`python -m tsqp.cli ARGS` as a real process; stdout/stderr as raw bytes decoded as UTF-8 (no newline
    translation, so streamed text compares exactly)."""
    r = subprocess.run([sys.executable, "-m", "tsqp.cli", *map(str, args)], capture_output=True, timeout=timeout_s,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    r.stdout, r.stderr = r.stdout.decode("utf-8"), r.stderr.decode("utf-8")
    return r


def prompt_ids(vocab: int, n: int = 40, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(path, ids: list[int], n: int) -> list[int]:
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():   # eos_token_id=None: run to n tokens, as --ignore-eos does
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == len(ids) + n, "transformers stopped early"
    return out[0, len(ids):].tolist()


def wire_bytes_per_token(cfg: ModelConfig) -> int:
    """Tensor bytes one decode step has to move (float32, T=1): embed's id in and row out, per layer qkv,
    o, gate_up and down in and out, the LM head's input row and logits."""
    per_layer = sum(sum(matmul_widths(cfg, op)) for op in ("qkv", "o", "gate_up", "down"))
    return 8 + 4 * (cfg.hidden_size + cfg.num_layers * per_layer + sum(matmul_widths(cfg, "lm_head")))


# ---- greedy against transformers, through the CLI ----------------------------------------------------
def test_greedy_matches_transformers_generate(ckpt, endpoint, tmp_path):
    cfg = ModelConfig.from_dir(ckpt)
    ids = prompt_ids(cfg.vocab_size)
    out = tmp_path / "gen.json"
    r = run_cli("run", "--endpoint", endpoint, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", NEW,
                "--ignore-eos", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["prompt_ids"] == ids
    assert result["generated_ids"] == hf_greedy(ckpt, ids, NEW)
    # without a tokenizer (none given, the runner's --model is a preset) the ids are streamed
    assert " ".join(map(str, result["generated_ids"])) in r.stdout

    s = result["stats"]
    assert s["new_tokens"] == NEW and s["decode_steps"] == NEW - 1 and s["stop"] == "max_new_tokens"
    assert s["ttft_s"] > 0 and 0 < s["decode_ms_p50"] <= s["decode_ms_p90"] and s["tokens_per_s"] > 0
    assert s["rpc_per_token"] == 4 * cfg.num_layers + 2          # embed, qkv/o/gate_up/down per layer, lm_head
    tensors = wire_bytes_per_token(cfg)
    assert tensors <= s["bytes_per_token"] <= tensors + 1024 * s["rpc_per_token"]   # plus small headers
    assert result["settings"]["transport"] == "shm" and result["settings"]["sampling"]["temperature"] == 0


# ---- the KV cache against a full recompute ------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_cached_decode_equals_full_recompute(remote, policy):
    model = TrustedModel(remote.cfg, remote.norms, remote, policy, remote.stats)
    cfg = model.cfg
    ids = prompt_ids(cfg.vocab_size, n=9, seed=1)
    seen = []
    gen = generate(model, torch.tensor(ids), 10, ignore_eos=True,
                   on_token=lambda token, logits: seen.append(logits.clone()))
    assert len(seen) == len(gen.ids) == 10
    for i, logits in enumerate(seen):
        seq = torch.tensor(ids + gen.ids[:i])
        full = model.prefill(seq, model.new_cache(seq.numel())).clone()
        err = float((logits - full).abs().max())
        assert err <= 1e-4 * float(full.abs().max()), f"step {i}: max abs error {err:.3g}"
        assert int(full.argmax()) == gen.ids[i]


# ---- sampling -----------------------------------------------------------------------------------------
def hf_filtered(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The oracle: transformers' warpers in generate's order (temperature, top-k, top-p)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    x = logits[None].clone()
    x = TemperatureLogitsWarper(s.temperature)(None, x)
    if s.top_k:
        x = TopKLogitsWarper(s.top_k)(None, x)
    if s.top_p < 1.0:
        x = TopPLogitsWarper(s.top_p)(None, x)
    return x[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0),
                                                     (1.0, 0, 0.6), (0.8, 10, 0.9), (1.0, 1, 1.0)])
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    s = Sampling.make(temperature, top_k, top_p, seed=0)
    for seed in range(20):
        logits = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * 3
        ours, ref = torch.softmax(filter_logits(logits, s), -1), torch.softmax(hf_filtered(logits, s), -1)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_filters_on_a_small_vector():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def probs(**kw):
        return torch.softmax(filter_logits(logits, Sampling.make(seed=0, **kw)), -1)

    kept_two = torch.tensor([0.625, 0.375, 0.0, 0.0])
    torch.testing.assert_close(probs(top_p=0.7), kept_two)               # 0.5 < 0.7 <= 0.5 + 0.3
    torch.testing.assert_close(probs(top_p=0.85), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    torch.testing.assert_close(probs(top_p=0.1), torch.tensor([1.0, 0.0, 0.0, 0.0]))  # the first always stays
    torch.testing.assert_close(probs(top_k=2), kept_two)
    torch.testing.assert_close(probs(temperature=0.5), torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365)
    torch.testing.assert_close(probs(temperature=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))


def test_sample_is_seeded():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    s = Sampling.make(temperature=1.0, seed=11)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, s, g) for _ in range(50)]

    assert draws(11) == draws(11) and draws(11) != draws(12)
    assert Sampling.make().greedy and Sampling.make(top_k=5).temperature == 1.0
    with pytest.raises(ValueError, match="temperature"):
        Sampling.make(temperature=0.0, top_k=5)


def test_generation_seed_and_top_k_one(model):
    ids = torch.tensor(prompt_ids(model.cfg.vocab_size, n=6, seed=2))

    def run(**kw):
        return generate(model, ids, 10, Sampling.make(**kw), ignore_eos=True).ids

    assert run(temperature=1.5, seed=3) == run(temperature=1.5, seed=3)
    assert run(temperature=1.5, seed=3) != run(temperature=1.5, seed=4)
    assert run(temperature=1.5, top_k=1, seed=5) == run()


# ---- limits and errors --------------------------------------------------------------------------------
def test_max_positions_refused_before_anything_starts(model, endpoint):
    cfg = model.cfg
    calls = model.offload.stats.rpc_calls
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, torch.tensor([1, 2, 3]), cfg.max_position_embeddings - 2)
    assert model.offload.stats.rpc_calls == calls

    r = run_cli("run", "--endpoint", endpoint, "--prompt-ids", "1,2,3", "--max-new-tokens",
                cfg.max_position_embeddings, "--no-warmup", timeout_s=60)
    assert r.returncode == 2
    assert "max_position_embeddings" in r.stderr and str(cfg.max_position_embeddings) in r.stderr
    assert "Prompt" not in r.stdout


def test_prompt_needs_a_tokenizer(tmp_path):
    args = Namespace(prompt="hello", chat=None, tokenizer=None, model="random:tiny")
    with pytest.raises(TokenizerError, match="--tokenizer"):
        open_tokenizer(args)
    with pytest.raises(TokenizerError, match="not found"):
        open_tokenizer(Namespace(prompt="hello", chat=None, tokenizer=None, model=str(tmp_path)))
    assert open_tokenizer(Namespace(prompt=None, chat=None, tokenizer=None, model=str(tmp_path))) is None


# ---- text ---------------------------------------------------------------------------------------------
def test_stream_decoder_joins_to_full_decode(ckpt, tmp_path):
    """Random ids (byte-level: many split UTF-8 characters) and a word-level tokenizer without a decoder."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    words = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    words.save(str(tmp_path / "words.json"))
    rng = random.Random(0)
    for tok in (Tokenizer(ckpt), Tokenizer(tmp_path / "words.json")):
        vocab = tok.tok.get_vocab_size()
        for _ in range(300):
            ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 24))]
            stream = tok.stream()
            assert "".join(stream.step(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_prompt_text_streams_through_the_cli(ckpt, endpoint, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(ckpt / "tokenizer.json"))
    text = "the cat sat on the mat"
    out = tmp_path / "text.json"
    r = run_cli("run", "--endpoint", endpoint, "--model", ckpt, "--prompt", text, "--max-new-tokens", 8,
                "--ignore-eos", "--json", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["prompt_ids"] == tok.encode(text).ids and result["prompt_ids"][0] == 1   # BOS added
    assert len(result["generated_ids"]) == 8
    # the streamed text is exactly the decode of the generated ids
    head = f"Prompt ({len(result['prompt_ids'])} tokens): {text}\n"
    streamed = r.stdout.split(head, 1)[1].split("\n-- 8 new tokens", 1)[0]
    assert streamed == tok.decode(result["generated_ids"]) == result["text"]
    assert result["settings"]["tokenizer"] == str(ckpt / "tokenizer.json")
