"""The trusted host's share of a protected, verified prefill, measured on this machine's cores.

Issue 13's GPU target (Llama-3.2-1B, 1024 tokens, <= 0.2 s) needs the runner's own work to fit in that time
whatever the GPU does: per linear op it quantizes and masks the input, then unmasks, dequantizes and checks
the result (Freivalds). This times exactly those steps, with the runner's own functions (`blocks.mask` and
`blocks.finish`, which `ProtectedOffload` calls), on one layer's four ops at the model's shapes, and
multiplies by the layer count. The check's share is what the blocks' own clocks give it, plus the final
comparison. The pads come ready (as from a full pool) and the server's product is computed here once per op
in float64, outside the timing. It also counts the bytes each prefill moves each way, from the config.

    python3 scripts/protect_host_cost.py [--model random:llama-3.2-1b] [--tokens 1024] [--repeat 3] [--kernels torch,c]
                                         [--threads N]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from tsqp import quant, ring
from tsqp import weights as W
from tsqp.trusted.protect import blocks, fast
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


def operands(q: torch.Tensor, x: torch.Tensor) -> tuple:
    """Not timed: a pool's pad rows as it keeps them (R's and U's limbs, uint8 [5, T, in] and [5, T, out]),
    the server's honest answer z int64 [T, out] (X W^T is exact in float64: every partial sum is an integer
    below 2^39), the check, and the same pads as int64 (the pool's form before issue 28, which the torch
    reference is timed with: lifting 5-byte pads is no part of what it used to cost)."""
    T, n = x.shape
    r = torch.randint(0, 256, (ring.LIMBS, T, n), dtype=torch.uint8)
    u = ring.limb_matmul(r, ring.RingWeight(q))
    xq = quant.quantize_rows(x)[0]
    z = (u + (xq.to(torch.float64) @ q.t().to(torch.float64)).to(torch.int64)).bitwise_and_(ring.MASK)
    u = u.sub_(ring.HALF).bitwise_and_(ring.MASK)
    return r, ring.to_limbs(u), z, Freivalds(q), (ring.from_limbs(r), u)


def one_op(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, limbs: torch.Tensor, scratch: blocks.Scratch,
           results: blocks.Results, ops: tuple) -> dict[str, float]:
    """The runner's steps for one request x [T, in] on integer weights q [out, in], each timed, and the minor
    page faults they took."""
    T, (out, n) = x.shape[0], q.shape
    r, u, z, check = ops[:4]
    if fast.KERNEL == "torch":                 # the reference as it ran before the pool kept 5 bytes: int64 pads
        r, u = ops[4]
    y = results.take((T, out))                 # as the runner does: the buffer a released result left
    f0, c0 = faults(), time.process_time()
    (sx, input_parts, check_in), t_mask = timed(blocks.mask, x, r, limbs, check, scratch)
    (_, output_parts, check_out), t_finish = timed(blocks.finish, z, u, sx, scale, check, scratch, y)
    ok, t_passes = timed(check.passes, output_parts, input_parts)
    f1, c1 = faults(), time.process_time()
    results.give(y)
    assert bool(ok.all())
    return {"mask": t_mask - check_in, "unmask": t_finish - check_out, "verify": check_in + check_out + t_passes,
            "faults": f1 - f0, "cpu": c1 - c0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kernels", default=fast.KERNEL, help="comma-separated: c (the compiled per-row passes), "
                    "torch (the reference chains); repeats alternate between them")
    ap.add_argument("--threads", type=int, default=None, help="torch's intra-op threads, which the compiled passes "
                                                               "use too (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    kernels = a.kernels.split(",")
    if not set(kernels) <= {"c", "torch"} or ("c" in kernels and fast._fastpath is None):
        raise SystemExit(f"--kernels takes c (built: {fast._fastpath is not None}) and torch, got {a.kernels}")
    scratch, results = blocks.Scratch(), blocks.Results()
    cfg = W.load_config(a.model)
    T, D, I = a.tokens, cfg.hidden_size, cfg.intermediate_size
    shapes = {"qkv": (cfg.qkv_size, D), "o": (D, cfg.q_size), "gate_up": (2 * I, D), "down": (D, I)}
    g = torch.Generator().manual_seed(0)
    per_layer = {k: {s: 0.0 for s in (*STEPS, "faults", "cpu")} for k in kernels}
    ratios = {k: [] for k in kernels}                  # per op: median of paired (kernel / first kernel)
    sent = received = moved = 0
    for op, (out, n) in shapes.items():
        q = torch.randint(-2047, 2048, (out, n), generator=g, dtype=torch.int16)
        scale = torch.rand(out, generator=g) * 1e-3
        x = torch.randn(T, n, generator=g)
        limbs = torch.empty((ring.LIMBS, T, n), dtype=torch.uint8)     # the runner's are in the arena, reused
        ops = operands(q, x)
        runs = {k: [] for k in kernels}
        for _ in range(a.repeat):                      # alternating: a noisy machine hits both alike
            for k in kernels:
                fast.KERNEL = k
                runs[k].append(one_op(q, scale, x, limbs, scratch, results, ops))
        for k in kernels:
            med = {s: statistics.median(r[s] for r in runs[k]) for s in (*STEPS, "faults", "cpu")}
            for s in per_layer[k]:
                per_layer[k][s] += med[s]
            ratios[k].append(statistics.median(sum(r[s] for s in STEPS) / sum(b[s] for s in STEPS)
                                               for r, b in zip(runs[k], runs[kernels[0]])))
            print(f"{op:8s} [{T}, {n}] -> [{T}, {out}] {k:5s}: " + ", ".join(f"{s} {1e3 * med[s]:.1f} ms"
                                                                         for s in STEPS)
                  + f", {med['faults']:.0f} page faults", flush=True)
        sent += ring.LIMBS * T * n
        received += 8 * T * out
        moved += T * n * (4 + 2 * ring.LIMBS) + T * out * (8 + ring.LIMBS + 4)   # the passes' own bytes
    L = cfg.num_layers
    copy = copy_bandwidth()
    print(f"\n{a.model}, {T} tokens, {torch.get_num_threads()} threads, {L} layers (the LM head's one row left out); "
          f"medians of {a.repeat} alternating repeats per op:")
    print("| passes | " + " | ".join(LABELS[s] for s in STEPS) + " | **total s per prefill** | x " + kernels[0]
          + " (paired, per op) | effective GB/s | CPU s (all threads) |\n|---|" + "---|" * (len(STEPS) + 4))
    for k in kernels:
        total = sum(per_layer[k][s] for s in STEPS) * L
        print(f"| {k} | " + " | ".join(f"{per_layer[k][s] * L:.3f}" for s in STEPS) + f" | **{total:.3f}** | "
              f"{statistics.median(ratios[k]):.2f} | {moved * L / total / 1e9:.1f} | {per_layer[k]['cpu'] * L:.3f} |")
        print(f"minor page faults per prefill ({k}): {per_layer[k]['faults'] * L:.0f} (fresh pages of temporaries)")
    print(f"bytes per prefill: {sent * L / 2**30:.2f} GiB of limbs to the server, {received * L / 2**30:.2f} GiB of "
          f"int64 results back; the compiled passes read and write {moved * L / 1e9:.2f} GB (x 4 + R 5 + limbs 5 "
          f"bytes an input, z 8 + U 5 + y 4 an output); a copy on this machine: {copy[0]:.1f} GB/s on one thread, "
          f"{copy[1]:.1f} GB/s on {torch.get_num_threads()} (read + write, same run)")


def copy_bandwidth(nbytes: int = 256 * 2**20) -> tuple[float, float]:
    """GB/s (bytes read + written) of a large copy, one thread and torch's threads: best of 5."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    threads, out = torch.get_num_threads(), []
    for n in (1, threads):
        torch.set_num_threads(n)
        dst.copy_(src)
        best = min(timed(dst.copy_, src)[1] for _ in range(5))
        out.append(2 * nbytes / best / 1e9)
    torch.set_num_threads(threads)
    return out[0], out[1]


if __name__ == "__main__":
    main()
