"""The trusted host's share of a protected, verified prefill, measured on this machine's cores.

Issue 13's GPU target (Llama-3.2-1B, 1024 tokens, <= 0.2 s) needs the runner's own work to fit in that time
whatever the GPU does: per linear op it quantizes and masks the input, then unmasks, checks (Freivalds)
and dequantizes the result. This times exactly those steps, with the runner's own functions (the same
calls `ProtectedOffload.submit` and `MaskedPending._finish` make), on one layer's four ops at the model's
shapes, and multiplies by the layer count. The pads come ready (as from a full pool) and the server's
product is computed here once per op in float64, outside the timing. It also counts the bytes each prefill
moves each way, from the config.

Much of the time is the kernel's: glibc maps every temporary above 32 MiB afresh and unmaps it on free, so
each is page-faulted in again (a run here spends ~14 s of system time). Keeping freed memory instead
(mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD) halved the figure, but torch's aligned allocations then leave
the heap growing: 2 GiB resident for a loop whose live peak is 256 MiB, so tsqp does not set it. The runner
reuses two scratch buffers for unmasking and checking instead (`masked.Scratch`); --fresh-temporaries times
the code before that.

    python3 scripts/protect_host_cost.py [--model random:llama-3.2-1b] [--tokens 1024] [--repeat 3]
                                         [--fresh-temporaries]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from tsqp import quant, ring
from tsqp import weights as W
from tsqp.trusted.protect.freivalds import Freivalds
from tsqp.trusted.protect.masked import Scratch

STEPS = ("quantize", "mask", "unmask", "verify", "dequantize")


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def one_op(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, scratch: Scratch | None) -> dict[str, float]:
    """The runner's steps for one request x [T, in] on integer weights q [out, in], each timed. scratch: the
    buffers `ProtectedOffload` reuses; None times the earlier code, a fresh temporary per step."""
    T, (out, n) = x.shape[0], q.shape
    r = torch.randint(0, ring.MOD, (T, n), dtype=torch.int64)                      # a pool's pad rows
    check = Freivalds(q)
    (xq, sx), t_quant = timed(quant.quantize_rows, x)
    u = ring.limb_matmul(ring.to_limbs(r), ring.RingWeight(q))                     # not timed: the pool's U
    z = (u + (xq.to(torch.float64) @ q.t().to(torch.float64)).to(torch.int64)).bitwise_and_(ring.MASK)   # the
    # server's honest answer (X W^T is exact in float64: every partial sum is an integer below 2^39)
    t0 = time.perf_counter()
    limbs = torch.empty((ring.LIMBS, T, n), dtype=torch.uint8)
    ring.to_limbs((xq + r).bitwise_and_(ring.MASK), out=limbs)                     # what goes to the server
    t_mask = time.perf_counter() - t0
    t0 = time.perf_counter()
    if scratch is None:                                                            # masked.py before the reuse
        assert not bool((z >> ring.K).any())
        y = ring.lift(torch.sub(z, u))
    else:                                                                          # MaskedPending._finish
        assert 0 <= int(z.min()) <= int(z.max()) < ring.MOD
        y = ring.lift(torch.sub(z, u, out=scratch.take(0, (T, out))))
    t_unmask = time.perf_counter() - t0
    _, t_verify = timed(check.verify, xq, y, "op", 0, None if scratch is None else scratch.take(1, (T, out)))
    _, t_deq = timed(quant.dequantize, y, sx, scale)
    return dict(zip(STEPS, (t_quant, t_mask, t_unmask, t_verify, t_deq)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fresh-temporaries", action="store_true",
                    help="time the code before the runner reused its scratch buffers")
    a = ap.parse_args()
    scratch = None if a.fresh_temporaries else Scratch()
    cfg = W.load_config(a.model)
    T, D, I = a.tokens, cfg.hidden_size, cfg.intermediate_size
    shapes = {"qkv": (cfg.qkv_size, D), "o": (D, cfg.q_size), "gate_up": (2 * I, D), "down": (D, I)}
    g = torch.Generator().manual_seed(0)
    per_layer = {s: 0.0 for s in STEPS}
    sent = received = 0
    for op, (out, n) in shapes.items():
        q = torch.randint(-2047, 2048, (out, n), generator=g, dtype=torch.int16)
        scale = torch.rand(out, generator=g) * 1e-3
        x = torch.randn(T, n, generator=g)
        runs = [one_op(q, scale, x, scratch) for _ in range(a.repeat)]
        med = {s: statistics.median(r[s] for r in runs) for s in STEPS}
        for s in STEPS:
            per_layer[s] += med[s]
        sent += ring.LIMBS * T * n
        received += 8 * T * out
        print(f"{op:8s} [{T}, {n}] -> [{T}, {out}]: " + ", ".join(f"{s} {1e3 * med[s]:.1f} ms" for s in STEPS),
              flush=True)
    L = cfg.num_layers
    total = sum(per_layer.values()) * L
    print(f"\n{a.model}, {T} tokens, {torch.get_num_threads()} threads, {L} layers (the LM head's one row left out), "
          f"{'a fresh temporary per step' if a.fresh_temporaries else 'scratch buffers reused'}:")
    print("| step | s per prefill | share |\n|---|---|---|")
    for s in STEPS:
        print(f"| {s} | {per_layer[s] * L:.3f} | {per_layer[s] / sum(per_layer.values()):.0%} |")
    print(f"| **total** | **{total:.3f}** | |")
    print(f"bytes per prefill: {sent * L / 2**30:.2f} GiB of limbs to the server, {received * L / 2**30:.2f} GiB of "
          f"int64 results back")


if __name__ == "__main__":
    main()
