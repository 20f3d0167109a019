"""Integer quantization of the offloaded linear layers, shared by both sides.

The server and the runner each quantize the PUBLIC float weights with this code and must get the same
integers: `fingerprint` hashes them in a canonical order, the server states it, the runner compares.
  weights      per output channel, symmetric, 12 bits: scale = max|w| / M, q = round(w / scale) in [-M, M],
               M = weight_max(in) = 2047 (fewer bits only for layers wider than 8192 inputs, so that
               |x q| sums stay below 2^39 and the ring Z_2^40 holds them exactly)
  activations  per token (row), 16 bits: scale = max|x| / 32767, q in [-32767, 32767]
Why 12-bit weights: on SmolLM2-135M (scripts/fidelity.py) per-channel int8 weights lost 2.8 points of top-1
agreement against bfloat16's, 12 bits none; the server multiplies them as two int8 planes (ring.py), so its
GEMMs stay int8 (twice the columns) and its weights take 2 bytes per parameter, as bfloat16's do.
Everything is computed in float32 from each weight's float32 value: max is exact and IEEE division and
round-half-to-even are correctly rounded, so the integers do not depend on the machine, and the
checkpoint's dtype matters only through its values. A result is Y = Xq Wq^T (exact integers) and
y = Y * sx[t] * sw[o] in float32 (`dequantize`, one code path for every consumer).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from . import ring
from .config import ModelConfig
from .weights import layer_names

ACT_MAX = 32767
LINEAR_OPS = ("qkv", "o", "gate_up", "down", "lm_head")
LAYER_OPS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class QWeight:
    q: torch.Tensor        # int16 [out, in], |q| <= weight_max(in)
    scale: torch.Tensor    # float32 [out]


def _symmetric(x: torch.Tensor, top: int, out_dtype: torch.dtype,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric quantization of float x [rows, n] in float32: (q [rows, n] of out_dtype,
    float32 scale [rows]); `out`: float32 [rows, n] to round in. An all-zero row gets scale 0 and q 0."""
    x = x.to(torch.float32)
    low, high = x.amin(1), x.amax(1)        # [rows] each; aminmax(dim=1) took 10 times as long on the CPU
    scale = torch.maximum(high, low.neg_()).div_(top)                              # max |x| / top
    divisor = torch.where(scale > 0, scale, 1.0)[:, None]                         # [rows, 1]
    q = torch.div(x, divisor, out=out).round_().clamp_(-top, top).to(out_dtype)
    return q, scale


def weight_max(in_features: int) -> int:
    """The largest |q| for a weight with this many inputs: 2^b - 1 with b <= 11, such that a row of products
    with 16-bit activations stays exact in the ring, ACT_MAX * M * in < 2^39."""
    m = ring.WEIGHT_MAX
    while m > 1 and ACT_MAX * m * in_features >= ring.HALF:
        m //= 2
    if ACT_MAX * m * in_features >= ring.HALF:
        raise ValueError(f"an input width of {in_features} is too wide for exact products in Z_2^{ring.K}")
    return m


def quantize_weight(w: torch.Tensor) -> QWeight:
    """float [out, in] -> int16 weights of weight_max(in) and per-output-channel scales (on the CPU)."""
    q, scale = _symmetric(w.detach().to("cpu"), weight_max(w.shape[1]), torch.int16)
    return QWeight(q, scale)


def quantize_block(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations float [T, in] -> (float32 [T, in] holding integers in [-32767, 32767], written into `out`
    when given; float32 scale [T]). Row-wise: a block of rows gets what the whole tensor would."""
    if x.shape[0] == 1:
        return _one_row(x.to(torch.float32), out)
    q, scale = _symmetric(x, ACT_MAX, torch.float32, out)
    if scale.numel() and not math.isfinite(float(scale.max())):     # max propagates NaN; 3x cheaper per row
        raise ValueError("activations to quantize are not finite")
    return q, scale


def _one_row(x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """_symmetric's steps for a decode step's one row, the same bits in half the torch calls (each costs more
    than the row's arithmetic): max |x| is max(max x, -min x), and the divisor a Python float."""
    scale = x.abs().amax(1).div_(ACT_MAX)                                              # [1]
    s = float(scale)
    if not math.isfinite(s):                                                          # amax propagates NaN
        raise ValueError("activations to quantize are not finite")
    return torch.div(x, s if s > 0 else 1.0, out=out).round_().clamp_(-ACT_MAX, ACT_MAX), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations float [T, in] -> (int64 [T, in] in [-32767, 32767], float32 scale [T])."""
    q, scale = quantize_block(x)
    return q.to(torch.int64), scale


def dequantize_into(out: torch.Tensor, y: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """Exact integer result int64 [T, out] -> `out` float32 [T, out] = Y * sx[t] * sw[o]."""
    return out.copy_(y).mul_(sx[:, None]).mul_(sw[None, :])


def dequantize(y: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    return dequantize_into(torch.empty(y.shape, dtype=torch.float32), y, sx, sw)


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
    """sha256 (hex) over every (op, layer, shape, int16 little-endian weights, float32 little-endian scales),
    in forward order: equal on both sides iff they will compute with the same integers."""
    h = hashlib.sha256(b"tsqp-quant-v2")
    for op, layer in sorted(qweights, key=forward_order):
        w = qweights[(op, layer)]
        h.update(f"{op}:{layer}:{tuple(w.q.shape)}".encode())
        h.update(w.q.to(torch.int16).contiguous().numpy().astype("<i2").tobytes())
        h.update(w.scale.to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()
