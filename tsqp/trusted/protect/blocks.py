"""The runner's work on one protected request, a cache-sized block of rows at a time.

Masking a request and finishing its result each take several passes over the rows (quantize, add the pad,
cut into limbs; copy out of shared memory, range-check, subtract U, lift, dequantize, check). Over a whole
prefill every pass streamed the full tensor through memory, and every temporary above 32 MiB was
page-faulted in afresh (glibc maps and unmaps it); a block of rows stays in cache across its passes.
`scripts/protect_host_cost.py` times both on the model's shapes. BLOCK (elements of the input, resp. the
result, per block) was the fastest of 2^16..2^22 on a 2-core EPYC with 1 MiB of L2 per core and a 32 MiB L3,
for Llama-3.2-1B's widest input (8192) and output (16384); 2^16 took twice as long (the int8 GEMM of the
check wants rows), 2^22 up to 1.9 times.

Every step is row-wise, so the results equal, bit for bit, the same steps over the whole tensor
(`quant.quantize_rows`, `quant.dequantize`, which QuantizedOffload uses).
"""
from __future__ import annotations

import math
import time

import torch

from ... import quant, ring
from . import fast
from .fast import OutOfRange
from .freivalds import Freivalds
from .pads import PadRow

BLOCK = 1 << 19


class Scratch:
    """The buffers the blocks reuse, grown to the largest block seen (private to one offload, which masks and
    finishes one request at a time): a fresh one above glibc's mmap threshold is page-faulted in as it is
    written, every time."""

    def __init__(self):
        self.flat: dict[str, torch.Tensor] = {}        # name -> uint8 bytes
        self.views: dict[tuple, torch.Tensor] = {}     # (name, shape, dtype) -> its view (a decode step asks
        # for the same few dozen times a token: making a view costs more than the row's arithmetic)

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        key = (name, shape, dtype)
        view = self.views.get(key)
        if view is not None:
            return view
        n = math.prod(shape) * dtype.itemsize
        if name not in self.flat or self.flat[name].numel() < n:
            self.flat[name] = torch.empty(n, dtype=torch.uint8)
            self.views = {k: v for k, v in self.views.items() if k[0] != name}   # views of the old buffer
        if len(self.views) >= 256:
            self.views.clear()
        view = self.views[key] = self.flat[name][:n].view(dtype).view(shape)
        return view


class Results:
    """Float32 result buffers handed back by release(), for the next request of the same shape. A fresh
    buffer above glibc's mmap threshold is page-faulted in as it is first written: 32 ms against 6 ms for
    a reused one, for a 1024-token gate_up result (64 MiB). Holds at most `cap` bytes, memory each protected
    session keeps (a 1024-token Llama-3.2-1B prefill's four result shapes are 92 MiB, an 8B model's 168 MiB);
    a shape that does not fit empties it (prompt lengths vary; the ones of the current prompt come back)."""

    def __init__(self, cap: int = 256 * 2**20):
        self.cap, self.held, self.free = cap, 0, {}

    def take(self, shape: tuple[int, int]) -> torch.Tensor:
        stack = self.free.get(shape)
        if not stack:
            return torch.empty(shape, dtype=torch.float32)
        y = stack.pop()
        self.held -= y.nbytes
        return y

    def give(self, y: torch.Tensor) -> None:
        """y: a result the caller no longer reads."""
        if self.held + y.nbytes > self.cap:
            self.free.clear()
            self.held = 0
        if y.nbytes <= self.cap:
            self.free.setdefault(tuple(y.shape), []).append(y)
            self.held += y.nbytes


class one_thread_for:
    """A one-row request (a decode step's) runs its steps on the calling thread alone: each is too small to
    share, and waking torch's other threads for it cost more than the work: the runner's share of a verified
    decode token at Llama-3.2-1B's shapes on a 2-core VM (`scripts/protect_decode_cost.py`, six alternating
    pairs) went from 36-53 ms (median 50) to 24-38 ms (median 33). Larger requests keep every thread.
    torch's thread count is the process's: another thread (`tsqp api`'s other workers, the pad filler) runs
    on one thread meanwhile too. It cannot stick at 1: a block that finds 1 already set changes nothing.
    A class, not a generator: entered twice on each of a decode token's 65 calls, the generator's context
    manager cost more than the two thread-count calls (0.2 us)."""

    __slots__ = ("rows", "threads")

    def __init__(self, rows: int):
        self.rows, self.threads = rows, 1

    def __enter__(self) -> None:
        if self.rows <= 1:
            self.threads = torch.get_num_threads()
            if self.threads != 1:
                torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.threads != 1:
            torch.set_num_threads(self.threads)


def spans(total: int, width: int, block: int) -> list[tuple[int, int]]:
    """[a, b) row ranges of about `block` elements each, covering `total` rows of `width` elements."""
    rows = max(1, block // max(width, 1))
    return [(a, min(a + rows, total)) for a in range(0, total, rows)]


def rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """t[a:b], without making a view when it is all of t (a decode step's only block)."""
    return t if a == 0 and b == t.shape[0] else t[a:b]


def joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def mask(x: torch.Tensor, r: torch.Tensor, limbs: torch.Tensor, check: Freivalds | None,
         scratch: Scratch, quantized: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """x float [T, in], r int64 [T, in] (a pad's rows) -> limbs of B = quantize(x) + r mod 2^40 written into
    `limbs` uint8 [5, T, in]; returns (sx float32 [T] the rows' scales, the check's input parts [T, k] or
    None, seconds spent on the check). quantized: float32 [T, in] to keep the quantized rows in (for a check
    made later), instead of scratch. The compiled pass (fast.py) runs where it can: its check's input side is
    X . ws mod p itself, [T], and its time is the mask's (one loop).
    r may be a pads.PadRow (a decode step's one row, where the pool holds it): the compiled pass then returns
    the scale and the side as Python numbers (fast.mask_row), and finish takes them so."""
    if isinstance(r, PadRow):
        if fast.usable(x):
            scale, side = fast.mask_row(x, r, limbs, check.vectors if check is not None else None, quantized)
            return scale, side, 0.0
        r = r.r()
    if fast.usable(x, r, limbs) and limbs.is_contiguous():
        sx, side = fast.mask(x, r, limbs, check.vectors if check is not None else None, quantized)
        return _signed_zero_scales(x, sx), side, 0.0
    if r.dtype == torch.uint8:                     # a pool's planes: the reference reads them as int64
        r = ring.from_limbs(r)
    T, n = x.shape
    scales, parts, check_s = [], [], 0.0
    for a, b in spans(T, n, BLOCK):
        into = rows(quantized, a, b) if quantized is not None else scratch.take("quantized", (b - a, n), torch.float32)
        q, scale = quant.quantize_block(rows(x, a, b), out=into)
        scales.append(scale)
        if check is not None:
            t0 = time.perf_counter()
            parts.append(check.input_parts(q, scratch.take("float64", (b - a, n), torch.float64)))
            check_s += time.perf_counter() - t0
        masked = scratch.take("mask", (b - a, n)).copy_(q).add_(rows(r, a, b))     # to_limbs takes it mod 2^40
        ring.to_limbs(masked, out=limbs if b - a == T else limbs[:, a:b],
                      words=scratch.take("words", (2, b - a, n), torch.int32))
    return joined(scales), joined(parts) if parts else None, check_s


def _signed_zero_scales(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The compiled pass's scales, a zero one given the sign the reference gives it: over a block of rows
    quant._symmetric takes max(max x, -min x), and for a row of zeros that is -0.0 or 0.0 by the order of
    torch's reductions and of torch.maximum's vector lanes (a -0.0 scale makes the row's results -0.0), so
    those rows' scales are computed as the reference does, block by block, at the same vector positions.
    A block of one row takes max |x| (quant._one_row), 0.0, as the compiled pass does."""
    T, n = x.shape
    if T == 1:
        return scale
    zero = scale == 0
    if not bool(zero.any()):
        return scale
    for a, b in spans(T, n, BLOCK):
        here = zero[a:b]
        if b - a == 1 or not bool(here.any()):
            continue
        rows_x = x[a:b][here].to(torch.float32)                                   # [zeros, n]
        high, low = torch.zeros(b - a), torch.zeros(b - a)                        # [b - a]: the block's lanes
        high[here], low[here] = rows_x.amax(1), rows_x.amin(1)
        scale[a:b][here] = torch.maximum(high, low.neg_()).div_(quant.ACT_MAX)[here]
    return scale


def finish(z: torch.Tensor, u: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor, check: Freivalds | None,
           scratch: Scratch, y: torch.Tensor | None = None,
           offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The server's z = B W^T mod 2^40 (int64 [T, out], in memory it may still write) and the pad's
    U = R W^T - 2^39 mod 2^40, int64 [T, out] -> (y float32 [len(sx), out] dequantized, written into `y` when given; rows beyond
    len(sx) are padding and dropped; the check's output parts [T, k] or None; seconds spent checking).
    offsets: int64 [T, out] to keep Y + 2^39 in (for a check made later), instead of scratch. Raises OutOfRange.
    The compiled pass (fast.py) runs where it can: its check's output side is Y . s mod p itself, [T].
    u a pads.PadRow and sx a float (what mask gave for one): one row by fast.finish_row, its side an int."""
    if isinstance(u, PadRow):
        if isinstance(sx, float):
            if y is None:
                y = torch.empty((1, u.out_features), dtype=torch.float32)
            side = fast.finish_row(z, u, sx, sw, check.vectors if check is not None else None, y, offsets)
            return y, side, 0.0
        u = u.u()
    T, out = z.shape
    kept = sx.shape[0]
    if y is None:
        y = torch.empty((kept, out), dtype=torch.float32)
    if fast.usable(z, u) and z.dtype == torch.int64 and y.is_contiguous():
        return y, fast.finish(z, u, sx, sw, check.vectors if check is not None else None, y, offsets), 0.0
    if u.dtype == torch.uint8:
        u = ring.from_limbs(u)
    parts, check_s = [], 0.0
    for a, b in spans(T, out, BLOCK):
        low, high = torch.aminmax(rows(z, a, b))        # strictness only: z is used mod 2^40 below
        if int(low) < 0 or int(high) >= ring.MOD:
            raise OutOfRange("a value lies outside [0, 2^40)")
        # z is read once more, into private memory: what is unmasked, dequantized and checked is that copy,
        # whatever the server writes meanwhile
        into = rows(offsets, a, b) if offsets is not None else scratch.take("finish", (b - a, out))
        offset = torch.sub(rows(z, a, b), rows(u, a, b), out=into)
        offset.bitwise_and_(ring.MASK)                                        # Y + 2^39 in [0, 2^40)
        if a < kept:
            e = min(b, kept)
            signed = torch.sub(offset[:e - a], ring.HALF, out=scratch.take("signed", (e - a, out)))   # Y
            quant.dequantize_into(rows(y, a, e), signed, rows(sx, a, e), sw)
        if check is not None:
            t0 = time.perf_counter()
            parts.append(check.output_parts(offset))
            check_s += time.perf_counter() - t0
    return y, joined(parts) if parts else None, check_s
