"""Integer quantization of the offloaded linear layers, shared by both sides.

The server and the runner each quantize the PUBLIC float weights with this code and must get the same
integers: `fingerprint` hashes them in a canonical order, the server states it, the runner compares.
  weights      per output channel, int8 symmetric: scale = max|w| / 127, q = round(w / scale) in [-127, 127]
  activations  per token (row), 16 bits: scale = max|x| / 32767, q in [-32767, 32767]
Everything is computed in float32 from each weight's float32 value: max is exact and IEEE division and
round-half-to-even are correctly rounded, so the integers do not depend on the machine, and the
checkpoint's dtype matters only through its values. A result is Y = Xq Wq^T (exact integers) and
y = Y * sx[t] * sw[o] in float32 (`dequantize`, one code path for every consumer).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .weights import layer_names

WEIGHT_MAX = 127
ACT_MAX = 32767
LINEAR_OPS = ("qkv", "o", "gate_up", "down", "lm_head")
LAYER_OPS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class QWeight:
    q: torch.Tensor        # int8 [out, in]
    scale: torch.Tensor    # float32 [out]


def _symmetric(x: torch.Tensor, top: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric quantization of float x [rows, n] in float32: (q [rows, n] of out_dtype,
    float32 scale [rows]). An all-zero row gets scale 0 and q 0."""
    x = x.to(torch.float32)
    low, high = torch.aminmax(x, dim=1)                                            # [rows] each
    scale = torch.maximum(high, low.neg_()).div_(top)                              # max |x| / top
    divisor = torch.where(scale > 0, scale, 1.0)[:, None]                         # [rows, 1]
    q = torch.div(x, divisor).round_().clamp_(-top, top).to(out_dtype)
    return q, scale


def quantize_weight(w: torch.Tensor) -> QWeight:
    """float [out, in] -> int8 weights and per-output-channel scales (computed on the CPU)."""
    q, scale = _symmetric(w.detach().to("cpu"), WEIGHT_MAX, torch.int8)
    return QWeight(q, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations float [T, in] -> (int64 [T, in] in [-32767, 32767], float32 scale [T])."""
    q, scale = _symmetric(x, ACT_MAX, torch.int64)
    if not torch.isfinite(scale).all():
        raise ValueError("activations to quantize are not finite")
    return q, scale


def dequantize(y: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """Exact integer result int64 [T, out] -> float32 [T, out] = Y * sx[t] * sw[o]."""
    return y.to(torch.float32).mul_(sx[:, None]).mul_(sw[None, :])


def fused_weights(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[tuple[str, int | None], torch.Tensor]:
    """(op, layer) -> float W [out, in] in the order a forward pass consumes them; the fusions are the
    server's (compute.py): qkv = [q; k; v], gate_up = [gate; up]; lm_head is the embedding when tied."""
    fused = {}
    for i in range(cfg.num_layers):
        n = layer_names(i)
        fused[("qkv", i)] = torch.cat([weights[n["q"]], weights[n["k"]], weights[n["v"]]])   # [Q+2KV, D]
        fused[("o", i)] = weights[n["o"]]                                                   # [D, Q]
        fused[("gate_up", i)] = torch.cat([weights[n["gate"]], weights[n["up"]]])           # [2I, D]
        fused[("down", i)] = weights[n["down"]]                                             # [D, I]
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    fused[("lm_head", None)] = weights[head]                                                # [V, D]
    return fused


def quantize_model(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[tuple[str, int | None], QWeight]:
    """Every offloaded linear layer quantized, keyed (op, layer) in forward order."""
    return {key: quantize_weight(w) for key, w in fused_weights(cfg, weights).items()}


def forward_order(key: tuple[str, int | None]) -> tuple[int, int]:
    """Sort key of an (op, layer): layers in order, their ops in order, the lm_head last."""
    op, layer = key
    return (layer if layer is not None else 1 << 30, LINEAR_OPS.index(op))


def fingerprint(qweights: dict[tuple[str, int | None], QWeight]) -> str:
    """sha256 (hex) over every (op, layer, shape, int8 weights, float32 little-endian scales), in forward
    order: equal on both sides iff they will compute with the same integers."""
    h = hashlib.sha256(b"tsqp-quant-v1")
    for op, layer in sorted(qweights, key=forward_order):
        w = qweights[(op, layer)]
        h.update(f"{op}:{layer}:{tuple(w.q.shape)}".encode())
        h.update(w.q.contiguous().numpy().tobytes())
        h.update(w.scale.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()
