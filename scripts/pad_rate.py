"""The pad pool's fill rate against what this machine's int8 GEMM can do (issue 28, lever 4), at a model's
full shapes without loading a model: only its ring weights (random 12-bit integers; a fill's cost depends on
shapes only), so Llama-3.2-1B's 16 layers fit where a bench's runner and server would not.

The measurement is `tsqp bench --pad-rate`'s (tsqp.commands.sustained.pad_rate): in one run, the int8 GEMM
peak (torch._int_mm on the pool's own GEMMs and a cache-sized square, best of --repeat, on the threads the
filler uses), the ideal rate it allows (peak / a token's multiply-adds) and the rate a fresh pool's filler
thread fills --tokens tokens of pads at.

    python3 scripts/pad_rate.py [--model random:llama-3.2-1b] [--tokens 256] [--repeat 3] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os

import torch

from tsqp import ring
from tsqp import weights as W
from tsqp.commands.sustained import pad_rate, pad_rate_line


def ring_weights(cfg) -> dict:
    D, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {}
    for layer in range(cfg.num_layers):
        shapes |= {("qkv", layer): (cfg.qkv_size, D), ("o", layer): (D, cfg.q_size),
                   ("gate_up", layer): (2 * I, D), ("down", layer): (D, I)}
    shapes[("lm_head", None)] = (cfg.vocab_size, D)
    g = torch.Generator().manual_seed(0)
    top = ring.WEIGHT_MAX
    return {k: ring.RingWeight(torch.randint(-top, top + 1, s, generator=g, dtype=torch.int16))
            for k, s in shapes.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of pads the pool fills")
    ap.add_argument("--repeat", type=int, default=3, help="timings per GEMM shape for the peak")
    ap.add_argument("--rounds", type=int, default=2, help="whole measurements, one after another")
    a = ap.parse_args()
    weights = ring_weights(W.load_config(a.model))
    for n in range(a.rounds):
        print(f"[{a.model}, round {n + 1}, load average {os.getloadavg()[0]:.1f}] "
              + pad_rate_line(pad_rate(weights, a.tokens, a.repeat)), flush=True)


if __name__ == "__main__":
    main()
