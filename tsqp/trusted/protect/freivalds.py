"""Freivalds checks of the server's integer products, exact in int64.

Per (op, layer) the runner keeps a secret s uniform mod PRIME (CSPRNG) and ws = W^T s mod PRIME. A result
Y [T, out] (already unmasked and lifted to signed) passes iff, for every row t,
    Y[t] . s == X[t] . ws   (mod PRIME).
Why one repetition suffices: the lift maps any returned value into [-2^39, 2^39), and |X W^T| < 2^39, so a
wrong row differs from the true one by a nonzero integer vector e with |e| < 2^40 < PRIME: e is nonzero
mod PRIME and e . s == 0 with probability 1/PRIME < 2^-41 over s, which the server never sees. (A prime
below that error range would let the server add a multiple of the prime undetected.) The secret is
reused across calls, which is sound while a failed check ends the session (masked.py does so): until then
the server's view does not depend on s.

Exactness in int64 (no sum may reach 2^63). PRIME < 2^42, so s and ws split into two 21-bit limbs
v = v0 + 2^21 v1 with v0, v1 in [0, 2^21). `matvec_mod` multiplies int64 rows a with |a| <= 2^21 by each
limb: every product has |a v_k| < 2^42 and a row of n terms stays below n 2^42 < 2^63 for n < 2^21
(MAX_TERMS; vocabularies are ~2^17). Partial results are reduced to [0, PRIME) before being shifted:
x < 2^42 times 2^21 is < 2^63. Operands: X quantized, |X| <= 32767 < 2^15; Y split into 20-bit limbs,
Y = y0 + 2^20 y1 with y0 in [0, 2^20) and |y1| <= 2^21 for |Y| <= 2^41; W of up to 12 bits, |W| <= 2047.
"""
from __future__ import annotations

import torch

from .pads import uniform_below

PRIME = 2**41 + 27          # 2199023255579: the smallest prime above 2^41 (tests prove it with Miller-Rabin)
LIMB_BITS = 21
LIMB_MASK = (1 << LIMB_BITS) - 1
Y_LIMB_BITS = 20
MAX_TERMS = (1 << LIMB_BITS) - 1


class VerificationError(RuntimeError):
    """The server's result failed a check; the message names the op and the layer."""

    def __init__(self, op: str, layer: int | None, detail: str):
        super().__init__(f"verification failed for op '{op}' layer {layer}: {detail}")
        self.op, self.layer = op, layer


def split_limbs(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v int64 in [0, 2^42) -> (v0, v1) in [0, 2^21) with v = v0 + 2^21 v1."""
    return v & LIMB_MASK, v >> LIMB_BITS


def mulpow2_mod(x: torch.Tensor, bits: int, prime: int) -> torch.Tensor:
    """x * 2^bits mod prime for x in [0, prime), prime < 2^42, bits <= 21: x << bits < 2^63."""
    return torch.remainder(x << bits, prime)


def matvec_mod(a: torch.Tensor, v_limbs: tuple[torch.Tensor, torch.Tensor], prime: int) -> torch.Tensor:
    """a int64 [T, n] with |a| <= 2^21, v = v0 + 2^21 v1 ([n] each in [0, 2^21)) -> a v mod prime, [T] in
    [0, prime)."""
    if a.shape[-1] > MAX_TERMS:
        raise ValueError(f"{a.shape[-1]} terms per row would overflow int64 (at most {MAX_TERMS})")
    low = torch.remainder(torch.mv(a, v_limbs[0]), prime)                          # |a v0| sums < 2^63
    high = torch.remainder(torch.mv(a, v_limbs[1]), prime)
    return torch.remainder(low + mulpow2_mod(high, LIMB_BITS, prime), prime)


class Freivalds:
    """The check for one (op, layer) with integer weights q [out, in] (|q| <= 2047); `prime` is PRIME unless a
    test wants a weaker one."""

    def __init__(self, q: torch.Tensor, prime: int = PRIME):
        if not 2 < prime < 1 << 42:
            raise ValueError("the limb arithmetic needs a prime below 2^42")
        self.prime = prime
        out_features, in_features = q.shape
        s = uniform_below(prime, out_features)                                      # [out], secret
        self._s_limbs = split_limbs(s)
        self._ws_limbs = split_limbs(self._weighted_columns(q))                   # [in] = W^T s mod p

    def _weighted_columns(self, q: torch.Tensor) -> torch.Tensor:
        """W^T s mod p, [in]: each W^T s_k summed exactly in int64 (|.| < 2^11 * 2^21 * out < 2^49 for
        out < 2^17), a block of output rows at a time so that no int64 copy of the whole W is made."""
        block = 4096
        sums = torch.zeros((2, q.shape[1]), dtype=torch.int64)                    # [2, in]
        for start in range(0, q.shape[0], block):
            rows = q[start:start + block].to(torch.int64).t()                      # [in, block]
            for k, limb in enumerate(self._s_limbs):
                sums[k] += torch.mv(rows, limb[start:start + block])
        low, high = torch.remainder(sums, self.prime)
        return torch.remainder(low + mulpow2_mod(high, LIMB_BITS, self.prime), self.prime)

    def rows_ok(self, x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """x int64 [T, in] (|x| < 2^15), y int64 [T, out] (|y| <= 2^41) -> bool [T]: row t passes.
        scratch: int64 like y, to hold each of y's limbs in turn (else one is allocated per limb)."""
        p = self.prime
        limb = torch.empty_like(y) if scratch is None else scratch
        y0 = matvec_mod(torch.bitwise_and(y, (1 << Y_LIMB_BITS) - 1, out=limb), self._s_limbs, p)   # y = y0
        y1 = matvec_mod(torch.bitwise_right_shift(y, Y_LIMB_BITS, out=limb), self._s_limbs, p)      # + 2^20 y1
        lhs = torch.remainder(y0 + mulpow2_mod(y1, Y_LIMB_BITS, p), p)
        rhs = matvec_mod(x, self._ws_limbs, p)
        return lhs == rhs

    def verify(self, x: torch.Tensor, y: torch.Tensor, op: str, layer: int | None,
               scratch: torch.Tensor | None = None) -> None:
        ok = self.rows_ok(x, y, scratch)
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten().tolist()
            raise VerificationError(op, layer, f"Freivalds check failed on row(s) {bad[:8]} of {y.shape[0]}")
