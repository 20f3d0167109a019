"""The real SmolLM2-135M-Instruct GGUF through tsqp (config, weights, in-process model) against transformers
loading the same file (float32), and the Hugging Face directory the smollm2_dir fixture writes from it."""
from __future__ import annotations

import pytest
import torch

from tsqp.untrusted.compute import Compute
from tsqp.gguf_checkpoint import read, read_config
from tsqp.trusted.model import TrustedModel
from tsqp.local import LocalOffload
from tsqp.trusted.tokenizer import Tokenizer
from tsqp.trusted.chat import ChatTemplate
from tsqp.weights import expected_shapes, load

PROMPTS = ["The capital of France is",
           "Photosynthesis is the process by which green plants",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who"]
LOGITS_ATOL = 2e-4      # float32 on both sides over 30 layers (measured ~2e-5); logits span about +-30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 135M model's matmuls are too small to share out: on two busy cores torch's worker threads spin,
    and the module takes minutes instead of well under one (both sides run with the same setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(smollm2_gguf):
    cfg, weights = read(smollm2_gguf, torch.float32)
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    return cfg, weights, TrustedModel(cfg, norms, LocalOffload(Compute(cfg, weights, "cpu")), policy="linear")


def test_config_matches_transformers(smollm2_gguf, hf_model):
    cfg, hf = read_config(smollm2_gguf), hf_model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads,
            cfg.num_kv_heads, cfg.head_dim, cfg.max_position_embeddings, cfg.tie_word_embeddings) == \
        (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
         hf.num_key_value_heads, hf.head_dim, hf.max_position_embeddings, hf.tie_word_embeddings)
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_id) == (hf.bos_token_id, [hf.eos_token_id])
    # the brief's figures for this checkpoint
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.hidden_size,
            cfg.intermediate_size) == (30, 9, 3, 49152, 576, 1536)


def test_weights_equal_transformers(ours, hf_model):
    """Same dequantized values under the same names, q/k rows un-permuted as transformers does."""
    cfg, weights, _ = ours
    state = hf_model.state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected_shapes(cfg)
    for name, w in weights.items():
        assert torch.equal(w, state[name]), name


def test_logits_match_transformers(ours, hf_model, smollm2_gguf):
    cfg, _, model = ours
    tokenizer = Tokenizer(smollm2_gguf)
    for prompt in PROMPTS:
        ids = torch.tensor(tokenizer.encode(prompt))
        logits = model.prefill(ids, model.new_cache(len(ids)))
        with torch.no_grad():
            want = hf_model(ids[None]).logits[0, -1]
        diff = (logits - want).abs().max().item()
        print(f"{prompt[:30]!r}: {len(ids)} tokens, max |logit diff| {diff:.2e}")
        assert diff < LOGITS_ATOL
        assert logits.argmax().item() == want.argmax().item()


def greedy(model, ids: list[int], n: int, stop: set[int]) -> list[int]:
    cache = model.new_cache(len(ids) + n)
    logits = model.prefill(torch.tensor(ids), cache)
    out = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        if token in stop:
            break
        logits = model.decode(token, cache)
    return out


def test_greedy_chat_continuation_matches_transformers(ours, hf_model, smollm2_gguf):
    _, _, model = ours
    tokenizer = Tokenizer(smollm2_gguf)
    chat = ChatTemplate.from_source(smollm2_gguf, tokenizer)
    ids = chat.prompt_ids(tokenizer, [{"role": "user", "content": "Name three primary colours."}])
    got = greedy(model, ids, 16, set(chat.stop_ids))
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=16, do_sample=False, eos_token_id=chat.stop_ids,
                                 pad_token_id=chat.stop_ids[0])[0, len(ids):].tolist()
    print("continuation:", repr(tokenizer.decode(got)))
    assert got == want
    assert len(got) == 16 or got[-1] in chat.stop_ids


def test_hf_dir_fixture_opens_in_tsqp_and_transformers(smollm2_dir, smollm2_gguf, ours, hf_model):
    """The directory the other tests use: tsqp's safetensors loader gives the GGUF's weights, transformers
    computes the GGUF's logits from it, and its tokenizer and chat template give the same ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, weights, _ = ours
    dir_cfg, dir_weights = load(str(smollm2_dir), torch.float32)
    assert dir_cfg == cfg
    assert all(torch.equal(dir_weights[k], weights[k]) for k in weights)

    gguf_tok, dir_tok = Tokenizer(smollm2_gguf), Tokenizer(smollm2_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    ids = ChatTemplate.from_source(smollm2_dir, dir_tok).prompt_ids(dir_tok, messages)
    assert ids == ChatTemplate.from_source(smollm2_gguf, gguf_tok).prompt_ids(gguf_tok, messages)
    assert ChatTemplate.from_source(smollm2_dir, dir_tok).stop_ids == [2]
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ids

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0, -1]
        want = hf_model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
