"""GGUF checkpoints (llama.cpp's format): the model config from the metadata, and the weights dequantized to
float tensors under their Hugging Face names, read with llama.cpp's own `gguf` package.

llama.cpp's converter permutes the rows of q_proj and k_proj for its interleaved rotary layout; the weights
returned here are permuted back, so they run with the rotate-half RoPE of tsqp and transformers.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, ModelConfig
from .checkpoint import check_complete, expected_shapes, layer_names

# Dequantized by gguf.quants and covered by the tests (K-quants against transformers' own dequantizer).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name -> Hugging Face name; blk.N.* per layer (layer_names' keys)
TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "ffn_gate": "gate",
               "ffn_up": "up", "ffn_down": "down", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm"}
ROPE_FREQS = "rope_freqs.weight"     # Llama-3 frequency factors, written by llama.cpp instead of metadata


def is_gguf(spec: str | Path) -> bool:
    return str(spec).lower().endswith(".gguf")


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int):
    """One parse per file version: config, weights, tokenizer and chat template all read the same file, and
    parsing the metadata (~100k token strings) costs seconds."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:   # bad magic, truncated file
        raise ConfigError(f"{path}: not a readable GGUF file ({e})") from None


def open_reader(path: str | Path):
    """A gguf.GGUFReader for the file (memory-mapped, cached while the file is unchanged)."""
    file = Path(path).resolve()
    if not file.is_file():
        raise ConfigError(f"{path}: not found (expected a .gguf file)")
    st = file.stat()
    return _open(str(file), st.st_mtime_ns, st.st_size)


_MISSING = object()


def field(reader, key: str, default=_MISSING):
    """A metadata value as Python data: str, int, float, bool, or a list of them."""
    import gguf

    f = reader.fields.get(key)
    if f is None:
        if default is _MISSING:
            raise ConfigError(f"{reader.data.filename}: missing metadata '{key}'")
        return default
    string = lambda part: bytes(part).decode("utf-8")    # noqa: E731
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [string(f.parts[i]) for i in f.data]
        return [v for i in f.data for v in f.parts[i].tolist()]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return string(f.parts[-1])
    return f.parts[-1].tolist()[0]


def read_config(path: str | Path) -> ModelConfig:
    return config_from_reader(open_reader(path))


def config_from_reader(reader) -> ModelConfig:
    src = reader.data.filename
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{src}: general.architecture is '{arch}', only 'llama' is supported")
    need = functools.partial(field, reader)
    hidden, heads = need("llama.embedding_length"), need("llama.attention.head_count")
    kv_heads = need("llama.attention.head_count_kv", heads)
    head_dim = need("llama.attention.key_length", hidden // heads)
    rotary = need("llama.rope.dimension_count", head_dim)
    if rotary != head_dim or need("llama.attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{src}: rope.dimension_count {rotary}, key/value length {head_dim}: "
                          f"only full-width rotary with equal key and value heads is supported")
    if need("llama.expert_count", 0):
        raise ConfigError(f"{src}: llama.expert_count is {need('llama.expert_count')}; mixtures of experts "
                          f"are not supported")
    names = {t.name for t in reader.tensors}
    biases = sorted(n for n in names if n.endswith(".bias"))
    if biases:
        raise ConfigError(f"{src}: tensor '{biases[0]}' is a bias; biases are not supported")
    tokens = need("tokenizer.ggml.tokens", None)
    vocab = len(tokens) if tokens is not None else need("llama.vocab_size")
    theta = float(need("llama.rope.freq_base", 10000.0))
    eos = [need(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]  # llama.cpp's end-of-generation
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=need("llama.feed_forward_length"),
        num_layers=need("llama.block_count"), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(need("llama.attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=_rope_scaling(reader, theta, head_dim),
        max_position_embeddings=need("llama.context_length", 2048),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=need("tokenizer.ggml.bos_token_id", None),
        eos_token_id=list(dict.fromkeys(e for e in eos if e is not None)))
    if cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"{src}: attention.head_count_kv ({kv_heads}) does not divide head_count ({heads})")
    return cfg


def _rope_scaling(reader, theta: float, head_dim: int) -> dict | None:
    """None, or the Llama-3 scaling that llama.cpp stored as the tensor rope_freqs.weight (a divisor per
    frequency): recovered by matching the factors that Llama-3's parameters give (factor = the largest)."""
    src = reader.data.filename
    kind = field(reader, "llama.rope.scaling.type", "none")
    if kind != "none":
        raise ConfigError(f"{src}: llama.rope.scaling.type is '{kind}'; only Llama-3 scaling is supported")
    stored = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if stored is None:
        return None
    factors = np.asarray(stored.data, dtype=np.float64).reshape(-1)                  # [hd/2]
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)                 # [hd/2]
    wavelen = 2 * np.pi / inv_freq
    old, low, high = 8192, 8192 / 1.0, 8192 / 4.0
    smooth = (old / wavelen - 1.0) / (4.0 - 1.0)
    want = np.where(wavelen < high, 1.0,
                    np.where(wavelen > low, scaling["factor"], 1 / ((1 - smooth) / scaling["factor"] + smooth)))
    if factors.shape != want.shape or not np.allclose(factors, want, rtol=1e-4):
        raise ConfigError(f"{src}: tensor '{ROPE_FREQS}' does not match Llama-3 rope scaling "
                          f"(low 1, high 4, original context 8192); other scalings are not supported")
    return scaling


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when it has no place in a llama model."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")            # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
            and parts[2] in BLOCK_NAMES:
        return layer_names(int(parts[1]))[BLOCK_NAMES[parts[2]]]
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert permute of q/k rows (each head's halves interleaved pairwise):
    [n_heads * hd, D] with rows (h, i, pair) -> rows (h, pair, i)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_weights(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    return weights_from_reader(open_reader(path), cfg, dtype, device)


def weights_from_reader(reader, cfg: ModelConfig, dtype: torch.dtype, device: str = "cpu",
                        only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """only: dequantize just these tensors (Hugging Face names)."""
    from gguf.quants import dequantize

    src = reader.data.filename
    shapes = expected_shapes(cfg)
    if only is not None:
        shapes = {k: v for k, v in shapes.items() if k in only}
    q_names = {layer_names(i)["q"] for i in range(cfg.num_layers)}
    k_names = {layer_names(i)["k"] for i in range(cfg.num_layers)}
    plan = []
    for t in reader.tensors:    # check names and types before any dequantizing
        if t.name == ROPE_FREQS:
            continue            # read into the config's rope_scaling
        name = hf_name(t.name)
        if name is None:
            raise ConfigError(f"{src}: tensor '{t.name}' has no place in a llama model")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ConfigError(f"{src}: tensor '{t.name}' has type {t.tensor_type.name}, which tsqp cannot "
                              f"read; supported: {', '.join(SUPPORTED_TYPES)}")
        if name in shapes:      # e.g. an output.weight that a tied config does not use
            plan.append((t, name))
    weights = {}
    for t, name in plan:
        values = dequantize(t.data, t.tensor_type)                 # float32 [rows, cols], GGUF's ne reversed
        if not values.flags.writeable:                             # F32 comes as a view of the mapped file
            values = values.copy()
        w = torch.from_numpy(values).reshape(tuple(int(n) for n in reversed(t.shape)))
        if tuple(w.shape) != shapes[name]:
            raise ConfigError(f"{src}: tensor '{t.name}' has shape {tuple(w.shape)}, the metadata implies "
                              f"{shapes[name]}")
        if name in q_names:
            w = unpermute_rows(w, cfg.num_heads)
        elif name in k_names:
            w = unpermute_rows(w, cfg.num_kv_heads)
        weights[name] = w.to(device=device, dtype=dtype)
    return check_complete(src, shapes, weights)


def read(path: str | Path, dtype: torch.dtype, device: str = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, weights) with one parse of the file."""
    reader = open_reader(path)
    cfg = config_from_reader(reader)
    return cfg, weights_from_reader(reader, cfg, dtype, device)


def file_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each GGUF type the file holds (for banners and reports)."""
    counts: dict[str, int] = {}
    for t in open_reader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


__all__ = ["SUPPORTED_TYPES", "is_gguf", "open_reader", "field", "read_config", "read_weights", "read",
           "hf_name", "unpermute_rows", "file_types"]
