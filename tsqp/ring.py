"""Exact arithmetic in the ring Z_2^40, shared by both sides: limbs, the limb matmul, the signed lift.

A ring element travels as LIMBS = 5 bytes (limb j = byte j, little-endian): a tensor of T x n elements is
uint8 [5, T, n]. The matmul B @ W^T mod 2^40 of such limbs with int8 weights W [out, n] runs as one int8
GEMM with int32 accumulation (`torch._int_mm`) over the 5 limbs stacked as rows, recentred to int8:

    B = sum_j 2^(8j) b_j = sum_j 2^(8j) (b_j - 128) + 128 * sum_j 2^(8j)
    B W^T = sum_j 2^(8j) P_j + offset,  P_j = (b_j - 128) W^T,  offset = 128 colsum(W) sum_j 2^(8j)

Every int32 sum P_j is exact while n * 128 * 127 < 2^31, i.e. n <= MAX_IN. They are combined in int64
as P_0 + 2^8 P_1 + 2^16 P_2 + 2^24 P_3 + 2^32 (P_4 mod 2^8) + (offset mod 2^40): |sum| < 2^56, so no
int64 operation overflows (2^32 P_4 is only needed mod 2^40), and the result is reduced mod 2^40.
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
MAX_IN = (2**31 - 1) // (128 * 127)      # 132104: int32 accumulation of a limb product stays exact

# _int_mm on CUDA wants more than 16 rows and both other dimensions a multiple of 8 (the CPU kernel takes
# any shape); zero padding keeps the product exact.
CUDA_MIN_ROWS, CUDA_MULTIPLE = 17, 8


def to_limbs(b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [T, n] in [0, 2^40) -> uint8 [5, T, n] (limb j = byte j), written into `out` when given:
    the low 5 of each element's 8 little-endian bytes, in one strided copy."""
    if out is None:
        out = torch.empty((LIMBS, *b.shape), dtype=torch.uint8, device=b.device)
    data = b.contiguous().view(torch.uint8).view(*b.shape, 8)                     # [T, n, 8]
    return out.copy_(data[..., :LIMBS].permute(2, 0, 1))                          # [5, T, n]


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


def _combine(parts: list[torch.Tensor]) -> torch.Tensor:
    """Five integer tensors with |part| < 2^31 -> sum_j 2^(8j) part_j mod 2^40 as int64 (|sum| < 2^56)."""
    y = parts[0].to(torch.int64, copy=True)
    for j in range(1, LIMBS - 1):
        y.add_(parts[j], alpha=1 << (8 * j))
    y.add_(parts[-1].bitwise_and(0xFF), alpha=1 << (8 * (LIMBS - 1)))      # 2^32 P_4 mod 2^40
    return y


class RingWeight:
    """Public int8 weights W [out, in] prepared for `limb_matmul`: W^T contiguous (the fast layout for the
    CPU kernel) and the constant the recentred limbs leave out, 128 colsum(W) sum_j 2^(8j) mod 2^40."""

    def __init__(self, q: torch.Tensor, device: str | torch.device = "cpu"):
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"ring weights must be int8 [out, in], got {q.dtype} {tuple(q.shape)}")
        if q.numel() and int(q.min()) < -127:
            raise ValueError("ring weights must lie in [-127, 127] (the int32 bound assumes it)")
        if q.shape[1] > MAX_IN:
            raise ValueError(f"input width {q.shape[1]} exceeds {MAX_IN}: int32 accumulation would not be exact")
        self.out_features, self.in_features = q.shape
        self.wt = _row_major(q.t()).to(device)                                    # [in, out]
        colsum128 = 128 * q.sum(1, dtype=torch.int64)                             # [out], |.| < 2^31
        self.offset = _combine([colsum128] * LIMBS).bitwise_and_(MASK).to(device)


def limb_matmul(limbs: torch.Tensor, w: RingWeight, pad: bool | None = None) -> torch.Tensor:
    """uint8 [5, T, in] (B's limbs) -> int64 [T, out] = B W^T mod 2^40, exact."""
    _, T, n = limbs.shape
    signed = torch.bitwise_xor(limbs, 0x80).view(torch.int8)                      # b_j - 128 as int8
    p = int_mm(signed.reshape(LIMBS * T, n), w.wt, pad).view(LIMBS, T, -1)        # [5, T, out] int32
    return _combine(list(p)).add_(w.offset).bitwise_and_(MASK)
