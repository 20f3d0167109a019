"""GGUF files written here with llama.cpp's own writer (gguf.GGUFWriter), as llama.cpp's converter writes
them (q/k rows permuted, norms in F32), read back by tsqp: each tensor type against the original weights and
against transformers' GGUF loader, K-quants against transformers' own dequantizer, and the clear errors."""
from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch

from conftest import make_checkpoint
from tsqp.untrusted.compute import Compute
from tsqp.config import ConfigError
from tsqp.gguf_checkpoint import read, read_config
from tsqp.trusted.model import Rope, TrustedModel
from tsqp.local import LocalOffload
from tsqp.weights import layer_names

Q = gguf.GGMLQuantizationType
BLOCK_GGUF = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
              "down": "ffn_down", "attn_norm": "attn_norm", "mlp_norm": "ffn_norm"}
# bound on the relative Frobenius error of a weight after the type's round trip (measured on these weights:
# F16 2e-4, BF16 2e-3, Q8_0 5e-3, Q5 4e-2, Q4 8e-2; rows in the wrong order give ~1.4)
ROUND_TRIP_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 6e-2, Q.Q5_1: 6e-2,
                    Q.Q4_0: 0.12, Q.Q4_1: 0.12}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(num_layers: int, tied: bool) -> dict[str, str]:
    """HF name -> GGUF name, written out independently of tsqp's own table."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    for i in range(num_layers):
        names |= {hf: f"blk.{i}.{BLOCK_GGUF[key]}.weight" for key, hf in layer_names(i).items()}
    return names


def write_gguf(path, hf: dict, state: dict[str, np.ndarray], qtype=Q.F32, raw: dict | None = None,
               arch: str = "llama", extra=None):
    """hf: the checkpoint's config.json dict; state: HF-named float32 arrays; 2-D weights stored as qtype
    (norms stay F32, as llama.cpp keeps them); raw: GGUF name -> (bytes array, type) stored as given."""
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(hf.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(hf["vocab_size"])
    w.add_bos_token_id(hf["bos_token_id"])
    w.add_eos_token_id(hf["eos_token_id"])
    if extra:
        extra(w)
    names = gguf_names(hf["num_hidden_layers"], hf.get("tie_word_embeddings", False))
    for hf_name, array in state.items():
        if hf_name not in names:
            continue
        name = names[hf_name]
        if raw and name in raw:
            data, kind = raw[name]
            w.add_tensor(name, data, raw_dtype=kind)
            continue
        if ".attn_q." in name:
            array = llama_cpp_permute(array, heads)
        elif ".attn_k." in name:
            array = llama_cpp_permute(array, kv)
        if array.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, gguf.quants.quantize(array, qtype))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny trained-looking HF Llama (GQA, head_dim != hidden/heads, untied head): every in-features a
    multiple of 32, as the 32-wide quantization blocks need."""
    import json

    path = make_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", seed=3, hidden_size=96, intermediate_size=160,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                           vocab_size=320, rope_theta=10000.0)
    from safetensors.numpy import load_file
    state = {k: v.astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items()}
    return path, json.loads((path / "config.json").read_text()), state


@pytest.mark.parametrize("qtype", list(ROUND_TRIP_ERROR), ids=lambda q: q.name)
def test_each_type_reads_back_as_transformers_reads_it(qtype, tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hf, state = tiny_hf
    file = write_gguf(tmp_path / f"tiny-{qtype.name}.gguf", hf, state, qtype)
    cfg, weights = read(file, torch.float32)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (6, 2, 16, False)
    for name, w in weights.items():
        want = torch.from_numpy(state[name])
        err = ((w - want).norm() / want.norm()).item()
        assert err <= ROUND_TRIP_ERROR[qtype if w.ndim == 2 else Q.F32], (name, err)
    oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, dtype=torch.float32).state_dict()
    for name, w in weights.items():
        assert torch.equal(w, oracle[name]), name


def test_f32_gguf_runs_as_the_original_checkpoint(tiny_hf, tmp_path):
    """End to end: tsqp's model on the F32 GGUF against transformers' model on the original weights (so the
    un-permuted q/k rows must meet transformers' RoPE)."""
    from conftest import hf_logits

    path, hf, state = tiny_hf
    cfg, weights = read(write_gguf(tmp_path / "tiny.gguf", hf, state), torch.float32)
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    model = TrustedModel(cfg, norms, LocalOffload(Compute(cfg, weights, "cpu")))
    ids = torch.tensor([1, 17, 230, 5, 99, 311, 42, 7])
    got = model.prefill(ids, model.new_cache(len(ids)))
    assert torch.allclose(got, hf_logits(path, ids), atol=1e-5, rtol=0)


# ggml block layouts (ggml-common.h): bytes per 256 values, and the offsets of the fp16 scales, which random
# bytes must not make inf/NaN
K_QUANTS = {Q.Q2_K: (84, (80, 82)), Q.Q3_K: (110, (108,)), Q.Q4_K: (144, (0, 2)), Q.Q5_K: (176, (0, 2)),
            Q.Q6_K: (210, (208,))}


def random_blocks(rng, rows: int, cols: int, kind) -> np.ndarray:
    size, halves = K_QUANTS[kind]
    blocks = rng.integers(0, 256, (rows * cols // 256, size), dtype=np.uint8)
    for off in halves:
        blocks[:, off:off + 2] = rng.uniform(1e-3, 2e-2, (len(blocks), 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


@pytest.mark.parametrize("kind", list(K_QUANTS), ids=lambda q: q.name)
def test_k_quants_match_transformers_dequantizer(kind, tmp_path):
    """Random K-quant blocks in every 2-D tensor; tsqp's weights equal transformers' own torch dequantizer
    (integrations/gguf/dequant.py) on the same bytes, q/k rows un-permuted by transformers' GGUF loader."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    hf = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=True)
    rng = np.random.default_rng(int(kind))
    shapes = {"model.embed_tokens.weight": (256, 256), "model.norm.weight": (256,)}
    n = layer_names(0)
    shapes |= {n["q"]: (256, 256), n["k"]: (128, 256), n["v"]: (128, 256), n["o"]: (256, 256),
               n["gate"]: (512, 256), n["up"]: (512, 256), n["down"]: (256, 512),
               n["attn_norm"]: (256,), n["mlp_norm"]: (256,)}
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    names = gguf_names(1, tied=True)
    raw = {names[k]: (random_blocks(rng, *s, kind), kind) for k, s in shapes.items() if len(s) == 2}
    _, weights = read(write_gguf(tmp_path / "k.gguf", hf, state, raw=raw), torch.float32)
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, shape in shapes.items():
        if len(shape) == 1:
            assert torch.equal(weights[name], torch.from_numpy(state[name]))
            continue
        data, _ = raw[names[name]]
        want = hf_dequantize(torch.from_numpy(data.reshape(-1).copy()), int(kind)).reshape(shape).numpy()
        want = unpermute.process(want, names[name]).weights
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(weights[name].numpy(), want, err_msg=name)


def test_unsupported_type_names_tensor_and_type(tmp_path):
    hf = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    state = {name: rng.standard_normal(s).astype(np.float32) for name, s in {
        "model.embed_tokens.weight": (256, 256), "model.norm.weight": (256,),
        **{v: ((256,) if k.endswith("norm") else (256, 256)) for k, v in layer_names(0).items()}}.items()}
    iq2 = rng.integers(0, 256, (256, 66), dtype=np.uint8)      # IQ2_XXS: 66 bytes per 256 values
    file = write_gguf(tmp_path / "iq.gguf", hf, state, raw={"blk.0.ffn_down.weight": (iq2, Q.IQ2_XXS)})
    with pytest.raises(ConfigError, match=r"'blk\.0\.ffn_down\.weight' has type IQ2_XXS"):
        read(file, torch.float32)


def test_other_architecture_is_refused_by_name(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="general.architecture is 'qwen2'"):
        read_config(tmp_path / "q.gguf")


def llama_cpp_rope_factors(theta: float, head_dim: int, factor: float) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3."""
    low_freq_factor, high_freq_factor, old_context_len = 1.0, 4.0, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs_tensor_becomes_llama3_scaling(tiny_hf, tmp_path):
    """llama.cpp stores Llama-3 scaling as rope_freqs.weight and divides each frequency by it; tsqp's RoPE
    from the recovered config must give the same frequencies."""
    _, hf, state = tiny_hf
    hf = dict(hf, rope_theta=500000.0, head_dim=64, num_attention_heads=2, num_key_value_heads=1, hidden_size=128)
    factors = llama_cpp_rope_factors(500000.0, 64, 32.0)
    file = write_gguf(tmp_path / "l3.gguf", hf, {}, extra=lambda w: w.add_tensor("rope_freqs.weight", factors))
    cfg = read_config(file)
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    llama_cpp = 1.0 / (500000.0 ** (np.arange(0, 64, 2) / 64)) / factors
    np.testing.assert_allclose(Rope(cfg).inv_freq.numpy(), llama_cpp, rtol=1e-5)
    assert (factors == 1).any() and (factors == 32).any() and ((1 < factors) & (factors < 32)).any()  # all 3 regimes

    bent = factors.copy()
    bent[len(bent) // 2] *= 1.5
    file = write_gguf(tmp_path / "bent.gguf", hf, {}, extra=lambda w: w.add_tensor("rope_freqs.weight", bent))
    with pytest.raises(ConfigError, match="rope_freqs.weight"):
        read_config(file)
