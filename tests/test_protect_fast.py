"""The compiled per-row passes (tsqp/_fastpath.c via protect/fast.py) against the torch chains they replace
(blocks.py's reference path): the same limbs, scales, dequantized bits and check residues, on random and
extreme inputs, and the same refusals."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tsqp import quant, ring
from tsqp import weights as W
from tsqp.trusted.protect import blocks, fast, poolsize
from tsqp.trusted.protect.freivalds import Freivalds
from tsqp.trusted.protect.pads import PadPool, keystream
from tsqp.trusted.protect.poolsize import PoolSize


@pytest.fixture
def kernel(monkeypatch):
    """kernel('torch') or kernel('c'): which path blocks.mask / blocks.finish take from now on."""
    if fast._fastpath is None:
        pytest.skip("tsqp._fastpath is not built (python3 setup.py build_ext --inplace)")
    return lambda name: monkeypatch.setattr(fast, "KERNEL", name)


def extreme_rows(n: int, g: torch.Generator) -> torch.Tensor:
    """Rows that stress quantization: zeros, one huge value, denormals, exact ties at .5 of a step, negative
    zeros, float32's largest values, a row whose max is below 32767 denormals (scale 0), mixed magnitudes."""
    rows = [torch.zeros(n), torch.full((n,), -0.0), torch.randn(n, generator=g) * 1e-40,
            torch.full((n,), 3.4e38) * torch.sign(torch.randn(n, generator=g)),
            torch.tensor([1e-45] * n), torch.randn(n, generator=g) * torch.logspace(-30, 30, n)]
    spike = torch.randn(n, generator=g)
    spike[n // 2] = 1e6
    rows.append(spike)
    mixed = torch.zeros(n)
    mixed[::2] = -0.0
    rows += [mixed, -mixed, torch.zeros(n)]
    ties = (torch.randint(-32767, 32767, (n,), generator=g).float() + 0.5) / 32767 * 7.0
    ties[0] = 7.0                          # max |x| = 7: x / scale lands on k + 0.5 where float32 allows
    rows.append(ties)
    return torch.stack(rows).float()


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns (so -0.0 and 0.0 differ, and NaNs compare)."""
    return t.contiguous().view(torch.int32)


def both(kernel, fn):
    out = {}
    for name in ("torch", "c"):
        kernel(name)
        out[name] = fn()
    return out["torch"], out["c"]


def masked_both(kernel, x, r, check):
    def run():
        limbs = torch.empty((ring.LIMBS, *x.shape), dtype=torch.uint8)
        quantized = torch.empty(x.shape, dtype=torch.float32)
        sx, parts, _ = blocks.mask(x, r, limbs, check, blocks.Scratch(), quantized)
        side = None if check is None else (parts if parts.dim() == 1 else check._input_sum(parts))
        return limbs, sx, quantized, side
    return both(kernel, run)


@pytest.mark.parametrize("T,n", [(1, 576), (1, 2048), (3, 64), (9, 8192), (70, 1000), (1, 1)])
def test_mask_gives_the_torch_paths_limbs_scales_and_check_side(kernel, T, n):
    g = torch.Generator().manual_seed(T * 1000 + n)
    q = torch.randint(-2047, 2048, (5, n), generator=g, dtype=torch.int16)
    check = Freivalds(q)
    x = torch.cat([torch.randn(T, n, generator=g) * torch.rand(T, 1, generator=g) * 100,
                   extreme_rows(n, g)])
    r = torch.randint(0, ring.MOD, x.shape, generator=g)
    r[0, :1] = ring.MASK
    for pad in (r, ring.to_limbs(r)):                   # int64 rows, or a pool's uint8 planes
        for c in (check, None):
            old, new = masked_both(kernel, x, pad, c)
            assert torch.equal(old[0], new[0])
            assert torch.equal(bits(old[1]), bits(new[1]))
            assert torch.equal(old[2], new[2])          # values: the torch path's buffer may hold -0.0 alike
            if c is not None:
                assert torch.equal(old[3], new[3])
                assert torch.equal(new[3], c.input_side(quant.quantize_rows(x)[0]))   # the oracle


def test_mask_carries_and_borrows_across_the_fifth_byte_as_the_reference(kernel):
    """The compiled mask adds q to R's low four bytes as one 32-bit word and gives byte 4 the carry and q's
    sign: pads whose low word sits at the edges (0, 1, |q| - 1, 2^32 - 1, 2^32 - |q|) under byte 4 of 0 and
    255, against inputs quantizing to +-32767, +-1 and 0, give the reference's limbs and the ring's sum."""
    q_row = torch.tensor([32767.0, -32767.0, 1.0, -1.0, 0.0, 16384.0, -16384.0, 32767.0])   # [8], scale 1
    lows = [0, 1, 32766, 32767, 2**32 - 1, 2**32 - 32767, 2**32 - 1, 2**31]
    pads = [(top << 32) + low for top in (0, 255, 128) for low in lows]                     # [24]
    x = q_row.repeat(len(pads), 1)                                                          # [24, 8]
    r = torch.tensor(pads).view(-1, 1).repeat(1, 8)                                         # [24, 8]
    r = torch.cat([r, torch.roll(r, 3, 1)])                                                 # [48, 8] every pair
    x = torch.cat([x, x])
    old, new = masked_both(kernel, x, ring.to_limbs(r), None)
    assert torch.equal(old[0], new[0])
    want = (r + quant.quantize_rows(x)[0]) & ring.MASK                                      # the ring's sum
    assert torch.equal(ring.from_limbs(new[0]), want)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("T", [1, 4])
def test_a_non_finite_input_is_refused_by_both(kernel, value, T):
    x = torch.randn(T, 64)
    x[T - 1, 7] = value
    for name in ("torch", "c"):
        kernel(name)
        with pytest.raises(ValueError, match="not finite"):
            blocks.mask(x, torch.zeros((T, 64), dtype=torch.int64), torch.empty((5, T, 64), dtype=torch.uint8),
                        None, blocks.Scratch())


def finished_both(kernel, z, u, sx, sw, check, offsets: bool):
    def run():
        y = torch.empty((sx.shape[0], z.shape[1]), dtype=torch.float32)
        kept = torch.empty(z.shape, dtype=torch.int64) if offsets else None
        _, parts, _ = blocks.finish(z, u, sx, sw, check, blocks.Scratch(), y, kept)
        side = None if check is None else (parts if parts.dim() == 1 else
                                           torch.remainder(check._output_sum(parts.to(torch.int64))
                                                           + check._y_offset, check.prime))
        return y, kept, side
    return both(kernel, run)


@pytest.mark.parametrize("T,out,kept", [(1, 1536, 1), (1, 60000, 1), (4, 8, 2), (33, 5000, 33), (16, 16384, 9)])
def test_finish_gives_the_torch_paths_bits_and_check_side(kernel, T, out, kept):
    g = torch.Generator().manual_seed(T * 7 + out)
    q = torch.randint(-2047, 2048, (out, 8), generator=g, dtype=torch.int16)
    check = Freivalds(q)
    z = torch.randint(0, ring.MOD, (T, out), generator=g)
    z[0, :4] = torch.tensor([0, ring.MASK, ring.HALF, ring.HALF - 1])
    u = torch.randint(0, ring.MOD, (T, out), generator=g)
    u[-1, :3] = torch.tensor([0, ring.MASK, ring.HALF])
    sx = torch.cat([torch.tensor([0.0, 1e-38, 3e30])[:kept], torch.rand(max(kept - 3, 0), generator=g)])[:kept]
    sw = torch.rand(out, generator=g) * 1e-3
    sw[:2] = torch.tensor([0.0, 1e30])
    for pad in (u, ring.to_limbs(u)):
        for c, offsets in ((check, False), (None, True), (None, False)):
            old, new = finished_both(kernel, z, pad, sx, sw, c, offsets)
            assert torch.equal(bits(old[0]), bits(new[0]))
            if offsets:
                assert torch.equal(old[1], new[1])
            if c is not None:
                assert torch.equal(old[2], new[2])
                assert torch.equal(new[2], check.output_side((z - u).bitwise_and_(ring.MASK)))   # the oracle


@pytest.mark.parametrize("bad", [-1, ring.MOD, -(1 << 63), (1 << 63) - 1])
def test_a_value_outside_the_ring_is_refused_by_both(kernel, bad):
    for T, out in ((1, 700), (5, 40)):
        z = torch.zeros((T, out), dtype=torch.int64)
        z[T - 1, out - 1] = bad
        for name in ("torch", "c"):
            kernel(name)
            with pytest.raises(blocks.OutOfRange):
                blocks.finish(z, torch.zeros_like(z), torch.ones(T), torch.ones(out), None, blocks.Scratch())


def test_a_deferred_checks_sides_match_and_a_wrong_row_fails(kernel):
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-2047, 2048, (300, 200), generator=g, dtype=torch.int16)
    check = Freivalds(q)
    x = torch.randint(-32767, 32768, (3, 200), generator=g)
    y = x @ q.t().to(torch.int64)                                                    # [3, 300] exact
    y[1, 17] += 1
    for name in ("torch", "c"):
        kernel(name)
        ok = check.copies_pass(x.float(), y + ring.HALF)
        assert ok.tolist() == [True, False, True]


# ---- the compact pool: R and U in the ring's 5 bytes --------------------------------------------------

def test_a_token_of_llama_3_2_1b_pads_is_at_most_4_mb():
    """The pool keeps R's and U's limbs, 5 bytes an element: one row of every (op, layer) at Llama-3.2-1B's
    shapes, counted from the config (PadPool never allocates here: no pool, no background)."""
    cfg = W.load_config("random:llama-3.2-1b")
    D, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {("qkv", i): (cfg.qkv_size, D) for i in range(cfg.num_layers)}
    shapes |= {("o", i): (D, cfg.q_size) for i in range(cfg.num_layers)}
    shapes |= {("gate_up", i): (2 * I, D) for i in range(cfg.num_layers)}
    shapes |= {("down", i): (D, I) for i in range(cfg.num_layers)}
    shapes[("lm_head", None)] = (cfg.vocab_size, D)
    pool = PadPool({k: SimpleNamespace(out_features=o, in_features=n) for k, (o, n) in shapes.items()},
                   pool_tokens=0, lm_head_rows=0, background=False)
    per_layer = (D + cfg.qkv_size) + (cfg.q_size + D) + (D + 2 * I) + (I + D)
    assert pool.bytes_per_token == 5 * (cfg.num_layers * per_layer + D + cfg.vocab_size)
    assert pool.bytes_per_token <= 4e6
    assert PadPool(pool.weights, pool_tokens=PoolSize(nbytes=int(400e6)), lm_head_rows=0,
                   background=False).pool_tokens == int(400e6) // pool.bytes_per_token


@pytest.mark.parametrize("rows,out,min_columns,block_bytes", [(3, 200, 64, 1), (40, 4100, 2048, 1),
                                                               (7, 1000, 64, 8 << 20)])
def test_u_made_a_block_of_columns_at_a_time_is_the_torch_paths(kernel, monkeypatch, rows, out, min_columns,
                                                                block_bytes):
    """pad_u in blocks of U's columns (GEMMs on strided column slices of both weight planes, each block
    combined on its own; uneven last blocks) gives the same limbs as ring.limb_matmul on the whole."""
    monkeypatch.setattr(fast, "MIN_BLOCK_COLUMNS", min_columns)
    monkeypatch.setattr(fast, "GEMM_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(rows + out)
    n = 128
    w = ring.RingWeight(torch.randint(-2047, 2048, (out, n), generator=g, dtype=torch.int16))
    r = torch.randint(0, 256, (ring.LIMBS, rows, n), generator=g, dtype=torch.uint8)
    step = fast.block_columns(rows, out)
    assert step % 64 == 0 and step < out or block_bytes > 1 and step == out
    reference = ring.to_limbs(ring.limb_matmul(r, w).sub_(ring.HALF).bitwise_and_(ring.MASK))
    assert torch.equal(fast.pad_u(r, w), reference)


def test_the_filler_makes_a_refill_in_one_gemm_from_the_keystream():
    """A refill runs as one GEMM of up to fill_rows rows (one keystream block per op when the target fits),
    and every block's R is the ChaCha20 keystream for its number with U = R W^T - 2^39 from it, as before."""
    cfg, weights = W.load("random:tiny", torch.float32)
    ring_weights = {k: ring.RingWeight(w.q) for k, w in quant.quantize_model(cfg, weights).items()}
    for fill_rows, blocks_per_op in ((256, 1), (3, 3)):        # 8 rows: one GEMM, or 3 + 3 + 2
        pool = PadPool(ring_weights, pool_tokens=8, batch_tokens=3, lm_head_rows=2, fill_rows=fill_rows)
        assert pool.wait_full(60)
        layer_ops = len(ring_weights) - 1
        assert pool.source.blocks_issued == layer_ops * blocks_per_op + 1 and pool.pads_made == 8 * layer_ops + 2
        for key, w in ring_weights.items():
            batches = list(pool.pools[key])
            assert [b.r.shape[1] for b in batches][0] == min(fill_rows, 2 if key[0] == "lm_head" else 8)
            for b in batches:
                assert torch.equal(b.u, ring.to_limbs((ring.limb_matmul(b.r, w) - ring.HALF) & ring.MASK))
        pool.close()
    ready = PadPool(ring_weights, pool_tokens=8, batch_tokens=3, lm_head_rows=2, background=False)
    ready.fill_now()                                 # the same fill on the calling thread, no filler thread
    assert ready.pads_made == 8 * layer_ops + 2 and ready.source.blocks_issued == layer_ops + 1
    ready.take_limbs(("o", 0), 8)
    ready.fill_now()
    assert ready.level[("o", 0)] == 8 and ready.stats()["on_demand"] == 0
    ready.close()
    probe = PadPool(ring_weights, pool_tokens=0, lm_head_rows=0, background=False)
    key = ("down", 0)
    r, u = probe.make(key, 5)
    assert torch.equal(r.reshape(-1), keystream(probe.source._key, 0, r.numel()))
    assert torch.equal(u, ring.to_limbs((ring.limb_matmul(r, ring_weights[key]) - ring.HALF) & ring.MASK))
    probe.close()
    with pytest.raises(ValueError, match="fill_rows"):
        PadPool(ring_weights, fill_rows=0, background=False)


def test_the_pool_holds_5_bytes_an_element_and_its_pads_unmask():
    cfg, weights = W.load("random:tiny", torch.float32)
    ring_weights = {k: ring.RingWeight(w.q) for k, w in quant.quantize_model(cfg, weights).items()}
    pool = PadPool(ring_weights, pool_tokens=PoolSize(nbytes=6 * 5 * sum(w.in_features + w.out_features
                                                                           for w in ring_weights.values())),
                   batch_tokens=3, lm_head_rows=2)
    assert pool.pool_tokens == 6 and pool.wait_full(60)
    per_op = {k: 5 * (w.in_features + w.out_features) for k, w in ring_weights.items()}
    expected = sum(b * (2 if k[0] == "lm_head" else 6) for k, b in per_op.items())
    assert pool.bytes_held == expected == pool.stats()["bytes_held"]
    key = ("gate_up", 1)
    r, u = pool.take_limbs(key, 4)                       # spans two blocks of 3 rows
    assert r.dtype == u.dtype == torch.uint8 and r.shape == (5, 4, cfg.hidden_size)
    assert torch.equal(ring.from_limbs(u), (ring.limb_matmul(r.contiguous(), ring_weights[key]) - ring.HALF)
                       & ring.MASK)
    pool.close()


@pytest.mark.parametrize("text,size", [("64", PoolSize(tokens=64)), ("0", PoolSize(tokens=0)),
                                       ("12t", PoolSize(tokens=12)), ("256MB", PoolSize(nbytes=256_000_000)),
                                       ("1.5GiB", PoolSize(nbytes=3 * 2**29)), ("512 kib", PoolSize(nbytes=2**19))])
def test_pad_pool_sizes_parse(text, size):
    assert poolsize.parse(text) == size


@pytest.mark.parametrize("text", ["-1", "1.5", "64 parsecs", "MB", ""])
def test_a_bad_pad_pool_size_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="pad pool size"):
        poolsize.parse(text)


def test_the_cli_takes_a_pad_pool_in_tokens_or_memory_and_refuses_a_bad_one(capsys):
    from tsqp import cli
    assert cli.parser().parse_args(["run", "--pad-pool", "256MB"]).pad_pool == PoolSize(nbytes=256_000_000)
    assert cli.parser().parse_args(["run"]).pad_pool == PoolSize(tokens=64)
    with pytest.raises(SystemExit) as e:
        cli.parser().parse_args(["run", "--pad-pool", "64 parsecs"])
    assert e.value.code == 2 and "pad pool size '64 parsecs'" in capsys.readouterr().err


def test_the_compiled_passes_refuse_operands_of_the_wrong_shape(kernel):
    """The C loops trust their operands' sizes: the wrapper checks every one before passing an address."""
    kernel("c")
    z, u8 = torch.zeros((2, 16), dtype=torch.int64), torch.zeros((5, 2, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="scales"):
        fast.finish(z, u8, torch.ones(2), torch.ones(15), None, torch.empty((2, 16)))
    with pytest.raises(ValueError, match="pad must be"):
        fast.finish(z, u8[:, :1], torch.ones(2), torch.ones(16), None, torch.empty((2, 16)))
    with pytest.raises(ValueError, match="limbs must be"):
        fast.mask(torch.ones(2, 16), u8, torch.empty((5, 2, 15), dtype=torch.uint8), None)
    check = Freivalds(torch.ones((3, 8), dtype=torch.int16)).vectors
    with pytest.raises(ValueError, match="check's ws"):
        fast.mask(torch.ones(2, 16), u8, torch.empty((5, 2, 16), dtype=torch.uint8), check)


@pytest.mark.parametrize("rows,n,out", [(1, 64, 40), (16, 576, 1536), (5, 2048, 3)])
def test_the_pools_u_is_the_torch_paths(kernel, rows, n, out):
    """fast.pad_u (the limb GEMM's products combined in C) against ring.limb_matmul - 2^39 cut into limbs,
    with extreme weights and limbs."""
    g = torch.Generator().manual_seed(rows + n + out)
    q = torch.randint(-2047, 2048, (out, n), generator=g, dtype=torch.int16)
    q[0, :2] = torch.tensor([2047, -2047])
    w = ring.RingWeight(q)
    r = torch.randint(0, 256, (ring.LIMBS, rows, n), generator=g, dtype=torch.uint8)
    r[:, 0] = 255
    reference = ring.to_limbs(ring.limb_matmul(r, w).sub_(ring.HALF).bitwise_and_(ring.MASK))
    assert torch.equal(fast.pad_u(r, w), reference)
