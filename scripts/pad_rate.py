"""The pad pool's fill rate against what this machine's int8 GEMM can do (issue 28, lever 4).

A token of pads costs U = R W^T for every linear op: ring.limb_matmul runs it as one int8 GEMM of the five
limbs times both weight planes, 10 multiply-adds per weight, besides drawing R (ChaCha20), combining the
int32 limb products and cutting U into limbs. This measures, in one run: the int8 GEMM peak (torch._int_mm,
best of the shapes tried, including the pool's own), and PadPool.make per op at several batch sizes on one
layer of the model's shapes plus its LM head; a token's cost is layers x the layer's ops + the LM head.
The ideal rate is the peak divided by a token's multiply-adds; the table gives each batch's share of it.

    python3 scripts/pad_rate.py [--model random:llama-3.2-1b] [--batches 16,64,256] [--repeat 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from tsqp import ring
from tsqp import weights as W
from tsqp.trusted.protect.pads import PadPool


def best(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def int8_peak(shapes: list[tuple[int, int, int]], repeat: int) -> tuple[float, tuple[int, int, int]]:
    """The best multiply-adds per second of torch._int_mm over [m, k] @ [k, n] for these shapes."""
    top, where = 0.0, None
    for m, k, n in shapes:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8)
        rate = m * k * n / best(lambda: torch._int_mm(a, b), repeat)
        if rate > top:
            top, where = rate, (m, k, n)
    return top, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--batches", default="16,64,256", help="comma-separated rows per pool GEMM")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    cfg = W.load_config(a.model)
    D, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    shapes = {("qkv", 0): (cfg.qkv_size, D), ("o", 0): (D, cfg.q_size), ("gate_up", 0): (2 * I, D),
              ("down", 0): (D, I), ("lm_head", None): (cfg.vocab_size, D)}
    g = torch.Generator().manual_seed(0)
    weights = {k: ring.RingWeight(torch.randint(-2047, 2048, s, generator=g, dtype=torch.int16))
               for k, s in shapes.items()}
    pool = PadPool(weights, pool_tokens=0, lm_head_rows=0, background=False)
    batches = [int(b) for b in a.batches.split(",")]
    gemms = [(ring.LIMBS * b, n, 2 * o) for b in batches for (o, n) in shapes.values()] + [(2048, 2048, 2048)]
    peak, where = int8_peak(gemms, a.repeat)
    macs = {k: ring.LIMBS * 2 * o * n for k, (o, n) in shapes.items()}                  # per row
    token_macs = sum(L * m if k[0] != "lm_head" else m for k, m in macs.items())
    ideal = peak / token_macs
    print(f"{a.model}: a token of pads is {token_macs / 1e9:.2f} G int8 multiply-adds (5 limbs x 2 planes x "
          f"the weights); int8 GEMM peak here {peak / 1e9:.1f} G multiply-adds/s (torch._int_mm {list(where)}, "
          f"{torch.get_num_threads()} threads): ideal fill {ideal:.2f} tokens/s")
    print("| rows per GEMM | s per token of pads | fill tokens/s | share of ideal | of which the GEMMs |\n"
          "|---|---|---|---|---|")
    for b in batches:
        per_token = gemm_s = 0.0
        for key, (o, n) in shapes.items():
            count = 1 if key[0] == "lm_head" else L
            per_token += count * best(lambda: pool.make(key, b), a.repeat) / b
            wt = weights[key]
            limbs = torch.randint(0, 256, (ring.LIMBS, b, n), dtype=torch.uint8)
            signed = limbs.view(torch.int8).reshape(ring.LIMBS * b, n)
            gemm_s += count * best(lambda: torch._int_mm(signed, wt.wt), a.repeat) / b
        print(f"| {b} | {per_token:.3f} | {1 / per_token:.2f} | {1 / per_token / ideal:.0%} | "
              f"{gemm_s / per_token:.0%} |", flush=True)
    pool.close()


if __name__ == "__main__":
    main()
