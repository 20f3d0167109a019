"""A decode step's one-row path: fast.mask_row / finish_row read a pad row where the pool's block holds it
(pads.PadRow, PadPool.take_row) and return the scale and the check's sides as Python numbers. They must give
the torch reference's bits (blocks.py's chains, on the same row taken as a tensor), refuse what the
multi-row passes refuse, and hand out every pad row once."""
from __future__ import annotations

import pytest
import torch

from test_protect_fast import bits, extreme_rows
from test_protect_math import linear_inputs, protected
from tsqp import quant, ring
from tsqp.trusted.protect import blocks, fast
from tsqp.trusted.protect.freivalds import Freivalds, VerificationError
from tsqp.trusted.protect.masked import QuantizedOffload
from tsqp.trusted.protect.pads import PadPool, PadRow, _Batch


@pytest.fixture
def kernel(monkeypatch):
    if fast._fastpath is None:
        pytest.skip("tsqp._fastpath is not built (python3 setup.py build_ext --inplace)")
    return lambda name: monkeypatch.setattr(fast, "KERNEL", name)


@pytest.fixture(scope="module")
def tiny():
    from tsqp import weights as W
    return W.load("random:tiny", torch.float32)


def a_block(rows: int, n: int, out: int, g: torch.Generator) -> _Batch:
    """A pool's block of random R and U limbs, uint8 [5, rows, n] and [5, rows, out], the ring's edges in."""
    r = torch.randint(0, 256, (ring.LIMBS, rows, n), generator=g, dtype=torch.uint8)
    u = torch.randint(0, 256, (ring.LIMBS, rows, out), generator=g, dtype=torch.uint8)
    r[:, -1, :2], u[:, -1, :2] = 255, 255
    u[:, 0, :1] = 0
    return _Batch(r, u)


@pytest.mark.parametrize("n", [1, 64, 576, 2048, 8192])
def test_mask_row_gives_the_torch_paths_limbs_scale_and_side(kernel, n):
    g = torch.Generator().manual_seed(n)
    check = Freivalds(torch.randint(-2047, 2048, (5, n), generator=g, dtype=torch.int16))
    x = torch.cat([torch.randn(2, n, generator=g) * 50, extreme_rows(n, g)])
    block = a_block(x.shape[0] + 1, n, 8, g)
    for t in range(x.shape[0]):
        row = PadRow(block, t + 1)                              # not the block's first row: the index counts
        kernel("torch")
        want_limbs, want_q = torch.empty((ring.LIMBS, 1, n), dtype=torch.uint8), torch.empty((1, n))
        want_sx, parts, _ = blocks.mask(x[t:t + 1], row.r(), want_limbs, check, blocks.Scratch(), want_q)
        kernel("c")
        limbs, q = torch.empty((ring.LIMBS, 1, n), dtype=torch.uint8), torch.empty((1, n))
        sx, side, _ = blocks.mask(x[t:t + 1], row, limbs, check, blocks.Scratch(), q)
        assert isinstance(sx, float) and isinstance(side, int)
        assert torch.equal(limbs, want_limbs) and torch.equal(q, want_q)
        assert torch.equal(bits(torch.tensor([sx])), bits(want_sx))
        assert side == int(check._input_sum(parts)[0]) == int(check.input_side(quant.quantize_rows(x[t:t + 1])[0]))
        scale, unchecked = fast.mask_row(x[t:t + 1], row, limbs, None)
        assert unchecked is None and scale == sx


@pytest.mark.parametrize("out", [1, 1536, 60000])
def test_finish_row_gives_the_torch_paths_bits_side_and_kept_offsets(kernel, out):
    g = torch.Generator().manual_seed(out)
    check = Freivalds(torch.randint(-2047, 2048, (out, 8), generator=g, dtype=torch.int16))
    sw = torch.rand(out, generator=g) * 1e-3
    sw[:2] = torch.tensor([0.0, 1e30])[:out]
    block = a_block(4, 8, out, g)
    for t, sx in enumerate([0.0, 1e-38, 3e30, 0.0123]):
        sx = float(torch.tensor(sx, dtype=torch.float32))       # a float32's value, as mask_row returns it
        row = PadRow(block, t)
        z = torch.randint(0, ring.MOD, (1, out), generator=g)
        z[0, :4] = torch.tensor([0, ring.MASK, ring.HALF, ring.HALF - 1])[:out]
        kernel("torch")
        want_y, want_off = torch.empty((1, out)), torch.empty((1, out), dtype=torch.int64)
        blocks.finish(z, row.u(), torch.tensor([sx]), sw, None, blocks.Scratch(), want_y, want_off)
        _, parts, _ = blocks.finish(z, row.u(), torch.tensor([sx]), sw, check, blocks.Scratch(), torch.empty((1, out)))
        kernel("c")
        y, off = torch.empty((1, out)), torch.empty((1, out), dtype=torch.int64)
        assert blocks.finish(z, row, sx, sw, None, blocks.Scratch(), y, off)[1] is None
        assert torch.equal(bits(y), bits(want_y)) and torch.equal(off, want_off)
        y2 = torch.empty((1, out))
        _, side, _ = blocks.finish(z, row, sx, sw, check, blocks.Scratch(), y2)
        assert torch.equal(bits(y2), bits(want_y))
        oracle = check.output_side((z - ring.from_limbs(row.u())).bitwise_and_(ring.MASK))
        assert side == int(torch.remainder(check._output_sum(parts.to(torch.int64)) + check._y_offset,
                                           check.prime)[0]) == int(oracle[0])


def test_the_row_passes_refuse_what_the_multi_row_passes_refuse(kernel):
    kernel("c")
    g = torch.Generator().manual_seed(1)
    row = PadRow(a_block(2, 16, 12, g), 1)
    limbs = torch.empty((ring.LIMBS, 1, 16), dtype=torch.uint8)
    for value in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(1, 16)
        x[0, 9] = value
        with pytest.raises(ValueError, match="not finite"):
            fast.mask_row(x, row, limbs, None)
    with pytest.raises(ValueError, match="one row of 16"):
        fast.mask_row(torch.ones(1, 15), row, limbs, None)
    with pytest.raises(ValueError, match="limbs must be"):
        fast.mask_row(torch.ones(1, 16), row, torch.empty((5, 1, 15), dtype=torch.uint8), None)
    with pytest.raises(ValueError, match="check's ws"):
        fast.mask_row(torch.ones(1, 16), row, limbs, Freivalds(torch.ones((3, 8), dtype=torch.int16)).vectors)
    for bad in (-1, ring.MOD, -(1 << 63), (1 << 63) - 1):
        z = torch.zeros((1, 12), dtype=torch.int64)
        z[0, 11] = bad
        with pytest.raises(blocks.OutOfRange):
            fast.finish_row(z, row, 1.0, torch.ones(12), None, torch.empty((1, 12)))
    with pytest.raises(ValueError, match="z must be"):
        fast.finish_row(torch.zeros((1, 11), dtype=torch.int64), row, 1.0, torch.ones(12), None, torch.empty((1, 12)))
    with pytest.raises(ValueError, match="y must be"):
        fast.finish_row(torch.zeros((1, 12), dtype=torch.int64), row, 1.0, torch.ones(12), None, torch.empty((2, 12)))
    with pytest.raises(ValueError, match="scales must be"):
        fast.finish_row(torch.zeros((1, 12), dtype=torch.int64), row, 1.0, torch.ones(11), None, torch.empty((1, 12)))
    with pytest.raises(TypeError, match="13 arguments"):
        fast._fastpath.finish_row(*[0] * 12)
    with pytest.raises(ValueError, match="contiguous rows"):
        _Batch(torch.zeros((5, 4, 8), dtype=torch.uint8)[:, :, ::2], torch.zeros((5, 4, 4), dtype=torch.uint8))


def test_take_row_hands_out_every_row_once_beside_take_limbs_and_on_demand(tiny):
    """Rows from the pool in order, across blocks and interleaved with multi-row takes, never twice (each
    row of R is fresh keystream, so rows compare by value); an empty pool makes one (an on-demand event)."""
    cfg, weights = tiny
    ring_weights = {k: ring.RingWeight(w.q) for k, w in quant.quantize_model(cfg, weights).items()}
    key = ("o", 0)
    pool = PadPool(ring_weights, pool_tokens=7, batch_tokens=3, lm_head_rows=0)
    assert pool.wait_full(60)
    seen = []
    for take in ("row", "limbs", "row", "row", "row", "limbs", "row"):
        if take == "row":
            row = pool.take_row(key)
            r, u = row.r(), row.u()
            assert row.batch.r.data_ptr() <= r.data_ptr() and r.shape == (ring.LIMBS, 1, row.in_features)
        else:
            r, u = pool.take_limbs(key, 2)
        assert torch.equal(ring.from_limbs(u), (ring.limb_matmul(r.contiguous(), ring_weights[key]) - ring.HALF)
                           & ring.MASK)
        seen += list(ring.from_limbs(r).unbind(0))
    pool.close()
    assert len(seen) == 9 and len({tuple(v.tolist()) for v in seen}) == 9
    dry = PadPool(ring_weights, pool_tokens=0, lm_head_rows=0, background=False)
    rows = [dry.take_row(key) for _ in range(2)]
    s = dry.stats()
    assert (s["on_demand"], s["on_demand_rows"], s["pads_consumed"]) == (2, 2, 2)
    assert not torch.equal(rows[0].r(), rows[1].r())


def test_a_one_row_request_takes_the_row_path_and_equals_the_oracle(tiny, kernel, monkeypatch):
    cfg, weights = tiny
    kernel("c")
    po = protected(cfg, weights, pool_tokens=4)
    rows = []
    take_row = po.pool.take_row
    monkeypatch.setattr(po.pool, "take_row", lambda key: rows.append(key) or take_row(key))
    oracle = QuantizedOffload(cfg, weights)
    for key in (("qkv", 0), ("down", 1), ("lm_head", None)):
        x = linear_inputs(cfg, key, 1)
        assert torch.equal(po.submit(*key, x).result(), oracle.submit(*key, x).result())
    assert rows == [("qkv", 0), ("down", 1), ("lm_head", None)] and po.checked_rows == 3
    po.close()


def test_a_failure_to_finish_one_row_ends_the_session(tiny, kernel, monkeypatch):
    cfg, weights = tiny
    kernel("c")
    po = protected(cfg, weights, pool_tokens=0)
    key = ("o", 0)

    def broken(*args):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(fast, "finish_row", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        po.submit(*key, linear_inputs(cfg, key, 1)).result()
    with pytest.raises(VerificationError, match="RuntimeError: out of memory.*session is over"):
        po.submit(*key, linear_inputs(cfg, key, 1))
    po.close()


def test_a_row_wider_than_the_checks_exact_sums_is_refused(kernel):
    """The check's 64-bit partial sums are exact up to fast.MAX_WIDTH terms: a wider row is refused, not summed."""
    kernel("c")
    wide = fast.MAX_WIDTH + 1
    check = fast.CheckVectors(torch.ones(wide, dtype=torch.int64), torch.ones(wide, dtype=torch.int64), 2**41 + 27)
    row = PadRow(a_block(1, wide, wide, torch.Generator().manual_seed(2)), 0)
    with pytest.raises(ValueError, match="at most"):
        fast.mask_row(torch.ones(1, wide), row, torch.empty((ring.LIMBS, 1, wide), dtype=torch.uint8), check)
    with pytest.raises(ValueError, match="at most"):
        fast.finish_row(torch.zeros((1, wide), dtype=torch.int64), row, 1.0, torch.ones(wide), check,
                        torch.empty((1, wide)))
