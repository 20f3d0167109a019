"""The trusted host's share of a protected, verified prefill, measured on this machine's cores.

Issue 13's GPU target (Llama-3.2-1B, 1024 tokens, <= 0.2 s) needs the runner's own work to fit in that time
whatever the GPU does: per linear op it quantizes and masks the input, then unmasks, dequantizes and checks
the result (Freivalds). This times exactly those steps, with the runner's own functions (`blocks.mask` and
`blocks.finish`, which `ProtectedOffload` calls), on one layer's four ops at the model's shapes, and
multiplies by the layer count. The check's share is what the blocks' own clocks give it, plus the final
comparison. The pads come ready (as from a full pool) and the server's product is computed here once per op
in float64, outside the timing. It also counts the bytes each prefill moves each way, from the config.

    python3 scripts/protect_host_cost.py [--model random:llama-3.2-1b] [--tokens 1024] [--repeat 3]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from tsqp import quant, ring
from tsqp import weights as W
from tsqp.trusted.protect import blocks
from tsqp.trusted.protect.freivalds import Freivalds

STEPS = ("mask", "unmask", "verify")
LABELS = {"mask": "quantize, pad, cut into limbs", "unmask": "unmask, lift, dequantize",
          "verify": "Freivalds check (both sides)"}


def faults() -> int:
    """Minor page faults so far: each is a fresh page of a temporary, written for the first time. Unlike the
    times, a deterministic count on a noisy machine."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def one_op(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, limbs: torch.Tensor, scratch: blocks.Scratch,
           results: blocks.Results) -> dict[str, float]:
    """The runner's steps for one request x [T, in] on integer weights q [out, in], each timed, and the minor
    page faults they took."""
    T, (out, n) = x.shape[0], q.shape
    r = torch.randint(0, ring.MOD, (T, n), dtype=torch.int64)                      # a pool's pad rows
    check = Freivalds(q)
    u = ring.limb_matmul(ring.to_limbs(r), ring.RingWeight(q))                     # not timed: the pool's U
    xq = quant.quantize_rows(x)[0]
    z = (u + (xq.to(torch.float64) @ q.t().to(torch.float64)).to(torch.int64)).bitwise_and_(ring.MASK)   # the
    # server's honest answer (X W^T is exact in float64: every partial sum is an integer below 2^39)
    u = u.sub_(ring.HALF).bitwise_and_(ring.MASK)                                 # as the pool keeps it
    y = results.take((T, out))                 # as the runner does: the buffer a released result left
    f0 = faults()
    (sx, input_parts, check_in), t_mask = timed(blocks.mask, x, r, limbs, check, scratch)
    (_, output_parts, check_out), t_finish = timed(blocks.finish, z, u, sx, scale, check, scratch, y)
    ok, t_passes = timed(check.passes, output_parts, input_parts)
    f1 = faults()
    results.give(y)
    assert bool(ok.all())
    return {"mask": t_mask - check_in, "unmask": t_finish - check_out, "verify": check_in + check_out + t_passes,
            "faults": f1 - f0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    scratch, results = blocks.Scratch(), blocks.Results()
    cfg = W.load_config(a.model)
    T, D, I = a.tokens, cfg.hidden_size, cfg.intermediate_size
    shapes = {"qkv": (cfg.qkv_size, D), "o": (D, cfg.q_size), "gate_up": (2 * I, D), "down": (D, I)}
    g = torch.Generator().manual_seed(0)
    per_layer = {s: 0.0 for s in (*STEPS, "faults")}
    sent = received = 0
    for op, (out, n) in shapes.items():
        q = torch.randint(-2047, 2048, (out, n), generator=g, dtype=torch.int16)
        scale = torch.rand(out, generator=g) * 1e-3
        x = torch.randn(T, n, generator=g)
        limbs = torch.empty((ring.LIMBS, T, n), dtype=torch.uint8)     # the runner's are in the arena, reused
        runs = [one_op(q, scale, x, limbs, scratch, results) for _ in range(a.repeat)]
        med = {s: statistics.median(r[s] for r in runs) for s in (*STEPS, "faults")}
        for s in per_layer:
            per_layer[s] += med[s]
        sent += ring.LIMBS * T * n
        received += 8 * T * out
        print(f"{op:8s} [{T}, {n}] -> [{T}, {out}]: " + ", ".join(f"{s} {1e3 * med[s]:.1f} ms" for s in STEPS)
              + f", {med['faults']:.0f} page faults",
              flush=True)
    L = cfg.num_layers
    total = sum(per_layer[s] for s in STEPS) * L
    print(f"\n{a.model}, {T} tokens, {torch.get_num_threads()} threads, {L} layers (the LM head's one row left out):")
    print("| step | s per prefill | share |\n|---|---|---|")
    for s in STEPS:
        print(f"| {LABELS[s]} | {per_layer[s] * L:.3f} | {per_layer[s] * L / total:.0%} |")
    print(f"| **total** | **{total:.3f}** | |")
    print(f"minor page faults per prefill: {per_layer['faults'] * L:.0f} (fresh pages of temporaries)")
    print(f"bytes per prefill: {sent * L / 2**30:.2f} GiB of limbs to the server, {received * L / 2**30:.2f} GiB of "
          f"int64 results back")


if __name__ == "__main__":
    main()
