"""Messages between the trusted runner and the compute server.

Calls and results, the per-call traffic, are fixed binary headers; the rare control messages (hello, attach,
bye, info, echo, errors) are JSON objects. The first byte tells them apart: a JSON message starts with `{`,
a binary header with MAGIC (0xC5, which no JSON text starts with). Tensors travel as raw frames after the header, or stay in the session's
shared-memory arena and the header carries their offsets. Nothing that crosses the boundary is pickled
or evaluated.

    header (24 bytes, little-endian)                            then n tensor records (32 bytes each)
    ┌──────────┬─────────┬──────┬──────┬───────────┬─────┬───────┬──────────┬─────────────┐
    │ magic    │ version │ kind │ op   │ n_tensors │ pad │ layer │ id       │ compute_s   │
    │ u8 = 0xC5│ u8 = 2  │ u8   │ u8   │ u8        │ u8  │ i16   │ u64      │ f64         │
    └──────────┴─────────┴──────┴──────┴───────────┴─────┴───────┴──────────┴─────────────┘
      kind: 1 call, 2 result     op: ops.TABLE's code     layer: -1 for ops without one     compute_s: results
    ┌───────┬──────┬─────────┬───────────────┬──────────────────────┐
    │ dtype │ ndim │ 6 bytes │ offset        │ shape                │
    │ u8    │ u8   │ (zero)  │ i64 (-1: frame)│ 4 x u32 (unused: 0)  │
    └───────┴──────┴─────────┴───────────────┴──────────────────────┘
    A call's records are its inputs, then the output it asks for (over shm: the region the server writes).
    A result's one record is its output.
"""
from __future__ import annotations

import json
import struct
import warnings
from typing import NamedTuple

import torch

from ..ops import BY_CODE, OPS
from ..weights import DTYPE

MAGIC, VERSION = 0xC5, 2
CALL, RESULT = 1, 2
HEAD = struct.Struct("<BBBBBxhQd")
TENSOR = struct.Struct("<BB6xq4I")
MAX_DIMS = 4
MAX_TENSORS = 8
MAX_CONTROL_BYTES = 64 * 1024
# the weights' dtypes, then token ids and the protected offload's integers (the order gives the codes)
WIRE_DTYPES = {**DTYPE, "int64": torch.int64, "uint8": torch.uint8, "int8": torch.int8}
DTYPE_NAME = {v: k for k, v in WIRE_DTYPES.items()}
DTYPE_CODES = tuple(WIRE_DTYPES)            # code = index + 1
ID_OFFSET = 8                               # where the request id sits in the header, compute_s after it
ID_TIME = struct.Struct("<Qd")              # the two fields a repeated call or its result changes
TIME_OFFSET, COMPUTE_S = ID_OFFSET + 8, struct.Struct("<d")


class ProtocolError(ValueError):
    """A message that does not follow this protocol; the text names what is wrong."""


class TensorMeta(NamedTuple):       # tuples: built on every call and reply, cheaply
    dtype: str
    shape: tuple[int, ...]
    offset: int | None = None   # into the shm arena; None for a raw frame

    @property
    def nbytes(self) -> int:
        n = WIRE_DTYPES[self.dtype].itemsize
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return WIRE_DTYPES[self.dtype]

    @classmethod
    def of(cls, t: torch.Tensor, offset: int | None = None) -> "TensorMeta":
        return cls(DTYPE_NAME[t.dtype], tuple(t.shape), offset)

    def pack(self) -> bytes:
        shape = tuple(self.shape) + (0,) * (MAX_DIMS - len(self.shape))
        return TENSOR.pack(DTYPE_CODES.index(self.dtype) + 1, len(self.shape),
                           -1 if self.offset is None else self.offset, *shape)

    @classmethod
    def unpack(cls, buf, at: int) -> "TensorMeta":
        code, ndim, offset, *shape = TENSOR.unpack_from(buf, at)
        if not 1 <= code <= len(DTYPE_CODES):
            raise ProtocolError(f"unknown dtype code {code}")
        if ndim > MAX_DIMS or any(shape[ndim:]):
            raise ProtocolError(f"bad shape: ndim {ndim}, dims {shape}")
        if offset < -1:
            raise ProtocolError(f"bad offset {offset}")
        return cls(DTYPE_CODES[code - 1], tuple(shape[:ndim]), None if offset == -1 else offset)


class Message(NamedTuple):
    """A decoded call or result header."""
    kind: int
    op: str
    layer: int | None
    id: int
    tensors: tuple[TensorMeta, ...]
    compute_s: float = 0.0


def pack(kind: int, op: str, layer: int | None, rid: int, tensors, compute_s: float = 0.0) -> bytes:
    return HEAD.pack(MAGIC, VERSION, kind, OPS[op].code, len(tensors), -1 if layer is None else layer, rid,
                     compute_s) + b"".join(m.pack() for m in tensors)


def encode_call(op: str, layer: int | None, rid: int, inputs: list[TensorMeta], output: TensorMeta) -> bytes:
    return pack(CALL, op, layer, rid, [*inputs, output])


def encode_result(op: str, layer: int | None, rid: int, output: TensorMeta, compute_s: float) -> bytes:
    return pack(RESULT, op, layer, rid, [output], compute_s)


def unpack(buf) -> Message:
    """A binary call or result header; any malformation is a ProtocolError naming it."""
    if len(buf) < HEAD.size:
        raise ProtocolError(f"header of {len(buf)} bytes, shorter than the {HEAD.size}-byte fixed part")
    magic, version, kind, code, n, layer, rid, compute_s = HEAD.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(f"not a binary header (first byte {magic:#x})")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    if kind not in (CALL, RESULT):
        raise ProtocolError(f"unknown message kind {kind}")
    op = BY_CODE.get(code)
    if op is None:
        raise ProtocolError(f"unknown op code {code}")
    if not 1 <= n <= MAX_TENSORS or len(buf) != HEAD.size + n * TENSOR.size:
        raise ProtocolError(f"header of {len(buf)} bytes does not hold {n} tensor record(s)")
    tensors = tuple(TensorMeta.unpack(buf, HEAD.size + i * TENSOR.size) for i in range(n))
    return Message(kind, op.name, None if layer == -1 else layer, rid, tensors, compute_s)


def peek_id(buf) -> int | None:
    """The request id in a binary header's fixed part (read before anything else is checked), or None when
    there is no such part (a JSON message, a short frame)."""
    if len(buf) < HEAD.size or buf[0] != MAGIC:
        return None
    return struct.unpack_from("<Q", buf, ID_OFFSET)[0]


def op_of(buf) -> str | None:
    """The op a binary header names (read before anything else is checked), or None (not a binary header, an
    unknown op code): for naming a call in the error that refuses it."""
    op = BY_CODE.get(buf[3]) if len(buf) >= HEAD.size and buf[0] == MAGIC else None
    return None if op is None else op.name


def with_id(header: bytes, rid: int, compute_s: float = 0.0) -> bytes:
    """A packed header with another request id and compute time: a call or result header built once for an op
    on given arena regions serves every later call on them (a decode step repeats the same calls)."""
    return header[:ID_OFFSET] + ID_TIME.pack(rid, compute_s) + header[ID_OFFSET + ID_TIME.size:]


def answering(call: bytes, result: bytes, compute_s: float) -> bytes:
    """A result header built once for an op on given regions, given the id of the call it answers (copied as
    it is) and a compute time."""
    return result[:ID_OFFSET] + call[ID_OFFSET:TIME_OFFSET] + COMPUTE_S.pack(compute_s) + result[TIME_OFFSET + 8:]


def but_id(header: bytes) -> bytes:
    """A header without its id and compute time: equal for two calls of one op on the same regions."""
    return header[:ID_OFFSET] + header[ID_OFFSET + ID_TIME.size:]


def is_binary(frame) -> bool:
    if not isinstance(frame, bytes):
        frame = memoryview(frame).cast("B")
    return len(frame) > 0 and frame[0] == MAGIC


# ---- control messages: JSON -------------------------------------------------------------------------
def encode(header: dict) -> bytes:
    return json.dumps({"v": VERSION, **header}, separators=(",", ":")).encode()


def decode(frame) -> dict:
    """A JSON control message, or a binary result shown as a dict (rare paths and tests)."""
    raw = bytes(frame)
    if is_binary(raw):
        m = unpack(raw)
        if m.kind != RESULT:
            raise ProtocolError("a call where a reply was expected")
        return {"type": "result", "id": m.id, "op": m.op, "layer": m.layer, "compute_s": m.compute_s,
                "output": m.tensors[0]}
    if len(raw) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(raw)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ProtocolError("message is neither a binary header nor JSON") from None
    if not isinstance(header, dict):
        raise ProtocolError("control message is not a JSON object")
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, this side speaks {VERSION}")
    if not isinstance(header.get("type"), str):
        raise ProtocolError("control message has no 'type'")
    return header


def error(message: str, rid: int | None = None, op: str | None = None) -> bytes:
    return encode({"type": "error", "id": rid, "op": op, "error": message})


# ---- tensors as frames ------------------------------------------------------------------------------
def tensor_from_frame(meta: TensorMeta, buffer) -> torch.Tensor:
    """A tensor over a received frame's memory, without copying."""
    mv = memoryview(buffer)
    if mv.nbytes != meta.nbytes:
        raise ProtocolError(f"frame of {mv.nbytes} bytes, but {meta.dtype}{list(meta.shape)} needs {meta.nbytes}")
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=meta.torch_dtype)
    with warnings.catch_warnings():   # received frames are read-only; the server only reads its inputs
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv, dtype=meta.torch_dtype).view(meta.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, zero-copy (numpy has no bfloat16, so view as bytes)."""
    t = t.contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def meta_from_json(d) -> TensorMeta:
    """A tensor meta inside a JSON control message (the hello's norms)."""
    if not isinstance(d, dict):
        raise ProtocolError("tensor meta must be an object")
    dtype, shape = d.get("dtype"), d.get("shape")
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"unknown dtype {dtype!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**31 for s in shape)):
        raise ProtocolError(f"bad shape {shape!r}")
    return TensorMeta(dtype, tuple(shape))


def meta_to_json(m: TensorMeta) -> dict:
    return {"dtype": m.dtype, "shape": list(m.shape)}
