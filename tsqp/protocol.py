"""Messages between the trusted runner and the compute server.

A message is a list of ZeroMQ frames: one small JSON header, then one raw frame per tensor (frames
transport) or none (shm transport: the header carries offsets into the session's shared-memory arena).
JSON and raw bytes only: nothing that crosses the process boundary is pickled or evaluated.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import torch

from .config import ModelConfig

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
               "int64": torch.int64}
DTYPE_NAME = {v: k for k, v in WIRE_DTYPES.items()}
MAX_DIMS = 4


class ProtocolError(ValueError):
    """A message that does not follow this protocol; the text names what is wrong."""


@dataclass(frozen=True)
class TensorMeta:
    dtype: str
    shape: tuple[int, ...]
    offset: int | None = None   # into the shm arena; None for a raw frame

    @property
    def nbytes(self) -> int:
        n = WIRE_DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n

    def to_json(self) -> dict:
        d = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.offset is not None:
            d["offset"] = self.offset
        return d

    @classmethod
    def of(cls, t: torch.Tensor, offset: int | None = None) -> "TensorMeta":
        return cls(DTYPE_NAME[t.dtype], tuple(t.shape), offset)

    @classmethod
    def from_json(cls, d) -> "TensorMeta":
        if not isinstance(d, dict):
            raise ProtocolError("tensor meta must be an object")
        dtype, shape, offset = d.get("dtype"), d.get("shape"), d.get("offset")
        if dtype not in WIRE_DTYPES:
            raise ProtocolError(f"unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in shape)):
            raise ProtocolError(f"bad shape {shape!r}")
        if offset is not None and (not isinstance(offset, int) or isinstance(offset, bool) or offset < 0):
            raise ProtocolError(f"bad offset {offset!r}")
        return cls(dtype, tuple(shape), offset)


def encode(header: dict) -> bytes:
    return json.dumps({"v": VERSION, **header}, separators=(",", ":")).encode()


def decode(frame) -> dict:
    raw = bytes(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, this side speaks {VERSION}")
    if not isinstance(header.get("type"), str):
        raise ProtocolError("header has no 'type'")
    return header


RESULT_HEAD = b'{"v":%d,"type":"result","id":' % VERSION
COMPUTE_S = b',"compute_s":'


def result_head(rid: bytes, compute_s: float) -> bytes:
    """The start of a result (up to and including the comma after compute_s) as the server writes it from its
    caches and `parse_result` reads it; rid is the id already encoded as JSON."""
    return b"%s%s%s%a," % (RESULT_HEAD, rid, COMPUTE_S, compute_s)


def parse_result(frame: bytes) -> dict | None:
    """The fields a shared-memory runner reads from a result, as the server writes them (`{"v":1,
    "type":"result","id":7,"compute_s":0.001,...`), without a JSON parse: right after a wake-up it costs the
    runner ~60 us a call on a small VM. None for any other message, which then goes through `decode`."""
    if not frame.startswith(RESULT_HEAD):
        return None
    i = frame.find(COMPUTE_S, len(RESULT_HEAD))
    j = frame.find(b",", i + len(COMPUTE_S)) if i >= 0 else -1
    if j < 0:
        return None
    rid, seconds = frame[len(RESULT_HEAD):i], frame[i + len(COMPUTE_S):j]
    if not rid.isdigit() or len(rid) > 15:
        return None
    try:
        return {"type": "result", "id": int(rid), "compute_s": float(seconds)}
    except ValueError:
        return None


def tensor_from_frame(meta: TensorMeta, buffer) -> torch.Tensor:
    """A tensor over a received frame's memory, without copying."""
    mv = memoryview(buffer)
    if mv.nbytes != meta.nbytes:
        raise ProtocolError(f"frame of {mv.nbytes} bytes, but {meta.dtype}{list(meta.shape)} needs {meta.nbytes}")
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=WIRE_DTYPES[meta.dtype])
    with warnings.catch_warnings():   # received frames are read-only; the server only reads its inputs
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv, dtype=WIRE_DTYPES[meta.dtype]).view(meta.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, zero-copy (numpy has no bfloat16, so view as bytes)."""
    t = t.contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


# ---- the offloaded operations: what goes in, what comes out -----------------------------------------

LAYER_OPS = ("qkv", "o", "gate_up", "down", "qk", "av", "attn_o")
MODEL_OPS = ("embed", "lm_head")
OPS = LAYER_OPS + MODEL_OPS


def check_request(cfg: ModelConfig, wire: str, op, layer, inputs: list[TensorMeta]) -> TensorMeta:
    """Validate an op's inputs against the model; return the output's meta (without offset)."""
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    if op in LAYER_OPS:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < cfg.num_layers:
            raise ProtocolError(f"op {op}: layer {layer!r} out of range 0..{cfg.num_layers - 1}")
    D, I, H, KV, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n_in = {"qk": 2, "av": 2, "attn_o": 3}.get(op, 1)
    if len(inputs) != n_in:
        raise ProtocolError(f"op {op}: expects {n_in} input tensor(s), got {len(inputs)}")
    want_dtype = "int64" if op == "embed" else wire
    for m in inputs:
        if m.dtype != want_dtype:
            raise ProtocolError(f"op {op}: input dtype {m.dtype}, server expects {want_dtype}")
    shape = inputs[0].shape

    def need(ok: bool, what: str):
        if not ok:
            raise ProtocolError(f"op {op}: input shape {[list(m.shape) for m in inputs]}, expected {what}")

    if op == "embed":
        need(len(shape) == 1, "[T]")
        return TensorMeta(wire, (shape[0], D))
    if op == "attn_o":   # q [T, H, hd], k and v [KV, S, hd] with S >= T (queries are the last T) -> [T, D]
        q, k, v = (m.shape for m in inputs)
        need(len(q) == 3 and len(k) == 3 and k == v and q[1] == H and q[2] == hd and k[0] == KV
             and k[2] == hd and k[1] >= q[0], f"[T, {H}, {hd}] and twice [{KV}, S, {hd}] with S >= T")
        return TensorMeta(wire, (q[0], D))
    if op in ("qk", "av"):
        a, b = inputs[0].shape, inputs[1].shape
        if op == "qk":   # q [H, T, hd] x k [KV, S, hd] -> scores [H, T, S]
            need(len(a) == 3 and len(b) == 3 and a[0] == H and b[0] == KV and a[2] == hd and b[2] == hd,
                 f"[{H}, T, {hd}] and [{KV}, S, {hd}]")
            return TensorMeta(wire, (H, a[1], b[1]))
        # probs [H, T, S] x v [KV, S, hd] -> [H, T, hd]
        need(len(a) == 3 and len(b) == 3 and a[0] == H and b[0] == KV and a[2] == b[1] and b[2] == hd,
             f"[{H}, T, S] and [{KV}, S, {hd}]")
        return TensorMeta(wire, (H, a[1], hd))
    width_in, width_out = {"qkv": (D, cfg.qkv_size), "o": (cfg.q_size, D), "gate_up": (D, 2 * I),
                           "down": (I, D), "lm_head": (D, cfg.vocab_size)}[op]
    need(len(shape) == 2 and shape[1] == width_in, f"[T, {width_in}]")
    return TensorMeta(wire, (shape[0], width_out))
