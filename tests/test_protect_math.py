"""Protected offload's math, in-process: the Z_2^40 limb matmul, one-time pads and their pool, Freivalds
checks against a hostile server, and a protected model run equal bit for bit to the unmasked quantized one.

Oracles: int64 matmuls for the ring, a float64 GEMM (QuantizedOffload) for the model, the float model for
quantization's error, deterministic Miller-Rabin for the prime, chi-square for the pads' bytes, and real
attacks (every FaultInjector kind, multiples of a small prime). Test data comes from ChaCha20 keystreams.
Run with -s to see the measured figures (fill rate, verification cost)."""
from __future__ import annotations

import ast
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsqp import quant, ring
from tsqp import weights as W
from tsqp.untrusted.compute import Compute
from tsqp.config import ModelConfig
from tsqp.ops import matmul_widths
from tsqp.trusted.model import TrustedModel
from tsqp.local import LocalOffload
from tsqp.trusted.protect import blocks, freivalds
from tsqp.trusted.protect.freivalds import PRIME, Freivalds, VerificationError
from tsqp.trusted.protect.masked import POLICY_MESSAGE, ProtectedOffload, QuantizedOffload, UnsupportedOp
from tsqp.trusted.protect.pads import PadPool, PadReuseError, PadSource, keystream, uniform_below
from tsqp.untrusted.faults import KINDS, FaultInjector
from tsqp.untrusted.intmm import IntCompute

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64, tie_word_embeddings=True)


# ---- helpers -------------------------------------------------------------------------------------------

def ints(shape, lo: int, hi: int, key: bytes | None = None, n: int = 0) -> torch.Tensor:
    """Test data: integers in [lo, hi] from a ChaCha20 keystream (a fresh key unless one is given)."""
    count = math.prod(shape)
    raw = keystream(key or os.urandom(32), n, 8 * count).view(torch.int64)
    return (torch.remainder(raw, hi - lo + 1) + lo).view(shape)


def floats(shape, scale: float = 1.0) -> torch.Tensor:
    return ints(shape, -2**20, 2**20).to(torch.float32) * (scale / 2**20)


def chi2_uniform_bytes(data: torch.Tensor) -> float:
    counts = torch.bincount(data.flatten().to(torch.int64), minlength=256).to(torch.float64)
    expected = data.numel() / 256
    return float(((counts - expected) ** 2 / expected).sum())


CHI2_255_LIMIT = 255 + 8 * math.sqrt(2 * 255)       # 8 sigma: a false failure is never seen


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin: these 12 bases decide every n < 3.3e24."""
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n < 2:
        return False
    for b in bases:
        if n % b == 0:
            return n == b
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def ring_reference(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """B W^T mod 2^40 in plain int64, B split in 10-bit chunks so that no sum overflows (|q| < 2^11, n < 2^40),
    each chunk's product reduced before it is shifted into place."""
    w = q.to(torch.int64).t()
    y = torch.zeros((b.shape[0], w.shape[1]), dtype=torch.int64)
    for shift in range(0, ring.K, 10):
        part = ((b >> shift) & 1023) @ w                                       # |.| < 2^21 n
        y += (part & ((1 << (ring.K - shift)) - 1)) << shift
    return y & ring.MASK


@pytest.fixture(scope="module")
def tiny():
    cfg, weights = W.load("random:tiny", torch.float32)
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    return cfg, weights, norms


def protected(cfg, weights, faults=None, **kw) -> ProtectedOffload:
    kw.setdefault("background", False)
    return ProtectedOffload(LocalOffload(IntCompute(cfg, weights, faults=faults)), cfg, weights, **kw)


class Recording:
    """An inner offload that keeps a copy of every masked input it is sent (what the server sees)."""

    def __init__(self, inner):
        self.inner, self.sent = inner, []
        self.stats, self.dtype = inner.stats, inner.dtype

    def empty(self, shape, dtype=None):
        return self.inner.empty(shape, dtype)

    def submit(self, op, layer, *xs):
        self.sent.append((op, layer, xs[0].clone()))
        return self.inner.submit(op, layer, *xs)

    def close(self):
        self.inner.close()


class AddToResult:
    """A server adding `delta` (mod 2^40) to element [row, 0] of every result."""

    def __init__(self, inner, delta: int, row: int = 0):
        self.inner, self.delta, self.row = inner, delta, row
        self.stats, self.dtype = inner.stats, inner.dtype

    def empty(self, shape, dtype=None):
        return self.inner.empty(shape, dtype)

    def submit(self, op, layer, *xs):
        z = self.inner.submit(op, layer, *xs).result().clone()
        z[self.row, 0] = (z[self.row, 0] + self.delta) & ring.MASK
        return Done(z)

    def close(self):
        self.inner.close()


class Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def release(self):
        pass


def linear_inputs(cfg: ModelConfig, key, T: int) -> torch.Tensor:
    return floats((T, matmul_widths(cfg, key[0])[0]))


def all_keys(cfg: ModelConfig) -> list:
    return [(op, layer) for layer in range(cfg.num_layers) for op in quant.LAYER_OPS] + [("lm_head", None)]


# ---- the ring ------------------------------------------------------------------------------------------

def test_prime_is_the_smallest_prime_above_2_41():
    assert 2**41 < PRIME < 2**42                      # above any lifted error, below the limb bound
    assert is_prime(PRIME)
    assert not any(is_prime(n) for n in range(2**41, PRIME))
    assert is_prime(2**31 - 1) and not is_prime(2**31 + 1)       # the test itself tells primes apart


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 6), n=st.integers(1, 200), out=st.integers(1, 40), key=st.binary(min_size=32, max_size=32),
       extreme=st.sampled_from(["random", "max", "zero"]), pad=st.booleans())
def test_limb_matmul_is_exact(T, n, out, key, extreme, pad):
    top = ring.WEIGHT_MAX
    q = ints((out, n), -top, top, key, 1).to(torch.int16)
    if extreme == "max":
        b = torch.full((T, n), ring.MASK)
        q = torch.where(q >= 0, top, -top).to(torch.int16)
    elif extreme == "zero":
        b = torch.zeros((T, n), dtype=torch.int64)
    else:
        b = ints((T, n), 0, ring.MASK, key, 2)
    want = (b @ q.to(torch.int64).t()) & ring.MASK          # |sum| < 2^40 * 2047 * 200 < 2^63
    got = ring.limb_matmul(ring.to_limbs(b), ring.RingWeight(q), pad=pad)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_int_mm_with_size_one_dimensions():
    """torch 2.13's CPU _int_mm misread W^T of a one-column W (strides (1, 1)); hypothesis found it."""
    q = torch.tensor([[-112], [-57]], dtype=torch.int8)                    # W [2, 1]
    a = torch.tensor([[3], [-5]], dtype=torch.int8)
    assert ring.int_mm(a, q.t()).tolist() == [[-336, -171], [560, 285]]
    a = torch.tensor([[4], [-2], [7]], dtype=torch.int8).t()              # [1, 3], strides (1, 1)
    b = torch.tensor([[1, 2], [3, 4], [5, 6]], dtype=torch.int8)
    assert ring.int_mm(a, b).tolist() == [[4 - 6 + 35, 8 - 8 + 42]]


def test_limb_matmul_exact_at_the_int32_bound():
    n = ring.MAX_IN                                     # every plane product sum at its largest
    b = torch.full((3, n), ring.MASK)                   # limbs at 255: recentred to 127
    b[1] = 0x8080808080                                 # limbs at 128: recentred to 0
    b[2] = 0                                            # limbs at 0: recentred to -128
    top = ring.WEIGHT_MAX                               # planes hi = +-32 at +-2047
    q = torch.full((3, n), -top, dtype=torch.int16)
    q[1] = top
    q[2, ::2] = top
    assert torch.equal(ring.limb_matmul(ring.to_limbs(b), ring.RingWeight(q)), ring_reference(b, q))
    b = ints((3, n), 0, ring.MASK)
    assert torch.equal(ring.limb_matmul(ring.to_limbs(b), ring.RingWeight(q), pad=True), ring_reference(b, q))
    with pytest.raises(ValueError, match="exceeds"):
        ring.RingWeight(torch.zeros((1, n + 1), dtype=torch.int16))
    with pytest.raises(ValueError, match="-2047"):
        ring.RingWeight(torch.full((1, 4), -2048, dtype=torch.int16))


def test_weight_planes_recompose_every_12_bit_value():
    q = torch.arange(-ring.WEIGHT_MAX, ring.WEIGHT_MAX + 1)[None, :]
    hi, lo = ring.planes(q)
    assert hi.dtype == lo.dtype == torch.int8 and int(hi.abs().max()) == 32
    assert -32 <= int(lo.min()) <= int(lo.max()) <= 31
    assert torch.equal(hi.to(torch.int64) * 2**ring.SPLIT + lo, q)


def test_weight_bits_keep_every_product_row_exact_in_the_ring():
    for n in (1, 576, 8192, 8196, 8197, 14336, 28672, 131072):
        m = quant.weight_max(n)
        assert quant.ACT_MAX * m * n < 2**39 <= quant.ACT_MAX * (2 * m + 1) * n or m == ring.WEIGHT_MAX
    assert quant.weight_max(8196) == 2047 and quant.weight_max(8197) == 1023       # 32767 * 2047 * 8196 < 2^39


def test_limbs_roundtrip_and_signed_lift():
    b = ints((4, 33), 0, ring.MASK)
    limbs = ring.to_limbs(b)
    assert limbs.dtype == torch.uint8 and limbs.shape == (5, 4, 33)
    b[0, :6] = torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1, 2**32, ring.MASK])      # where narrowing wraps
    limbs = ring.to_limbs(b)
    for j in range(ring.LIMBS):                                                   # limb j is byte j
        assert torch.equal(limbs[j], ((b >> (8 * j)) & 0xFF).to(torch.uint8))
    assert torch.equal(ring.from_limbs(limbs), b)
    assert torch.equal(ring.to_limbs(b.t().contiguous().t()), limbs)              # a column-major b
    big = ints((2, ring.GATHER_BELOW), 0, ring.MASK)                                # the plane-by-plane path
    big[0, :6] = b[0, :6]
    for got in (ring.to_limbs(big), ring.to_limbs(big, words=torch.full((2, *big.shape), -1, dtype=torch.int32))):
        for j in range(ring.LIMBS):
            assert torch.equal(got[j], ((big >> (8 * j)) & 0xFF).to(torch.uint8))
    # unreduced values (a masked input X + R, |X| < 2^15 and R in [0, 2^40), is cut without a mod pass): the
    # limbs are their residues', in both paths
    for n in (33, ring.GATHER_BELOW):
        raw = ints((3, n), -2**15, 2**40 + 2**15)
        raw[0, :4] = torch.tensor([-1, -2**15, 2**40, 2**40 + 2**15 - 1])
        assert torch.equal(ring.to_limbs(raw), ring.to_limbs(raw & ring.MASK))
    edges = torch.tensor([0, 1, 2**39 - 1, 2**39, 2**40 - 1])
    assert ring.lift(edges.clone()).tolist() == [0, 1, 2**39 - 1, -2**39, -1]
    y = ints((50,), -2**39, 2**39 - 1)
    assert torch.equal(ring.lift(y & ring.MASK), y)


# ---- quantization --------------------------------------------------------------------------------------

def test_quantization_is_symmetric_and_within_half_a_step():
    w = floats((40, 64), 0.1)
    w[3] = 0.0
    qw = quant.quantize_weight(w)
    top = quant.weight_max(64)
    assert qw.q.dtype == torch.int16 and int(qw.q.abs().max()) == top == 2047
    assert qw.scale[3] == 0 and not qw.q[3].any()
    assert torch.equal(qw.q.abs().amax(1)[torch.arange(40) != 3], torch.full((39,), top, dtype=torch.int16))
    err = (w.double() - qw.q.double() * qw.scale.double()[:, None]).abs()
    assert bool((err <= qw.scale.double()[:, None] * (0.5 + top * 2**-23)).all())   # w / s rounded in float32 first
    x = floats((5, 64), 3.0)
    xq, sx = quant.quantize_rows(x)
    assert int(xq.abs().max()) == quant.ACT_MAX and xq.dtype == torch.int64
    err = (x.double() - xq.double() * sx.double()[:, None]).abs()
    assert bool((err <= sx.double()[:, None] * (0.5 + 32767 * 2**-23)).all())   # x / s rounded in float32 first
    for bad in (float("nan"), float("inf"), -float("inf")):          # in any row of a block
        x = floats((3, 8), 1.0)
        x[1, 5] = bad
        with pytest.raises(ValueError, match="not finite"):
            quant.quantize_rows(x)


def test_a_single_row_quantizes_as_it_would_in_a_block():
    """quantize_block's one-row path (a decode step's) gives the bits the block path gives that row: scales
    spread over 60 decades, an all-zero row, a row whose extreme is negative, and non-finite rows refused."""
    g = torch.Generator().manual_seed(7)
    # enough rows that multiplying by a reciprocal instead of dividing would show (it changes ~1% of them)
    for n, rows in ((1, 300), (7, 300), (64, 1000), (8192, 8)):
        x = torch.randn(rows, n, generator=g) * 10.0 ** torch.randint(-30, 30, (rows, 1), generator=g)
        x[1] = 0.0
        x[2, 0] = -2 * float(x[2].abs().max())
        x[3] = -x[3].abs()
        q, scale = quant.quantize_block(x)
        for r in range(rows):
            q1, scale1 = quant.quantize_block(x[r:r + 1], out=torch.empty(1, n))
            assert torch.equal(q1, q[r:r + 1]) and torch.equal(scale1, scale[r:r + 1])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = floats((1, 8), 1.0)
        x[0, 5] = bad
        with pytest.raises(ValueError, match="not finite"):
            quant.quantize_block(x)


def test_fingerprint_agrees_across_sides_and_sees_one_step(tiny):
    cfg, weights, _ = tiny
    runner = QuantizedOffload(cfg, weights)
    server = IntCompute(cfg, {k: v.clone() for k, v in weights.items()})
    assert server.fingerprint == runner.fingerprint
    shuffled = dict(reversed(list(runner.qweights.items())))
    assert quant.fingerprint(shuffled) == runner.fingerprint                      # canonical order
    changed = dict(weights)
    name = W.layer_names(1)["down"]
    scale = quant.quantize_weight(weights[name]).scale[5]
    changed[name] = weights[name].clone()
    changed[name][5, 7] += 2 * scale                                               # two quantisation steps
    other = IntCompute(cfg, changed)
    assert other.fingerprint != runner.fingerprint
    po = protected(cfg, weights)
    po.expect_fingerprint(server.fingerprint)
    with pytest.raises(VerificationError, match="quantized weights differ"):
        po.expect_fingerprint(other.fingerprint)


# ---- pads ----------------------------------------------------------------------------------------------

def test_pads_look_uniform_and_blocks_are_independent():
    source = PadSource()
    a = source.issue(0, 1 << 20)
    b = source.issue(1, 1 << 20)
    assert chi2_uniform_bytes(a) < CHI2_255_LIMIT and chi2_uniform_bytes(b) < CHI2_255_LIMIT
    bits = torch.stack([(a >> k) & 1 for k in range(8)]).double().mean(1)          # each bit ~ 1/2
    assert bool(((bits - 0.5).abs() < 8 * 0.5 / math.sqrt(a.numel())).all())
    r = torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1]
    assert abs(float(r)) < 8 / math.sqrt(a.numel())
    assert chi2_uniform_bytes(a ^ b) < CHI2_255_LIMIT


def test_a_pad_is_its_key_and_number_and_is_never_issued_twice():
    key = os.urandom(32)
    one, other = PadSource(key), PadSource(key)
    first = one.issue(7, 4096)
    assert torch.equal(first, other.issue(7, 4096))                  # identity (key, n): same bytes
    assert not torch.equal(first, one.issue(8, 4096))
    assert not torch.equal(first, PadSource().issue(7, 4096))        # another session's key
    with pytest.raises(PadReuseError):
        one.issue(7, 16)
    with pytest.raises(PadReuseError):
        one.issue(8, 4096)
    with pytest.raises(PadReuseError):
        one.issue(5, 16)                  # skipped: blocks go in increasing order, a skipped one never comes
    numbers = [one.fresh(16)[0] for _ in range(12)]
    assert len(set(numbers)) == 12 and not {7, 8} & set(numbers)
    assert one.blocks_issued == 14


def test_uniform_below_is_in_range_and_flat():
    v = uniform_below(PRIME, 200_000)
    assert v.dtype == torch.int64 and int(v.min()) >= 0 and int(v.max()) < PRIME
    counts = torch.bincount(v * 64 // PRIME, minlength=64).double()               # 64 equal buckets
    chi2 = float(((counts - v.numel() / 64) ** 2 / (v.numel() / 64)).sum())
    assert chi2 < 63 + 8 * math.sqrt(2 * 63)


# ---- what the server sees ------------------------------------------------------------------------------

def test_masked_input_of_the_same_x_twice_differs_and_is_uncorrelated(tiny):
    cfg, weights, _ = tiny
    rec = Recording(LocalOffload(IntCompute(cfg, weights)))
    po = ProtectedOffload(rec, cfg, weights, background=False)
    x = floats((64, cfg.hidden_size))
    x[0] = 0.0                                                  # a zero row is masked like any other
    y1 = po.submit("qkv", 0, x).result()
    y2 = po.submit("qkv", 0, x).result()
    assert torch.equal(y1, y2)                                  # same answer...
    b1, b2 = (ring.from_limbs(sent).double().flatten() for _, _, sent in rec.sent)
    assert bool((b1 != b2).all())                               # ...from inputs that share no element
    xq = quant.quantize_rows(x)[0].double().flatten()
    bound = 6 / math.sqrt(b1.numel())
    assert abs(float(torch.corrcoef(torch.stack([b1, b2]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([b1, xq]))[0, 1])) < bound
    for _, _, sent in rec.sent:                                 # every limb byte uniform, zero row included
        assert chi2_uniform_bytes(sent) < CHI2_255_LIMIT
    po.close()


# ---- the protected model -------------------------------------------------------------------------------

def run_model(cfg, norms, offload, prompt, decode, chunks=1, policy="linear"):
    model = TrustedModel(cfg, norms, offload, policy=policy)
    cache = model.new_cache(len(prompt) + len(decode) + 1)
    logits = [model.prefill(prompt, cache, chunks=chunks)]
    logits += [model.decode(t, cache) for t in decode]
    return torch.stack(logits)                                  # [steps, V]


@pytest.mark.parametrize("preset,prompt_len,chunks", [("tiny", 13, 2), ("small", 7, 1)])
def test_protected_run_equals_quantized_bit_for_bit(preset, prompt_len, chunks):
    cfg, weights = W.load(f"random:{preset}", torch.float32)
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    prompt = ints((prompt_len,), 0, cfg.vocab_size - 1)
    decode = ints((4,), 0, cfg.vocab_size - 1).tolist()
    po = protected(cfg, weights, pool_tokens=8, batch_tokens=4, background=True)
    got = run_model(cfg, norms, po, prompt, decode, chunks)
    want = run_model(cfg, norms, QuantizedOffload(cfg, weights), prompt, decode, chunks)
    assert torch.equal(got, want)
    stats = po.report()
    rows = prompt_len + len(decode)
    assert stats["checked_rows"] == rows * 4 * cfg.num_layers + 1 + len(decode)    # lm_head: one row a step
    assert stats["pool"]["pads_consumed"] == stats["checked_rows"]
    po.close()
    floating = run_model(cfg, norms, LocalOffload(Compute(cfg, weights, "cpu")), prompt, decode, chunks)
    rel = float((want - floating).norm() / floating.norm())
    print(f"\n[{preset}] quantized vs float logits: relative L2 error {rel:.4f}")
    assert rel < 0.05                                            # quantisation, not a bug


def test_attention_ops_are_refused(tiny):
    cfg, weights, norms = tiny
    po = protected(cfg, weights)
    with pytest.raises(UnsupportedOp, match="--protect needs --policy linear"):
        po.submit("qk", 0, torch.zeros(4, 1, 32), torch.zeros(2, 1, 32))
    with pytest.raises(UnsupportedOp, match=POLICY_MESSAGE):
        run_model(cfg, norms, po, torch.tensor([1, 2, 3]), [], policy="flash")
    with pytest.raises(ValueError, match="one input"):
        po.submit("o", 0, torch.zeros(2, cfg.q_size + 1))
    po.close()


# ---- verification against a hostile server -------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_fault_kind_is_caught(tiny, kind):
    cfg, weights, _ = tiny
    keys = all_keys(cfg)
    trials = 40
    server = IntCompute(cfg, weights)
    for trial in range(trials):
        key = keys[trial % len(keys)]
        T = 1 + trial % 4
        faults = server.faults = FaultInjector(kind)          # a new session (and history) each trial
        po = ProtectedOffload(LocalOffload(server), cfg, weights, pool_tokens=0, background=False)
        x = linear_inputs(cfg, key, T)
        if kind == "replay":           # an earlier answer of this session: to another input, or to this one
            po.submit(*key, x if trial % 2 else linear_inputs(cfg, key, T)).result()
            assert faults.altered == 0
        with pytest.raises(VerificationError, match=f"'{key[0]}' layer {key[1]}"):
            po.submit(*key, x).result()
        assert faults.altered == 1     # the injector did change this result


@pytest.mark.slow
def test_a_vocabulary_wider_than_one_check_chunk_is_masked_and_checked_end_to_end():
    """An LM head whose check runs in two chunks (a vocabulary of 60,001, as Llama's 128,256 runs in three):
    the protected result equals the unmasked oracle's bit for bit, and every fault of every kind that
    changes a result is caught, wherever in the vocabulary it lands."""
    import dataclasses
    cfg = dataclasses.replace(W.load_config("random:tiny"), vocab_size=60001)
    weights = W.random_weights(cfg, torch.float32, "cpu")
    server = IntCompute(cfg, weights)
    po = ProtectedOffload(LocalOffload(server), cfg, weights, pool_tokens=0, background=False)
    assert po.checks[("lm_head", None)].chunks == [(0, 30001), (30001, 60001)]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, cfg.hidden_size, generator=g)
    pending = po.submit("lm_head", None, x)
    assert torch.equal(pending.result(), QuantizedOffload(cfg, weights).submit("lm_head", None, x).result())
    pending.release()
    for trial in range(24):
        kind = KINDS[trial % len(KINDS)]
        faults = server.faults = FaultInjector(kind)
        po = ProtectedOffload(LocalOffload(server), cfg, weights, pool_tokens=0, background=False)
        x = torch.randn(1 + trial % 3, cfg.hidden_size, generator=g)
        if kind == "replay":
            po.submit("lm_head", None, torch.randn(x.shape, generator=g)).result()
        with pytest.raises(VerificationError, match="'lm_head' layer None"):
            po.submit("lm_head", None, x).result()
        assert faults.altered == 1


def test_a_fault_in_a_model_run_names_op_and_layer_and_ends_the_session(tiny):
    cfg, weights, norms = tiny

    class LateFlip(FaultInjector):              # honest until the second layer's down projection
        def apply(self, op, layer, z):
            return super().apply(op, layer, z) if (op, layer) == ("down", 1) else z

    po = protected(cfg, weights, faults=LateFlip("flip"))
    with pytest.raises(VerificationError, match="'down' layer 1"):
        run_model(cfg, norms, po, torch.tensor([5, 6, 7]), [])
    with pytest.raises(VerificationError, match="session is over"):
        po.submit("qkv", 0, floats((1, cfg.hidden_size)))
    po.close()


def test_no_result_is_handed_out_after_a_failed_check(tiny):
    """Calls already in flight when a check fails, and the failed call asked again, raise too."""
    cfg, weights, _ = tiny

    class FirstFlip(FaultInjector):             # alters the first result only
        def apply(self, op, layer, z):
            return super().apply(op, layer, z) if self.seen == 0 else z

    po = protected(cfg, weights, faults=FirstFlip("flip"))
    key = ("o", 0)
    failing, honest = po.submit(*key, linear_inputs(cfg, key, 2)), po.submit(*key, linear_inputs(cfg, key, 2))
    with pytest.raises(VerificationError, match="Freivalds"):
        failing.result()
    for pending in (honest, failing):
        with pytest.raises(VerificationError, match="session is over"):
            pending.result()
    po.close()


def test_a_one_row_request_runs_on_one_thread_and_gives_the_threads_back(tiny, monkeypatch):
    """A decode step's request masks and finishes on the calling thread alone (blocks.one_thread_for); the
    thread count is restored after it, also when its check fails, and a larger request keeps every thread."""
    cfg, weights, _ = tiny
    real_get, threads = torch.get_num_threads, torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)       # as on a 2-core host, whatever this one has
    seen = []
    real_mask = blocks.mask
    monkeypatch.setattr(blocks, "mask", lambda *a: (seen.append(real_get()), real_mask(*a))[1])
    set_to = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (set_to.append(n), real_set(n))[1])

    class FirstFlip(FaultInjector):
        def apply(self, op, layer, z):
            return super().apply(op, layer, z) if self.seen == 0 else z

    po = protected(cfg, weights, faults=FirstFlip("flip"), pool_tokens=0)
    key = ("o", 0)
    with pytest.raises(VerificationError):
        po.submit(*key, linear_inputs(cfg, key, 1)).result()
    assert seen == [1] and set_to == [1, 2, 1, 2]         # submit, then result(), each given back
    po.close()
    real_set(threads)
    seen.clear()
    set_to.clear()
    po = protected(cfg, weights, pool_tokens=0)
    po.submit(*key, linear_inputs(cfg, key, 3)).result()
    assert set_to == [] and seen == [threads]
    po.close()


def test_a_released_result_buffer_serves_the_next_request_and_is_not_readable(tiny):
    """Result buffers are reused (a fresh large one is page-faulted in as it is written); a released result
    can no longer be read, and a reused buffer holds the new request's value only."""
    cfg, weights, _ = tiny
    po = protected(cfg, weights, pool_tokens=0)
    key = ("gate_up", 0)
    x1, x2 = linear_inputs(cfg, key, 3), linear_inputs(cfg, key, 3)
    first = po.submit(*key, x1)
    y1 = first.result().clone()
    buffer = first.result().data_ptr()
    first.release()
    with pytest.raises(RuntimeError, match="after its release"):
        first.result()
    second = po.submit(*key, x2)
    assert second.result().data_ptr() == buffer
    want = QuantizedOffload(cfg, weights).submit(*key, x2).result()
    assert torch.equal(second.result(), want) and not torch.equal(second.result(), y1)
    other = po.submit(*key, linear_inputs(cfg, key, 4))          # another shape: a buffer of its own
    assert other.result().data_ptr() != buffer
    po.close()


def test_no_false_alarm_over_many_clean_calls(tiny):
    cfg, weights, _ = tiny
    po = protected(cfg, weights, pool_tokens=16, background=True)
    keys = all_keys(cfg)
    calls = 0
    for i in range(300):
        key = keys[i % len(keys)]
        x = linear_inputs(cfg, key, 1 + i % 7)
        if i % 3 == 0:                          # the largest |Y| a row can have: x aligned with a weight row
            w = quant.fused_weights(cfg, weights)[key]
            x = torch.sign(w[i % w.shape[0]]).expand(x.shape).clone() * 100.0
        if i % 5 == 0:
            x[0] = 0.0
        po.submit(*key, x).result()
        calls += 1
    assert po.report()["checked_rows"] > calls
    po.close()


def check_with_secret(monkeypatch, q: torch.Tensor, s: torch.Tensor) -> Freivalds:
    """A Freivalds check whose secret is s (a test's choice instead of the CSPRNG's)."""
    monkeypatch.setattr(freivalds, "uniform_below", lambda bound, n: s.clone())
    return Freivalds(q)


def output_side_is_exact(monkeypatch, s: torch.Tensor, rows: int) -> Freivalds:
    """A check with secret s: its output side on `rows` random results, the first two with every byte at 0
    and then at 255, equals Python's integers. Returns the check."""
    out = s.shape[0]
    check = check_with_secret(monkeypatch, torch.zeros((out, 1), dtype=torch.int16), s)
    y = ints((rows, out), -2**39, 2**39 - 1)
    y[0], y[1] = -2**39, 2**39 - 1
    got = check.output_side(y + ring.HALF)
    s_list = s.tolist()
    for t in range(rows):
        assert int(got[t]) == sum(a * b for a, b in zip(y[t].tolist(), s_list)) % PRIME
    return check


def test_both_sides_of_the_check_are_exact_at_their_bounds(monkeypatch):
    """Each side against Python's big integers, with operands at their extremes and widths at the limits
    of each kernel's exactness (the int8 GEMM's int32 sums; the float64 GEMM's 53 bits)."""
    for out in (26420, 26421):                       # the widest output for 7-bit limbs, and one more
        bits = freivalds.output_limb_bits(out)
        assert bits == (7 if out == 26420 else 6)
        assert 128 * (2**bits - 1) * 5 * out < 2**31 <= 128 * (2**(bits + 1) - 1) * 5 * out
        s = ints((out,), 0, PRIME - 1)
        s[:100] = PRIME - 1
        output_side_is_exact(monkeypatch, s, rows=4)
    n = 131071                                       # the widest input for 21-bit limbs of ws
    s0 = 2**41 - 1                                   # ws = W^T s = s0 everywhere: both limbs all ones
    check = check_with_secret(monkeypatch, torch.ones((1, n), dtype=torch.int16), torch.tensor([s0]))
    assert check.in_bits == 21
    x = torch.full((3, n), 32767.0)
    x[1] = -32767.0
    x[2, ::2] = -32767.0
    got = check.input_side(x)
    for t in range(3):
        assert int(got[t]) == int(x[t].double().sum()) * s0 % PRIME
    with pytest.raises(ValueError, match="lifted"):
        check.rows_ok(x[:, :1], torch.tensor([[2**39]]))
    assert freivalds.int8_gemm_is_exact()           # this machine's kernel; a saturating one is refused:
    monkeypatch.setattr(freivalds, "_GEMM_EXACT", False)
    with pytest.raises(RuntimeError, match="not exact"):
        Freivalds(torch.ones((2, 3), dtype=torch.int16))


def test_a_vocabulary_wide_output_is_checked_in_chunks_exactly(monkeypatch):
    """An output too wide for 6-bit limbs (an LM head's vocabulary) is cut into even chunks, one int8 GEMM
    each with 8 limb columns (8 secret bytes per output, not 16): the output side still equals Python's
    integers at the extremes, and a wrong value anywhere, in any chunk, fails its row."""
    assert freivalds.output_chunks(53261) == [(0, 53261)]
    assert freivalds.output_chunks(128256) == [(0, 42752), (42752, 85504), (85504, 128256)]
    out = 60001
    s = ints((out,), 0, PRIME - 1)
    s[:50] = PRIME - 1
    s[-50:] = PRIME - 1
    check = output_side_is_exact(monkeypatch, s, rows=3)
    assert check.chunks == [(0, 30001), (30001, 60001)] and check.out_bits == 6
    assert sum(c.numel() for c in check._s_bytes) == 8 * 8 * out
    q = ints((out, 16), -127, 127).to(torch.int16)
    check = Freivalds(q)
    x = ints((2, 16), -32767, 32767)
    right = x @ q.to(torch.int64).t()                                         # [2, out] exact
    assert bool(check.rows_ok(x, right).all())
    for where in (0, 30000, 30001, out - 1):                                  # each side of the cut
        wrong = right.clone()
        wrong[1, where] += 1
        assert check.rows_ok(x, wrong).tolist() == [True, False], where


def test_weighted_sums_are_exact_in_both_paths():
    """WeightedSum against Python's integers, above and below its Python-rows threshold, with parts at the
    extremes the check produces (input parts up to 2^53, output parts up to 2^31) and coefficients up to p."""
    coefficients = [PRIME - 1, 1, 1 << 41, 12345, 0, PRIME - 2**20]
    ws = freivalds.WeightedSum(coefficients, PRIME)
    for T in (1, freivalds.WeightedSum.PYTHON_ROWS, freivalds.WeightedSum.PYTHON_ROWS + 1, 40):
        parts = ints((T, len(coefficients)), -2**53, 2**53)
        parts[0] = 2**53
        parts[-1] = -2**53
        want = [sum(v * c for v, c in zip(row, coefficients)) % PRIME for row in parts.tolist()]
        assert ws(parts).tolist() == want


@pytest.mark.parametrize("block_rows", [1, 3, 64])
def test_blocks_of_rows_change_no_bit_and_miss_no_fault(tiny, monkeypatch, block_rows):
    """The runner masks and finishes a request a block of rows at a time: any block size gives the
    unmasked oracle's bits, with the length bucket's padding rows in the last blocks, and a wrong value in
    any block fails its row's check."""
    cfg, weights, _ = tiny
    key = ("gate_up", 1)
    n = matmul_widths(cfg, "gate_up")[0]
    monkeypatch.setattr(blocks, "BLOCK", block_rows * n)    # block_rows input rows a block; result rows: fewer
    x = linear_inputs(cfg, key, 7)
    x[2] = 0.0
    want = QuantizedOffload(cfg, weights).submit(*key, x).result()
    po = protected(cfg, weights, length_bucket=4)                    # 7 rows padded to 8
    assert torch.equal(po.submit(*key, x).result(), want)
    assert po.checked_rows == 8
    for row in (0, 4, 7):                                            # first block, middle, a padding row
        bad = protected(cfg, weights, length_bucket=4)
        bad.inner = AddToResult(bad.inner, 1, row=row)
        with pytest.raises(VerificationError, match=rf"row\(s\) \[{row}\] of 8"):
            bad.submit(*key, x).result()


class RowsSeen:
    """An inner offload that notes each request's row count, what its header tells a real server."""

    def __init__(self, inner):
        self.inner, self.stats, self.dtype, self.seen = inner, inner.stats, inner.dtype, []

    def empty(self, shape, dtype=None):
        return self.inner.empty(shape, dtype)

    def submit(self, op, layer, limbs):
        self.seen.append((op, layer, limbs.shape[1]))
        return self.inner.submit(op, layer, limbs)

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_a_length_bucket_hides_the_prompt_length_whatever_the_chunks(tiny, chunks):
    """The server's view of a prefill (every request's op, layer and row count, in order) depends on the
    prompt's length only through its count of buckets: with chunks, and for a one-token prompt. The logits
    equal the unpadded quantized model's (cut into the same chunks) bit for bit."""
    cfg, weights, norms = tiny
    server, bucket = IntCompute(cfg, weights), 8
    g = torch.Generator().manual_seed(chunks)
    views: dict[int, set] = {}
    for T in (1, 2, 7, 8, 9, 15, 16, 17, 23, 24, 25):
        rows = RowsSeen(LocalOffload(server))
        po = ProtectedOffload(rows, cfg, weights, pool_tokens=0, lm_head_rows=0, background=False,
                              length_bucket=bucket)
        ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
        model = TrustedModel(cfg, norms, po)
        logits = model.prefill(ids, model.new_cache(T), chunks)
        po.close()
        views.setdefault(-(-T // bucket), set()).add(tuple(rows.seen))
        oracle = QuantizedOffload(cfg, weights)
        oracle.length_bucket = bucket                          # the same chunks; it pads nothing
        plain = TrustedModel(cfg, norms, oracle)
        assert torch.equal(logits, plain.prefill(ids, plain.new_cache(T), chunks)), T
    assert {n: len(v) for n, v in views.items()} == {1: 1, 2: 1, 3: 1, 4: 1}, views


def test_a_small_prime_lets_multiples_through_but_not_ours(tiny):
    cfg, weights, _ = tiny
    weak_prime = 2**31 - 1                      # fits in int32: tempting, and below the error range
    key = ("gate_up", 1)
    x = linear_inputs(cfg, key, 3)
    want = QuantizedOffload(cfg, weights).submit(*key, x).result()
    for k in (1, 2, 200):
        weak = ProtectedOffload(AddToResult(LocalOffload(IntCompute(cfg, weights)), k * weak_prime), cfg,
                                weights, background=False)
        weak.checks = {kk: Freivalds(w.q, prime=weak_prime) for kk, w in weak.qweights.items()}
        forged = weak.submit(*key, x).result()                          # accepted by the weak check...
        assert not torch.equal(forged, want)                            # ...though it is wrong
        ours = protected(cfg, weights)
        ours.inner = AddToResult(ours.inner, k * weak_prime)
        with pytest.raises(VerificationError, match="'gate_up' layer 1"):
            ours.submit(*key, x).result()


def test_malformed_results_are_rejected(tiny):
    cfg, weights, _ = tiny
    key = ("o", 0)
    x = linear_inputs(cfg, key, 2)

    class Reply:
        def __init__(self, make):
            self.make, self.stats, self.dtype = make, None, torch.uint8

        def empty(self, shape, dtype=None):
            return torch.empty(shape, dtype=dtype)

        def submit(self, op, layer, *xs):
            return Done(self.make())

        def close(self):
            pass

    for make, why in [(lambda: torch.zeros(2, cfg.hidden_size, dtype=torch.int32), "expected int64"),
                      (lambda: torch.zeros(3, cfg.hidden_size, dtype=torch.int64), "expected int64"),
                      (lambda: torch.zeros(2, cfg.hidden_size, dtype=torch.int64, device="meta"), "on the CPU"),
                      (lambda: torch.full((2, cfg.hidden_size), 1 << 40), "outside"),
                      (lambda: torch.full((2, cfg.hidden_size), -1), "outside")]:
        po = ProtectedOffload(Reply(make), cfg, weights, background=False)
        with pytest.raises(VerificationError, match=why):
            po.submit(*key, x).result()
        with pytest.raises(VerificationError, match="session is over"):
            po.submit(*key, x)


def test_any_failure_to_finish_a_result_ends_the_session(tiny, monkeypatch):
    """Not only a failed check: whatever stops a result from being unmasked and checked ends the session."""
    cfg, weights, _ = tiny
    po = protected(cfg, weights, pool_tokens=0)
    key = ("o", 0)

    def broken(*args):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(blocks, "finish", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        po.submit(*key, linear_inputs(cfg, key, 2)).result()
    with pytest.raises(VerificationError, match="RuntimeError: out of memory.*session is over"):
        po.submit(*key, linear_inputs(cfg, key, 2))
    po.close()


def test_zero_rows_give_what_the_oracle_gives_and_send_nothing(tiny):
    cfg, weights, _ = tiny
    key = ("o", 0)
    x = torch.zeros(0, matmul_widths(cfg, "o")[0])
    po = protected(cfg, weights, pool_tokens=0)
    want = QuantizedOffload(cfg, weights).submit(*key, x).result()
    got = po.submit(*key, x).result()
    assert got.shape == want.shape == (0, cfg.hidden_size) and got.dtype == want.dtype
    assert po.stats.rpc_calls == 0
    po.close()


# ---- the pad pool --------------------------------------------------------------------------------------

def shifted_u(r: torch.Tensor, w: ring.RingWeight) -> torch.Tensor:
    """What the pool keeps beside R: R W^T - 2^39 mod 2^40 (the unmask is then one subtraction)."""
    return (ring.limb_matmul(ring.to_limbs(r), w) - ring.HALF) & ring.MASK


def test_pool_statistics_and_on_demand_when_empty(tiny):
    cfg, weights, _ = tiny
    ring_weights = {k: ring.RingWeight(w.q) for k, w in quant.quantize_model(cfg, weights).items()}
    key = ("down", 0)
    dry = PadPool(ring_weights, pool_tokens=8, background=False)
    r, u = dry.take(key, 3)
    assert torch.equal(u, shifted_u(r, ring_weights[key]))                         # U = R W^T - 2^39 mod 2^40
    s = dry.stats()
    assert (s["on_demand"], s["on_demand_rows"], s["pads_consumed"], s["pads_made"]) == (1, 3, 3, 0)
    pool = PadPool(ring_weights, pool_tokens=8, batch_tokens=3, lm_head_rows=2)
    assert pool.wait_full(60)
    s = pool.stats()
    assert s["pads_made"] == 8 * 4 * cfg.num_layers + 2 and s["on_demand"] == 0
    assert s["fill_tokens_per_s"] > 0 and s["bytes_held"] > 0 and s["filler_error"] is None
    seen = set()
    for rows in (5, 2, 10, 1):                     # the last two need more than the pool holds
        r, u = pool.take(key, rows)
        assert r.shape == (rows, cfg.intermediate_size) and u.shape == (rows, cfg.hidden_size)
        assert torch.equal(u, shifted_u(r, ring_weights[key]))
        seen |= {tuple(row) for row in r.tolist()}
    assert len(seen) == 18                         # no row handed out twice
    s = pool.stats()
    assert s["on_demand"] >= 1 and s["on_demand_rows"] >= 2 and s["pads_consumed"] == 18   # 10 > 8 held
    json.dumps(s)
    pool.close()
    dry.close()


def test_the_filler_is_woken_only_when_a_pool_is_due_a_refill(tiny):
    """A take that leaves its pool lacking less than a batch does not wake the filler (a woken filler scans
    every pool under the lock, on each of a decode step's calls); the take that makes it lack a batch does,
    and the filler refills it."""
    cfg, weights, _ = tiny
    ring_weights = {k: ring.RingWeight(w.q) for k, w in quant.quantize_model(cfg, weights).items()}
    key = ("o", 0)
    pool = PadPool(ring_weights, pool_tokens=8, batch_tokens=4, lm_head_rows=4)
    assert pool.wait_full(60)
    wakes = []
    notify = pool._cond.notify_all
    pool._cond.notify_all = lambda: (wakes.append(pool.level[key]), notify())[1]
    pool.take(key, 3)                        # lacks 3 of 8: less than a batch
    assert wakes == []
    pool.take(key, 1)                        # lacks 4: a batch
    assert wakes[:1] == [4]
    assert pool.wait_full(60) and pool.level[key] == 8
    pool.close()


# ---- the trust boundary --------------------------------------------------------------------------------

def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            level = "." * node.level
            names.add(level + (node.module or ""))
    return names


def test_trusted_and_untrusted_code_do_not_import_each_other():
    for path in (ROOT / "tsqp" / "trusted").rglob("*.py"):
        names = imported_modules(path)
        assert not any("zmq" in n or "untrusted" in n for n in names), (path, names)
        assert not any(n.lstrip(".") in ("random", "numpy.random") for n in names), (path, names)
    for path in (ROOT / "tsqp" / "untrusted").rglob("*.py"):
        names = imported_modules(path)
        assert not any(n.lstrip(".").startswith("trusted") or ".trusted" in n for n in names), (path, names)


# ---- measurements (printed, not asserted) --------------------------------------------------------------

def smollm2_ring_weights() -> dict:
    """SmolLM2-135M's linear shapes with random 12-bit weights: a fill's cost depends on shapes only."""
    cfg, shapes = SMOLLM2, {}
    D, I = cfg.hidden_size, cfg.intermediate_size
    for layer in range(cfg.num_layers):
        shapes |= {("qkv", layer): (cfg.qkv_size, D), ("o", layer): (D, cfg.q_size),
                   ("gate_up", layer): (2 * I, D), ("down", layer): (D, I)}
    shapes[("lm_head", None)] = (cfg.vocab_size, D)
    key = os.urandom(32)
    top = ring.WEIGHT_MAX
    return {k: ring.RingWeight(ints(s, -top, top, key, n).to(torch.int16)) for n, (k, s) in enumerate(shapes.items())}


def recomposed(w: ring.RingWeight) -> torch.Tensor:
    """The integer weights [out, in] from a RingWeight's two planes."""
    hi, lo = w.wt.t().split(w.out_features)
    return hi.to(torch.int16) * 2**ring.SPLIT + lo


def best_ms(f, repeats: int = 3) -> float:
    """The fastest of a few runs (other work shares these cores), after one warm-up run."""
    f()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


@pytest.mark.slow
def test_measure_fill_rate_and_verification_cost():
    cfg, weights = W.load("random:small", torch.float32)
    cases = {"random:small": {k: ring.RingWeight(w.q) for k, w in quant.quantize_model(cfg, weights).items()},
             "SmolLM2-135M shapes": smollm2_ring_weights()}
    print(f"\n(2 shared CPU cores, load average {os.getloadavg()[0]:.1f}, torch threads {torch.get_num_threads()})")
    for name, ring_weights in cases.items():
        tokens = 32
        t0 = time.perf_counter()
        pool = PadPool(ring_weights, pool_tokens=tokens, batch_tokens=16, lm_head_rows=tokens)
        assert pool.wait_full(600)
        wall = time.perf_counter() - t0
        stats = pool.stats()
        pool.close()
        per_token = sum(8 * (w.in_features + w.out_features) for w in ring_weights.values())   # R, U int64
        checks = {k: Freivalds(recomposed(w)) for k, w in ring_weights.items()}
        costs = {}
        for T in (1, 32):
            inputs = {k: (ints((T, w.in_features), -32767, 32767), ints((T, w.out_features), -2**39, 2**39 - 1))
                      for k, w in ring_weights.items()}
            costs[T] = best_ms(lambda: [checks[k].rows_ok(x, y) for k, (x, y) in inputs.items()]) / T
        print(f"[{name}] pool fill: {tokens / wall:.1f} tokens/s wall ({stats['fill_tokens_per_s']:.1f} by the "
              f"pool's own clock), {per_token / 2**20:.2f} MiB of pads per token; verification: "
              f"{costs[1]:.2f} ms/token decoding, {costs[32]:.3f} ms/token in a 32-token prefill")
    # the online cost of a protected decode step (pads ready) beside the unmasked quantized and float ones
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    steps = 8
    po = protected(cfg, weights, pool_tokens=steps * 5, background=True)
    assert po.pool.wait_full(600)
    for name, offload in [("protected", po), ("quantized", QuantizedOffload(cfg, weights)),
                          ("float", LocalOffload(Compute(cfg, weights, "cpu")))]:
        model = TrustedModel(cfg, norms, offload)
        cache = model.new_cache(8 * steps)
        model.prefill(torch.tensor([1, 2, 3]), cache)
        ms = best_ms(lambda: [model.decode(5, cache) for _ in range(steps)]) / steps
        print(f"[random:small] decode, {name} offload in-process: {ms:.1f} ms/token")
    print(f"[random:small] protected pool after decoding: {json.dumps(po.pool.stats())}")
    po.close()
