"""Exact arithmetic in the ring Z_2^40, shared by both sides: limbs, the limb matmul, the signed lift.

A ring element travels as LIMBS = 5 bytes (limb j = byte j, little-endian): a tensor of T x n elements is
uint8 [5, T, n]. The weights are integers of up to 12 bits (quant.py), |W| <= WEIGHT_MAX = 2047, held as two
int8 planes W = 2^6 hi + lo with lo in [-32, 31] and hi in [-32, 32]. The matmul B @ W^T mod 2^40 runs as
one int8 GEMM with int32 accumulation (`torch._int_mm`): the 5 limbs stacked as rows, recentred to int8,
times both planes side by side:

    B = sum_j 2^(8j) b_j = sum_j 2^(8j) (b_j - 128) + 128 * sum_j 2^(8j)
    B W^T = sum_j 2^(8j) (2^6 H_j + L_j) + offset,  H_j = (b_j - 128) hi^T,  L_j = (b_j - 128) lo^T,
    offset = 128 colsum(W) sum_j 2^(8j)

Every int32 sum H_j, L_j is exact (|.| <= 128 * 32 * n < 2^31 for n <= MAX_IN). They are combined in int64 as
sum_{j<4} 2^(8j) (2^6 H_j + L_j) + 2^32 ((2^6 H_4 + L_4) mod 2^8) + (offset mod 2^40): |sum| < 2^43 n, far
from overflow (2^32 times the last limb's sum is only needed mod 2^40), and reduced mod 2^40.
Both the server (the product of masked input) and the runner (the pads' U = R W^T) use `limb_matmul`.
"""
from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":
    raise ImportError("tsqp.ring reads an int64's limbs as its first bytes: little-endian hosts only")

K = 40                       # ring Z_2^K
LIMBS = K // 8               # bytes per element
MOD = 1 << K
MASK = MOD - 1
HALF = 1 << (K - 1)
WEIGHT_MAX = 2047                        # 12-bit weights: two int8 planes of SPLIT bits below
SPLIT = 6                                # W = 2^SPLIT hi + lo
MAX_IN = (2**31 - 1) // (128 * 32)       # 524287: int32 accumulation of a plane product stays exact

# _int_mm on CUDA wants more than 16 rows and both other dimensions a multiple of 8 (the CPU kernel takes
# any shape); zero padding keeps the product exact.
CUDA_MIN_ROWS, CUDA_MULTIPLE = 17, 8
GATHER_BELOW = 1 << 16                   # to_limbs: elements below which one strided copy beats the planes


def to_limbs(b: torch.Tensor, out: torch.Tensor | None = None, words: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [T, n] -> its residues mod 2^40 as uint8 [5, T, n] (limb j = byte j), written into `out` when
    given: only an element's five low bytes are read, so it need not be reduced first (a two's complement
    negative's low bytes are its residue's). `words`: int32 [2, T, n] to work in (a fresh one per call is
    page-faulted in as it is written).
    Plane by plane: each narrowing copy keeps the low byte (mod 2^8). Bytes 0-3 are shifted out of an int32
    copy of the low words (half the memory traffic of int64); byte 4 is the high word's low byte. Gathering
    the 5 low of each element's 8 bytes in one strided copy took as long at 2^19 elements and longer above, but
    below 2^16 that one copy is faster (a decode step's 1 x 576 row: 6 us against 32 us)."""
    if out is None:
        out = torch.empty((LIMBS, *b.shape), dtype=torch.uint8, device=b.device)
    b = b.contiguous()
    if b.numel() < GATHER_BELOW:           # a decode step's row: one strided copy, not six calls' overhead
        return out.copy_(b.view(torch.uint8).view(*b.shape, 8)[..., :LIMBS].permute(2, 0, 1))
    if words is None:
        words = torch.empty((2, *b.shape), dtype=torch.int32, device=b.device)
    high = b.view(torch.int32)[..., 1::2]                                         # bits 32-63 of each
    low, shifted = words[0].copy_(b), words[1]                                    # bytes 0-3 (mod 2^32)
    out[0].copy_(low)
    for j in range(1, 4):
        out[j].copy_(torch.bitwise_right_shift(low, 8 * j, out=shifted))
    out[4].copy_(high)
    return out


def from_limbs(limbs: torch.Tensor) -> torch.Tensor:
    """uint8 [5, T, n] -> int64 [T, n] in [0, 2^40)."""
    b = torch.zeros(limbs.shape[1:], dtype=torch.int64, device=limbs.device)
    b.view(torch.uint8).view(*b.shape, 8)[..., :LIMBS].copy_(limbs.permute(1, 2, 0))   # [T, n, 5]
    return b


def lift(y: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^40) (or any int64, read mod 2^40) -> the signed representative in [-2^39, 2^39),
    in place."""
    return y.add_(HALF).bitwise_and_(MASK).sub_(HALF)


def _pad_to(n: int, multiple: int) -> int:
    return -n % multiple


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """x with strides (columns, 1). torch 2.13's CPU _int_mm misreads a 'contiguous' operand whose size-1
    dimension carries another stride (e.g. W^T of a one-column W: [1, n] with strides (1, 1))."""
    if x.stride() == (x.shape[1], 1):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def int_mm(a: torch.Tensor, b: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """Exact int8 [m, k] @ int8 [k, n] -> int32 [m, n]. pad: zero-pad to the CUDA kernel's shape rules
    (default: on CUDA only; the CPU kernel takes any shape, padding there only tests the padding)."""
    a, b = _row_major(a), _row_major(b)
    if pad if pad is not None else a.is_cuda:
        m, k = a.shape
        n = b.shape[1]
        pm, pk, pn = max(CUDA_MIN_ROWS - m, 0), _pad_to(k, CUDA_MULTIPLE), _pad_to(n, CUDA_MULTIPLE)
        if pm or pk or pn:
            a = torch.nn.functional.pad(a, (0, pk, 0, pm))
            b = torch.nn.functional.pad(b, (0, pn, 0, pk))
            return torch._int_mm(a, b)[:m, :n]
    return torch._int_mm(a, b)


def _combine(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """The planes' limb products, int32 [5, T, out] each -> sum_j 2^(8j) (2^6 hi_j + lo_j) mod 2^40 as int64
    (not yet reduced; |sum| < 2^43 n)."""
    y = torch.zeros(hi.shape[1:], dtype=torch.int64, device=hi.device)
    for j in range(LIMBS - 1):
        y.add_(hi[j], alpha=1 << (8 * j + SPLIT)).add_(lo[j], alpha=1 << (8 * j))
    last = hi[-1].to(torch.int64).mul_(1 << SPLIT).add_(lo[-1]).bitwise_and_(0xFF)    # mod 2^8, before 2^32 x
    return y.add_(last, alpha=1 << (8 * (LIMBS - 1)))


def planes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer weights [out, in] with |q| <= WEIGHT_MAX -> int8 (hi, lo) with q = 2^SPLIT hi + lo."""
    q = q.to(torch.int16)
    lo = (q + 32).bitwise_and_((1 << SPLIT) - 1).sub_(32)                            # q mod 64, in [-32, 31]
    hi = (q - lo).bitwise_right_shift_(SPLIT)                                         # exact: [-32, 32]
    return hi.to(torch.int8), lo.to(torch.int8)


class RingWeight:
    """Public integer weights W [out, in] (|W| <= WEIGHT_MAX) prepared for `limb_matmul`: both int8 planes
    transposed side by side, [in, 2 out] row-major (the fast layout for the CPU kernel), and the constant the
    recentred limbs leave out, 128 colsum(W) sum_j 2^(8j) mod 2^40."""

    def __init__(self, q: torch.Tensor, device: str | torch.device = "cpu"):
        if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64) or q.dim() != 2:
            raise ValueError(f"ring weights must be integers [out, in], got {q.dtype} {tuple(q.shape)}")
        if q.numel() and int(q.abs().max()) > WEIGHT_MAX:
            raise ValueError(f"ring weights must lie in [-{WEIGHT_MAX}, {WEIGHT_MAX}] (the int32 bound assumes it)")
        if q.shape[1] > MAX_IN:
            raise ValueError(f"input width {q.shape[1]} exceeds {MAX_IN}: int32 accumulation would not be exact")
        self.out_features, self.in_features = q.shape
        hi, lo = planes(q)
        self.wt = torch.cat([hi, lo]).t().contiguous().to(device)                   # [in, 2 out]
        colsum128 = (128 * q.sum(1, dtype=torch.int64)).bitwise_and_(MASK)         # [out] mod 2^40
        offset = torch.zeros_like(colsum128)
        for j in range(LIMBS):      # 2^(8j) colsum128 mod 2^40, each term below 2^40: no int64 overflow
            offset += colsum128.bitwise_and((1 << (K - 8 * j)) - 1) << (8 * j)
        self.offset = offset.bitwise_and_(MASK).to(device)


def limb_matmul(limbs: torch.Tensor, w: RingWeight, pad: bool | None = None) -> torch.Tensor:
    """uint8 [5, T, in] (B's limbs) -> int64 [T, out] = B W^T mod 2^40, exact."""
    _, T, n = limbs.shape
    signed = torch.bitwise_xor(limbs, 0x80).view(torch.int8)                      # b_j - 128 as int8
    p = int_mm(signed.reshape(LIMBS * T, n), w.wt, pad).view(LIMBS, T, -1)        # [5, T, 2 out] int32
    out = w.out_features
    return _combine(p[..., :out], p[..., out:]).add_(w.offset).bitwise_and_(MASK)
