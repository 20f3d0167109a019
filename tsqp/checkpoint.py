"""What a Llama checkpoint holds, whatever its file format: each tensor's Hugging Face name and shape, as the
config implies them. weights.py (safetensors, random presets) and gguf_checkpoint.py (GGUF) both read against
this table, so neither needs the other.
"""
from __future__ import annotations

import torch

from .config import ConfigError, ModelConfig


def layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
            "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
            "down": p + "mlp.down_proj.weight",
            "attn_norm": p + "input_layernorm.weight", "mlp_norm": p + "post_attention_layernorm.weight"}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i in range(cfg.num_layers):
        n = layer_names(i)
        shapes |= {n["q"]: (cfg.q_size, D), n["k"]: (cfg.kv_size, D), n["v"]: (cfg.kv_size, D),
                   n["o"]: (D, cfg.q_size), n["gate"]: (I, D), n["up"]: (I, D), n["down"]: (D, I),
                   n["attn_norm"]: (D,), n["mlp_norm"]: (D,)}
    return shapes


def norm_names(cfg: ModelConfig) -> list[str]:
    """The RMSNorm weights' names: two per layer and the final one, the only weights the runner keeps."""
    return [layer_names(i)[k] for i in range(cfg.num_layers) for k in ("attn_norm", "mlp_norm")] + \
        ["model.norm.weight"]


def check_complete(source, shapes: dict, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor the config implies is there, or a ConfigError names the missing ones."""
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise ConfigError(f"{source}: missing tensor(s) {', '.join(missing[:3])}"
                          + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    return weights
