"""The runner's per-row passes as one compiled loop each (tsqp/_fastpath.c), the torch chains' bits exactly.

A one-row request used to cost ~60 torch calls (each a few microseconds of dispatch, more than the row's
arithmetic) and a prefill block eight passes over memory. `mask` reads x and the pad once and writes the
limbs (and the check's input side X . ws mod p); `finish` reads the server's Z and U once, in chunks copied
to private memory before any use, and writes y (and Y . s mod p). Both split a request's rows over torch's
thread count (one for a decode step's row, `blocks.one_thread_for`), with the GIL released.
The check's sides are summed exactly in 64-bit partials of 21/20-bit limb products and reduced mod PRIME,
so each side is the same residue the torch path's int8/float64 GEMMs give, and a row passes or fails alike.

Why a C extension (docs/protection-performance.md): it is built once at install (setup.py, optional), is
an ordinary shared library in the trusted path (a TDX guest or Gramine loads it like torch's own; numba
would JIT at run time and cache machine code in a directory), and needs nothing beyond gcc. Where it was
not built, or TSQP_FASTPATH=0, the torch chains in blocks.py run (`KERNEL` says which, in the JSON).
"""
from __future__ import annotations

import os

import torch

from ... import ring

try:
    from ... import _fastpath
except ImportError:             # not built (no compiler at install): the torch reference runs
    _fastpath = None

KERNEL = "c" if _fastpath is not None and os.environ.get("TSQP_FASTPATH", "1") != "0" else "torch"
MAX_WIDTH = 1 << 17             # the check's 64-bit partial sums stay exact up to this many terms


class OutOfRange(ValueError):
    """A returned value lies outside [0, 2^40)."""


class CheckVectors:
    """A Freivalds check's secrets as the compiled passes read them: ws = W^T s mod p [in] and s [out],
    each cut into two 21-bit int32 limbs, and 2^39 sum(s) mod p (Y . s = (Y + 2^39) . s - that)."""

    def __init__(self, ws: torch.Tensor, s: torch.Tensor, prime: int):
        self.prime = prime
        self.ws_lo, self.ws_hi = ((ws & 0x1FFFFF).to(torch.int32).contiguous(),
                                  (ws >> 21).to(torch.int32).contiguous())
        self.s_lo, self.s_hi = (s & 0x1FFFFF).to(torch.int32).contiguous(), (s >> 21).to(torch.int32).contiguous()
        self.constant = ring.HALF % prime * (int(s.sum()) % prime) % prime
        # what a one-row call passes (mask_row / finish_row): widths and the limbs' addresses, read once
        self.in_features, self.out_features = self.ws_lo.shape[0], self.s_lo.shape[0]
        self.ws_at = (self.ws_lo.data_ptr(), self.ws_hi.data_ptr(), prime)
        self.s_at = (self.s_lo.data_ptr(), self.s_hi.data_ptr(), prime, self.constant)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled passes run, and take these operands as they are (on the CPU)."""
    if KERNEL != "c":
        return False
    for t in tensors:
        if not t.is_cpu:
            return False
    return True


def _threads(rows: int) -> int:
    return 1 if rows <= 1 else torch.get_num_threads()


def _planes(t: torch.Tensor, rows: int, width: int) -> tuple[int, int, int]:
    """A pad operand -> (int64 address or 0, uint8 planes' address or 0, plane stride in elements): int64
    [rows, width] contiguous, or uint8 [5, rows, width] with rows contiguous (a slice of a pool's block)."""
    if t.dtype == torch.int64 and tuple(t.shape) == (rows, width) and t.is_contiguous():
        return t.data_ptr(), 0, 0
    if t.dtype == torch.uint8 and tuple(t.shape) == (ring.LIMBS, rows, width) and t.stride()[1:] == (width, 1):
        return 0, t.data_ptr(), t.stride(0)
    raise ValueError(f"a pad must be int64 [{rows}, {width}] or uint8 [5, {rows}, {width}] with contiguous rows, "
                     f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")


def mask(x: torch.Tensor, r: torch.Tensor, limbs: torch.Tensor, check: CheckVectors | None,
         quantized: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x float32 [T, in], r the pad's rows (see _planes) -> limbs of quantize(x) + r mod 2^40 into `limbs`
    uint8 [5, T, in] (contiguous); returns (sx float32 [T], X . ws mod p int64 [T] or None). quantized:
    float32 [T, in] to keep the quantized rows in. Raises ValueError on a non-finite input."""
    T, n = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    _require(limbs, "limbs", torch.uint8, (ring.LIMBS, T, n))
    _require(quantized, "quantized", torch.float32, (T, n))
    r64, r8, r_plane = _planes(r, T, n)
    scale = torch.empty(T, dtype=torch.float32)
    side = torch.empty(T, dtype=torch.int64) if check is not None else None
    bad = _fastpath.mask(x.data_ptr(), r64, r8, r_plane, limbs.data_ptr(), T * n,
                         0 if quantized is None else quantized.data_ptr(), scale.data_ptr(),
                         *_vector(check, "ws", n), 0 if side is None else side.data_ptr(),
                         check.prime if check is not None else 0, T, n, _threads(T))
    if bad:
        raise ValueError("activations to quantize are not finite")
    return scale, side


def finish(z: torch.Tensor, u: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, check: CheckVectors | None,
           y: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor | None:
    """The server's z int64 [T, out] and the pad's U - 2^39 (see _planes) -> y float32 [len(sx), out]
    dequantized into `y`; returns Y . s mod p int64 [T] or None. offsets: int64 [T, out] to keep Y + 2^39
    in. Raises OutOfRange."""
    T, out = z.shape
    kept = sx.shape[0]
    z = z if z.is_contiguous() else z.contiguous()
    if sx.dtype != torch.float32 or not sx.is_contiguous():
        sx = sx.to(torch.float32).contiguous()
    if sw.dtype != torch.float32 or not sw.is_contiguous():
        sw = sw.to(torch.float32).contiguous()
    if sw.shape != (out,) or kept > T:
        raise ValueError(f"scales must be [{out}] and at most {T} rows' [{kept}], got {tuple(sw.shape)}")
    _require(y, "y", torch.float32, (kept, out))
    _require(offsets, "offsets", torch.int64, (T, out))
    u64, u8, u_plane = _planes(u, T, out)
    side = torch.empty(T, dtype=torch.int64) if check is not None else None
    bad = _fastpath.finish(z.data_ptr(), u64, u8, u_plane, sx.data_ptr(), sw.data_ptr(), y.data_ptr(), kept,
                           0 if offsets is None else offsets.data_ptr(), *_vector(check, "s", out),
                           0 if side is None else side.data_ptr(), check.prime if check is not None else 0,
                           check.constant if check is not None else 0, T, out, _threads(T))
    if bad:
        raise OutOfRange("a value lies outside [0, 2^40)")
    return side


def mask_row(x: torch.Tensor, pad, limbs: torch.Tensor, check: CheckVectors | None,
             quantized: torch.Tensor | None = None) -> tuple[float, int | None]:
    """One row: x float32 [1, in], pad a pads.PadRow -> limbs of quantize(x) + R mod 2^40 into `limbs` uint8
    [5, 1, in] (contiguous); returns (the row's scale, X . ws mod p or None), Python numbers (no per-call
    tensors). quantized: float32 [1, in] to keep the quantized row in. Raises ValueError on a non-finite input."""
    n = pad.in_features
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    if x.shape != (1, n):
        raise ValueError(f"one row of {n} inputs expected, got {tuple(x.shape)}")
    _require(limbs, "limbs", torch.uint8, (ring.LIMBS, 1, n))
    _require(quantized, "quantized", torch.float32, (1, n))
    r_addr, r_plane = pad.batch.r_at
    if check is not None and (check.in_features != n or n > MAX_WIDTH):
        _vector(check, "ws", n)                                      # raises, naming both widths
    got = _fastpath.mask_row(x.data_ptr(), r_addr, r_plane, pad.row, limbs.data_ptr(),
                             0 if quantized is None else quantized.data_ptr(),
                             *(check.ws_at if check is not None else (0, 0, 0)), n)
    if got is None:
        raise ValueError("activations to quantize are not finite")
    scale, side = got
    return scale, side if check is not None else None


def finish_row(z: torch.Tensor, pad, sx: float, sw: torch.Tensor, check: CheckVectors | None, y: torch.Tensor,
               offsets: torch.Tensor | None = None) -> int | None:
    """One row: the server's z int64 [1, out] and pad a pads.PadRow (U - 2^39 in its block) -> y float32
    [1, out] dequantized with the row's scale sx (mask_row's); returns Y . s mod p or None. offsets: int64
    [1, out] to keep Y + 2^39 in. Raises OutOfRange."""
    out = pad.out_features
    if z.shape != (1, out) or z.dtype != torch.int64:
        raise ValueError(f"z must be int64 [1, {out}], got {z.dtype} {tuple(z.shape)}")
    z = z if z.is_contiguous() else z.contiguous()
    if sw.shape != (out,) or sw.dtype != torch.float32 or not sw.is_contiguous():
        sw = sw.to(torch.float32).contiguous()
        if sw.shape != (out,):
            raise ValueError(f"scales must be [{out}], got {tuple(sw.shape)}")
    _require(y, "y", torch.float32, (1, out))
    _require(offsets, "offsets", torch.int64, (1, out))
    u_addr, u_plane = pad.batch.u_at
    if check is not None and (check.out_features != out or out > MAX_WIDTH):
        _vector(check, "s", out)                                     # raises, naming both widths
    side = _fastpath.finish_row(z.data_ptr(), u_addr, u_plane, pad.row, float(sx), sw.data_ptr(), y.data_ptr(),
                                0 if offsets is None else offsets.data_ptr(),
                                *(check.s_at if check is not None else (0, 0, 0, 0)), out)
    if side is None:
        raise OutOfRange("a value lies outside [0, 2^40)")
    return side if check is not None else None


def input_side(check: CheckVectors, quantized: torch.Tensor) -> torch.Tensor:
    """X . ws mod p, int64 [T], from the quantized rows float32 [T, in] (a deferred check's copy)."""
    T, n = quantized.shape
    quantized = quantized.contiguous()
    side = torch.empty(T, dtype=torch.int64)
    _fastpath.input_side(quantized.data_ptr(), *_vector(check, "ws", n), side.data_ptr(), check.prime, T, n,
                         _threads(T))
    return side


def output_side(check: CheckVectors, offsets: torch.Tensor) -> torch.Tensor:
    """Y . s mod p, int64 [T], from Y + 2^39 int64 [T, out] in [0, 2^40) (a deferred check's copy)."""
    T, out = offsets.shape
    offsets = offsets.contiguous()
    side = torch.empty(T, dtype=torch.int64)
    _fastpath.output_side(offsets.data_ptr(), *_vector(check, "s", out), side.data_ptr(), check.prime,
                          check.constant, T, out, _threads(T))
    return side


def _require(t: torch.Tensor | None, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """An output buffer the C loops write through its address: exactly this dtype and shape, contiguous
    (None: not asked for)."""
    if t is not None and (t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous()):
        dims = ", ".join(map(str, shape))
        raise ValueError(f"{name} must be {str(dtype).removeprefix('torch.')} [{dims}] contiguous, "
                         f"got {t.dtype} {tuple(t.shape)}")


def _vector(check: CheckVectors | None, name: str, width: int) -> tuple[int, int]:
    """The addresses of a secret vector's two limbs (0, 0 without a check), its width checked."""
    if check is None:
        return 0, 0
    lo, hi = getattr(check, f"{name}_lo"), getattr(check, f"{name}_hi")
    if lo.shape[0] != width or width > MAX_WIDTH:
        raise ValueError(f"the check's {name} has {lo.shape[0]} entries, the operand {width} (at most {MAX_WIDTH})")
    return lo.data_ptr(), hi.data_ptr()


GEMM_BLOCK_BYTES = 16 << 20      # a pad block's int32 limb products are made this many bytes at a time ...
MIN_BLOCK_COLUMNS = 2048          # ... but in blocks of at least this many of U's columns (small GEMMs run slower)


def pad_u(limbs: torch.Tensor, w: ring.RingWeight) -> torch.Tensor:
    """A pad block's R limbs uint8 [5, rows, in] -> U's limbs uint8 [5, rows, out], U = R W^T - 2^39 mod 2^40:
    ring.limb_matmul's int8 GEMM (R's five limbs stacked as one [5 rows, in] operand), a block of U's columns at
    a time: each block's two GEMMs (the weights' hi and lo planes, column slices of w.wt, no copy) and then its
    int32 products combined and cut into limbs in one compiled pass while they are still in cache. Whole, the
    products of a 256-row block of the LM head were 1.3 GB written and read back; in blocks the GEMM also runs
    faster (oneDNN on a [2048, 32768] operand: 330 G multiply-adds/s, in [2048, 2048] slices 420)."""
    _, T, n = limbs.shape
    out = w.out_features
    if w.wt.shape != (n, 2 * out) or w.wt.dtype != torch.int8 or w.offset.shape != (out,):
        raise ValueError(f"weights {w.wt.dtype} {tuple(w.wt.shape)} for a pad of width {n} and {out} outputs")
    signed = torch.bitwise_xor(limbs, 0x80).view(torch.int8).reshape(ring.LIMBS * T, n)  # b_j - 128 as int8
    offset = w.offset.contiguous()
    u = torch.empty((ring.LIMBS, T, out), dtype=torch.uint8)
    step = block_columns(T, out)
    for c0 in range(0, out, step):
        c1 = min(c0 + step, out)
        hi = torch._int_mm(signed, w.wt[:, c0:c1])                                 # [5 T, c1 - c0] int32
        lo = torch._int_mm(signed, w.wt[:, out + c0:out + c1])
        if not (hi.is_contiguous() and lo.is_contiguous()) or hi.dtype != torch.int32:
            raise ValueError(f"limb products {hi.dtype} {tuple(hi.shape)} strides {hi.stride()}")
        _fastpath.combine(hi.data_ptr(), lo.data_ptr(), c1 - c0, offset[c0:].data_ptr(), u[0, 0, c0:].data_ptr(),
                          T * out, out, T, c1 - c0, _threads(T))
    return u


def block_columns(rows: int, out: int) -> int:
    """How many of U's columns pad_u makes per GEMM for a block of `rows` rows: the int32 products of both
    planes within GEMM_BLOCK_BYTES, at least MIN_BLOCK_COLUMNS, split evenly in multiples of 64
    (or all of them)."""
    fit = max(MIN_BLOCK_COLUMNS, GEMM_BLOCK_BYTES // (ring.LIMBS * rows * 2 * 4))
    per_block = -(-out // -(-out // fit))                 # ceil(out / blocks): the blocks split evenly
    return min(out, -(-per_block // 64) * 64)
