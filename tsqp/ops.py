"""The op table: every operation the runner may offload, in one place.

Validation (the server's checks, the runner's checks of a reply), compute dispatch, arena sizing, byte counts
and the wrappers (masking, verification) all read this table, so a new op is one entry here.

kind
  matmul       x @ W with W resident on the server (the only kind masking and Freivalds checks can wrap)
  activations  a product of two activations (the `seed` policy's Q K^T and P V)
  attention    fused attention + O projection (the `flash` policy)
  lookup       embedding rows for token ids
shard
  the axis along which the op could be split over several servers: "out" (columns of W), "in" (rows of W,
  partial sums added by the runner), "heads", or None.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig


@dataclass(frozen=True)
class Op:
    name: str
    code: int                         # in the binary call header
    kind: str
    per_layer: bool
    weights: tuple[str, ...]          # `weights.layer_names` keys (or full names) fused into the resident W
    shard: str | None
    width_in: Callable[[ModelConfig], int] | None = None    # matmul: x is [T, width_in]
    width_out: Callable[[ModelConfig], int] | None = None   # matmul: the result is [T, width_out]
    n_inputs: int = 1


TABLE = (
    Op("embed", 1, "lookup", False, ("model.embed_tokens.weight",), None),
    Op("qkv", 2, "matmul", True, ("q", "k", "v"), "out", lambda c: c.hidden_size, lambda c: c.qkv_size),
    Op("o", 3, "matmul", True, ("o",), "in", lambda c: c.q_size, lambda c: c.hidden_size),
    Op("gate_up", 4, "matmul", True, ("gate", "up"), "out", lambda c: c.hidden_size,
       lambda c: 2 * c.intermediate_size),
    Op("down", 5, "matmul", True, ("down",), "in", lambda c: c.intermediate_size, lambda c: c.hidden_size),
    Op("lm_head", 6, "matmul", False, ("lm_head.weight",), "out", lambda c: c.hidden_size,
       lambda c: c.vocab_size),
    Op("qk", 7, "activations", True, (), "heads", n_inputs=2),
    Op("av", 8, "activations", True, (), "heads", n_inputs=2),
    Op("attn_o", 9, "attention", True, ("o",), "heads", n_inputs=3),
)
OPS = {op.name: op for op in TABLE}
BY_CODE = {op.code: op for op in TABLE}
MATMUL_OPS = tuple(op.name for op in TABLE if op.kind == "matmul")


def is_matmul(name: str) -> bool:
    """A plain `x @ W` of a resident weight: what masking and verification can wrap."""
    op = OPS.get(name)
    return op is not None and op.kind == "matmul"


def matmul_widths(cfg: ModelConfig, name: str) -> tuple[int, int]:
    op = OPS[name]
    return op.width_in(cfg), op.width_out(cfg)


class OpError(ValueError):
    """A request that does not fit the op table; the message names the op and what is wrong."""


LIMBS = 5    # a masked input's ring elements (Z_2^40) travel as 5 byte limbs: uint8 [LIMBS, T, in]


def output_of(cfg: ModelConfig, wire: str, name, layer, inputs: list[tuple[str, tuple[int, ...]]]
              ) -> tuple[str, tuple[int, ...]]:
    """Validate an op's inputs ([(dtype, shape)]) against the model; return the output's (dtype, shape).
    wire "uint8": a protected server, which answers masked matmul ops only (uint8 limbs in, int64 out)."""
    op = OPS.get(name) if isinstance(name, str) else None
    if op is None:
        raise OpError(f"unknown op {name!r}")
    if wire == "uint8" and op.kind != "matmul":
        raise OpError(f"op {name}: a protected server answers masked x @ W ops only")
    if op.per_layer:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < cfg.num_layers:
            raise OpError(f"op {name}: layer {layer!r} out of range 0..{cfg.num_layers - 1}")
    elif layer is not None:
        raise OpError(f"op {name}: takes no layer, got {layer!r}")
    if len(inputs) != op.n_inputs:
        raise OpError(f"op {name}: expects {op.n_inputs} input tensor(s), got {len(inputs)}")
    want_dtype = "int64" if op.kind == "lookup" else wire
    for dtype, _ in inputs:
        if dtype != want_dtype:
            raise OpError(f"op {name}: input dtype {dtype}, server expects {want_dtype}")
    shapes = [tuple(s) for _, s in inputs]
    D, H, KV, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def need(ok: bool, what: str):
        if not ok:
            raise OpError(f"op {name}: input shape {[list(s) for s in shapes]}, expected {what}")

    if op.kind == "matmul" and wire == "uint8":
        width_in = op.width_in(cfg)
        need(len(shapes[0]) == 3 and shapes[0][0] == LIMBS and shapes[0][2] == width_in, f"[{LIMBS}, T, {width_in}]")
        return "int64", (shapes[0][1], op.width_out(cfg))
    if op.kind == "matmul":
        width_in = op.width_in(cfg)
        need(len(shapes[0]) == 2 and shapes[0][1] == width_in, f"[T, {width_in}]")
        return wire, (shapes[0][0], op.width_out(cfg))
    if op.kind == "lookup":
        need(len(shapes[0]) == 1, "[T]")
        return wire, (shapes[0][0], D)
    if op.kind == "attention":   # q [T, H, hd], k and v [KV, S, hd] with S >= T (queries are the last T) -> [T, D]
        q, k, v = shapes
        need(len(q) == 3 and len(k) == 3 and k == v and q[1] == H and q[2] == hd and k[0] == KV
             and k[2] == hd and k[1] >= q[0], f"[T, {H}, {hd}] and twice [{KV}, S, {hd}] with S >= T")
        return wire, (q[0], D)
    a, b = shapes
    if name == "qk":   # q [H, T, hd] x k [KV, S, hd] -> scores [H, T, S]
        need(len(a) == 3 and len(b) == 3 and a[0] == H and b[0] == KV and a[2] == hd and b[2] == hd,
             f"[{H}, T, {hd}] and [{KV}, S, {hd}]")
        return wire, (H, a[1], b[1])
    # av: probs [H, T, S] x v [KV, S, hd] -> [H, T, hd]
    need(len(a) == 3 and len(b) == 3 and a[0] == H and b[0] == KV and a[2] == b[1] and b[2] == hd,
         f"[{H}, T, S] and [{KV}, S, {hd}]")
    return wire, (H, a[1], hd)
