"""Freivalds checks of the server's integer products, exact in integer arithmetic.

Per (op, layer) the runner keeps a secret s uniform mod PRIME (CSPRNG) and ws = W^T s mod PRIME. A result
Y [T, out] passes iff, for every row t,
    Y[t] . s == X[t] . ws   (mod PRIME).
Why one repetition suffices: the runner lifts every returned value into [-2^39, 2^39), and |X W^T| < 2^39,
so a wrong row differs from the true one by a nonzero integer vector e with |e| < 2^40 < PRIME: e is nonzero
mod PRIME and e . s == 0 with probability 1/PRIME < 2^-41 over s, which the server never sees. (A prime
below that error range would let the server add a multiple of the prime undetected.) The secret is
reused across calls, which is sound while a failed check ends the session (masked.py does so): until then
the server's view does not depend on s.

Both sides of the check are computed exactly, each with the fast kernel its operands allow:
  X . ws (`input_side`)   X holds 16-bit integers: a float64 GEMM against ws cut into limbs of b bits,
                          exact while every row sum 2^15 2^b in stays below 2^53 (b = 21 up to 2^17 inputs).
  Y . s  (`output_side`)  Y + 2^39 is in [0, 2^40): its five low bytes, recentred to int8 in place (xor
                          0x80), are read as an int8 matrix [T, 8 out] (bytes 5..7 meet zero rows) and
                          multiplied by 2^(8j) s_k mod PRIME cut into limbs of L bits (int8 [8 out, N]) in
                          one int8 GEMM (`torch._int_mm`, VNNI on the CPU), exact in int32 while
                          128 (2^L - 1) 5 out < 2^31. This reads Y once, as 8 bytes a value; int64
                          matrix-vector products over 20-bit limbs of Y took 3.5 times as long. The
                          secret side is 8 limb columns (the kernel's fast layout) while L >= 6: a wider
                          output (an LM head's vocabulary) is cut into chunks of at most 53,261 outputs,
                          one GEMM each, instead of narrower limbs in 16 columns (twice the secret bytes
                          read per row: 16 MiB against 8 for Llama-3.2-1B's 128,256).
The limb sums, a few per row and side, are combined mod PRIME in int64 in one pass for both sides
(`WeightedSum`, `passes`).
"""
from __future__ import annotations

import torch

from ... import ring
from . import fast
from .pads import uniform_below

PRIME = 2**41 + 27          # 2199023255579: the smallest prime above 2^41 (tests prove it with Miller-Rabin)
LIMB_BITS = 21
LIMB_MASK = (1 << LIMB_BITS) - 1
MAX_TERMS = (1 << LIMB_BITS) - 1
FLOAT64_EXACT = 1 << 53
LIVE_BYTES = ring.LIMBS                              # the bytes of Y + 2^39 that can be nonzero


class VerificationError(RuntimeError):
    """The server's result failed a check; the message names the op and the layer."""

    def __init__(self, op: str, layer: int | None, detail: str):
        super().__init__(f"verification failed for op '{op}' layer {layer}: {detail}")
        self.op, self.layer = op, layer


def mulpow2_mod(x: torch.Tensor, bits: int, prime: int) -> torch.Tensor:
    """x * 2^bits mod prime for x in [0, prime), prime < 2^42, bits <= 21: x << bits < 2^63."""
    return torch.remainder(x << bits, prime)


class WeightedSum:
    """parts int64 [T, k] (any values) -> sum_i parts[:, i] c_i mod prime, [T] in [0, prime), for k fixed
    integer coefficients. In int64: each part is reduced first (< 2^42), each c_i cut into 21-bit limbs, so
    a product stays below 2^63, and so does a sum of k < 2^21 reduced products. Up to PYTHON_ROWS rows (a
    decode step) Python's integers do it: a dozen tensor ops cost more than the arithmetic."""

    PYTHON_ROWS = 4

    def __init__(self, coefficients: list[int], prime: int):
        self.coefficients = [v % prime for v in coefficients]
        c = torch.tensor(self.coefficients, dtype=torch.int64)                    # [k]
        self.low, self.high, self.prime = c & LIMB_MASK, c >> LIMB_BITS, prime

    def __call__(self, parts: torch.Tensor) -> torch.Tensor:
        p = self.prime
        if parts.shape[0] <= self.PYTHON_ROWS:
            return torch.tensor([sum(v * c for v, c in zip(row, self.coefficients)) % p
                                 for row in parts.tolist()], dtype=torch.int64)
        a = torch.remainder(parts, p)                                              # [T, k]
        low = torch.remainder(a * self.low, p).sum(1)
        high = torch.remainder(torch.remainder(a * self.high, p).sum(1), p)
        return torch.remainder(low + mulpow2_mod(high, LIMB_BITS, p), p)          # low < 2^63 - 2^42


def cut(v: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """v int64 >= 0 [n] -> its `count` limbs of `bits` bits, low first, int64 [n, count]."""
    return torch.stack([(v >> (bits * i)) & ((1 << bits) - 1) for i in range(count)], 1)


def int8_gemm_is_exact() -> bool:
    """Whether this machine's int8 GEMM (the kernel the result side uses, in its column-major layout) sums
    exactly at the operand extremes. A kernel that saturates 16-bit pair sums (int8 GEMMs without VNNI may)
    would break the exactness the check's soundness rests on, so the runner refuses to check with it."""
    global _GEMM_EXACT
    if _GEMM_EXACT is None:
        ok = True
        for rows, width in ((1, 8192), (2, 256), (17, 1024)):        # a decode step's one row, prefill blocks
            for a_value, b_value in ((127, 127), (127, -128), (-128, -128), (-128, 127)):
                a = torch.full((rows, width), a_value, dtype=torch.int8)
                b = torch.full((8, width), b_value, dtype=torch.int8)               # [8, K], used as [K, 8]
                ok &= torch.equal(torch._int_mm(a, b.t()).to(torch.int64),
                                  a.to(torch.int64) @ b.to(torch.int64).t())
        _GEMM_EXACT = ok
    return _GEMM_EXACT


_GEMM_EXACT: bool | None = None


def output_chunks(out_features: int) -> list[tuple[int, int]]:
    """[a, b) output ranges, as few and as even as keep every chunk's limbs at least 6 bits wide (8 columns)."""
    widest = ((1 << 31) - 1) // (128 * ((1 << 6) - 1) * LIVE_BYTES)                 # 53,261 outputs
    n = -(-out_features // widest)
    size = -(-out_features // n)
    return [(a, min(a + size, out_features)) for a in range(0, out_features, size)]


def output_limb_bits(out_features: int) -> int:
    """The widest limb L <= 7 of 2^(8j) s_k for which the int8 GEMM over out_features values stays exact:
    every product is at most 128 (2^L - 1) and a row has 5 out_features nonzero ones."""
    bits = 7
    while bits and 128 * ((1 << bits) - 1) * LIVE_BYTES * out_features >= 1 << 31:
        bits -= 1
    if not bits:
        raise ValueError(f"{out_features} outputs are too many for an exact int32 check")
    return bits


class Freivalds:
    """The check for one (op, layer) with integer weights q [out, in] (|q| <= 2047); `prime` is PRIME unless a
    test wants a weaker one."""

    def __init__(self, q: torch.Tensor, prime: int = PRIME):
        if not 2 < prime < 1 << 42:
            raise ValueError("the limb arithmetic needs a prime below 2^42")
        out_features, in_features = q.shape
        if max(q.shape) > MAX_TERMS:
            raise ValueError(f"a weight of shape {tuple(q.shape)} is too large for exact int64 sums")
        if not int8_gemm_is_exact():
            raise RuntimeError("this machine's int8 GEMM (torch._int_mm) is not exact at its operand extremes: "
                               "the Freivalds check cannot rely on it")
        self.prime = prime
        s = uniform_below(prime, out_features)                                      # [out], secret
        # X . ws: ws in limbs of in_bits bits, float64 [in, count]
        self.in_bits = min(LIMB_BITS, (FLOAT64_EXACT.bit_length() - 1) - 15 - in_features.bit_length())
        count = -(-prime.bit_length() // self.in_bits)
        ws = self._weighted_columns(q, s)                                          # [in] mod p
        self.vectors = fast.CheckVectors(ws, s, prime)                              # the compiled passes' form
        self._ws = cut(ws, self.in_bits, count).to(torch.float64)
        input_weights = [1 << (self.in_bits * i) for i in range(count)]
        # Y . s: 2^(8j) s_k mod p at row 8k + j (zero for the bytes above the fifth), in limbs of out_bits bits
        self.chunks = output_chunks(out_features)
        self.out_bits = output_limb_bits(max(b - a for a, b in self.chunks))
        count = -(-prime.bit_length() // self.out_bits)
        shifted = torch.zeros((out_features, 8), dtype=torch.int64)               # [out, 8]
        shifted[:, 0] = s
        for j in range(1, LIVE_BYTES):
            shifted[:, j] = mulpow2_mod(shifted[:, j - 1], 8, prime)
        limbs = cut(shifted.flatten(), self.out_bits, count).to(torch.int8)         # [8 out, count]
        # per chunk, held column-major, `count` rounded up to 8 with zero columns: torch's CPU kernel took
        # 43-56 us for one row times a row-major [24576, 6] operand, 4 us for this layout (same result)
        width = -(-count // 8) * 8
        self._s_bytes = []                                                          # [width, 8 chunk] each
        for a, b in self.chunks:
            chunk = torch.zeros((width, 8 * (b - a)), dtype=torch.int8)
            chunk[:count] = limbs[8 * a:8 * b].t()
            self._s_bytes.append(chunk)
        output_weights = ([1 << (self.out_bits * i) for i in range(count)] + [0] * (width - count)) \
            * len(self.chunks)
        # Y + 2^39 = sum_{j<5} 2^(8j) (b'_j + 128) with b' the recentred bytes, so
        # Y . s = [b' products] + (128 sum_{j<5} 2^(8j) - 2^39) sum_k s_k
        s_sum = int(torch.remainder(s, prime).sum()) % prime                        # < 2^21 2^42: no overflow
        self._y_offset = (128 * sum(1 << (8 * j) for j in range(LIVE_BYTES)) - ring.HALF) * s_sum % prime
        self._input_sum = WeightedSum(input_weights, prime)
        self._output_sum = WeightedSum(output_weights, prime)
        # a row passes iff [output parts] - [input parts] + y_offset == 0 mod p: one sum for both sides
        self._difference = WeightedSum(output_weights + [-w for w in input_weights], prime)
        self._passing_total = -self._y_offset % prime

    def _weighted_columns(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """W^T s mod p, [in]: s in two 21-bit limbs, each W^T s_k summed exactly in int64
        (|.| < 2^11 2^21 out < 2^53), a block of output rows at a time so that no int64 copy of the whole
        W is made."""
        block = 4096
        sums = torch.zeros((2, q.shape[1]), dtype=torch.int64)                    # [2, in]
        s_limbs = (s & LIMB_MASK, s >> LIMB_BITS)
        for start in range(0, q.shape[0], block):
            rows = q[start:start + block].to(torch.int64).t()                      # [in, block]
            for k, limb in enumerate(s_limbs):
                sums[k] += torch.mv(rows, limb[start:start + block])
        return WeightedSum([1, 1 << LIMB_BITS], self.prime)(sums.t())

    def input_parts(self, x: torch.Tensor, work: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] of integers with |x| <= 32767 (any real or integer dtype) -> int64 [T, count]: X times
        each limb of ws, exact. work: float64 [T, in] to convert x in."""
        x64 = x.to(torch.float64) if work is None else work.copy_(x)
        return (x64 @ self._ws).to(torch.int64)

    def output_parts(self, y_offset: torch.Tensor) -> torch.Tensor:
        """Y + 2^39, int64 [T, out] in [0, 2^40), row-major -> int32 [T, 8 chunks]: the recentred bytes times
        each limb of 2^(8j) s_k, per chunk of outputs, exact. CONSUMES its argument: its bytes are recentred in place."""
        T = y_offset.shape[0]
        recentred = y_offset.view(torch.uint8).bitwise_xor_(0x80).view(torch.int8).view(T, -1)   # [T, 8 out]
        if len(self.chunks) == 1:
            return torch._int_mm(recentred, self._s_bytes[0].t())
        return torch.cat([torch._int_mm(recentred[:, 8 * a:8 * b], s.t())
                          for (a, b), s in zip(self.chunks, self._s_bytes)], 1)

    def passes(self, output_parts: torch.Tensor, input_parts: torch.Tensor) -> torch.Tensor:
        """Both sides' parts for the same rows -> bool [T]: Y[t] . s == X[t] . ws mod p. Parts of one
        dimension are the sides themselves, reduced (the compiled passes', fast.py); one row's sides as Python
        integers (fast.mask_row / finish_row) give one bool."""
        if isinstance(output_parts, int):
            return output_parts == input_parts
        if output_parts.dim() == 1:
            return output_parts == input_parts
        if output_parts.shape[0] <= WeightedSum.PYTHON_ROWS:        # a decode step: Python's integers, no cat
            c, p = self._difference.coefficients, self.prime
            return torch.tensor([sum(v * w for v, w in zip(out + inp, c)) % p == self._passing_total
                                 for out, inp in zip(output_parts.tolist(), input_parts.tolist())], dtype=torch.bool)
        return self._difference(torch.cat([output_parts.to(torch.int64), input_parts], 1)) == self._passing_total

    def copies_pass(self, quantized: torch.Tensor, y_offset: torch.Tensor) -> torch.Tensor:
        """A deferred check: the input's integers float32 [T, in] and Y + 2^39 int64 [T, out] (consumed)
        -> bool [T], by the compiled passes where they run."""
        if fast.usable(quantized, y_offset):
            return fast.output_side(self.vectors, y_offset) == fast.input_side(self.vectors, quantized)
        return self.passes(self.output_parts(y_offset), self.input_parts(quantized))

    def input_side(self, x: torch.Tensor) -> torch.Tensor:
        """X . ws mod p, int64 [T] (what `passes` compares, reduced on its own)."""
        return self._input_sum(self.input_parts(x))

    def output_side(self, y_offset: torch.Tensor) -> torch.Tensor:
        """Y . s mod p, int64 [T], from Y + 2^39 (consumed, as in output_parts)."""
        return torch.remainder(self._output_sum(self.output_parts(y_offset).to(torch.int64)) + self._y_offset,
                               self.prime)

    def rows_ok(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [T, in] (|x| <= 32767), y int64 [T, out] (|y| <= 2^39) -> bool [T]: row t passes."""
        if y.numel() and not -ring.HALF <= int(y.min()) <= int(y.max()) < ring.HALF:
            raise ValueError("a checked result must be lifted to [-2^39, 2^39)")
        return self.passes(self.output_parts(y + ring.HALF), self.input_parts(x))


def failing_rows(ok: torch.Tensor | bool, op: str, layer: int | None) -> None:
    """Raise VerificationError naming the first rows where ok (bool [T], or one row's bool) is False."""
    if ok is True:
        return
    if ok is False:
        raise VerificationError(op, layer, "Freivalds check failed on row(s) [0] of 1")
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten().tolist()
        raise VerificationError(op, layer, f"Freivalds check failed on row(s) {bad[:8]} of {ok.shape[0]}")
