"""The trusted runner's per-token cost of a protected, verified decode step, on this machine's cores.

Issue 13's decode target (<= 1.3x the unprotected decode per token, on the GPU host) bounds what the runner
may add per one-row call: a Llama-3.2-1B token makes 16 x 4 linear calls and one LM-head call, and the GPU
host's plain decode took 15.1 ms a token (README), so 1.3x leaves about 4.5 ms for all 65 calls' masking,
unmasking and checking, ~70 us each on that host's cores.

This drives the real `ProtectedOffload` (submit, then result() and release(), as the model does) with one
layer of the model's shapes, called `layers` times per token, plus the LM head, the pads ready in a full
pool. The server is an honest stand-in that answers at once: it takes Z = U + 2^39 + Xq W^T mod 2^40 from
the pad the runner just took and the product precomputed for the (fixed) inputs, as a GPU server's reply
would arrive without the runner's cores doing the GEMM (an in-process `IntCompute` streams its weights
through the same caches and would inflate the runner's figures several times). Every reply still passes
the runner's range check, unmasking and Freivalds check.

    python3 scripts/protect_decode_cost.py [--model random:llama-3.2-1b] [--tokens 32] [--repeat 5] [--threads N]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from tsqp import quant, ring
from tsqp import weights as W
from tsqp.trusted.offload import Done
from tsqp.trusted.protect.masked import ProtectedOffload, QuantizedModel

OPS = ("qkv", "o", "gate_up", "down")


class ReadyServer:
    """An honest server whose reply costs the runner nothing: Z = (U + 2^39) + Xq W^T mod 2^40, from the U of
    the pad just taken (recorded by `watch`) and each op's product for its fixed input."""

    def __init__(self, products: dict[str, torch.Tensor]):
        self.products, self.u, self.seconds = products, None, 0.0

    def watch(self, pool) -> None:
        take = pool.take

        def recorded(key, rows):
            r, u = take(key, rows)
            self.u = u
            return r, u
        pool.take = recorded

    def empty(self, shape, dtype=None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def submit(self, op: str, layer, limbs: torch.Tensor) -> Done:
        t0 = time.perf_counter()
        z = (self.u + ring.HALF).add_(self.products[op]).bitwise_and_(ring.MASK)           # [1, out]
        self.seconds += time.perf_counter() - t0
        return Done(z)

    def close(self) -> None:
        pass


def product(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Xq W^T for one row, exact (float64 sums of integers below 2^53), a block of weight rows at a time."""
    xq = quant.quantize_rows(x)[0].to(torch.float64)                                     # [1, in]
    return torch.cat([(xq @ q[a:a + 8192].t().to(torch.float64)).to(torch.int64)
                      for a in range(0, q.shape[0], 8192)], 1)                          # [1, out]


def one_token(po: ProtectedOffload, layers: int, inputs: dict[str, torch.Tensor]) -> None:
    for _ in range(layers):
        for op in OPS:
            pending = po.submit(op, 0, inputs[op])
            pending.result()
            pending.release()
    pending = po.submit("lm_head", None, inputs["lm_head"])
    pending.result()
    pending.release()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per timed round")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds, each a new session with a full pool")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    full = W.load_config(a.model)
    cfg = dataclasses.replace(full, num_layers=1)                 # one layer of the model's shapes, reused
    model = QuantizedModel(cfg, W.random_weights(cfg, torch.float32, "cpu"))
    L, D = full.num_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    inputs = {"qkv": torch.randn(1, D, generator=g), "o": torch.randn(1, cfg.q_size, generator=g),
              "gate_up": torch.randn(1, D, generator=g), "down": torch.randn(1, cfg.intermediate_size, generator=g),
              "lm_head": torch.randn(1, D, generator=g)}
    products = {op: product(x, model.qweights[(op, None if op == "lm_head" else 0)].q) for op, x in inputs.items()}
    rounds = []
    for _ in range(a.repeat):
        # a session per round, its pool filled in one batch per op and idle while timed (the filler would
        # share the cores; it works while the runner waits for the user)
        server = ReadyServer(products)
        po = ProtectedOffload(server, cfg, model, verify=not a.no_verify, pool_tokens=L * a.tokens,
                              batch_tokens=L * a.tokens, lm_head_rows=a.tokens, background=True)
        server.watch(po.pool)
        if not po.pool.wait_full(600):
            raise SystemExit("the pad pool did not fill in 600 s")
        one_token(po, 1, inputs)            # warm: the scratch views and result buffers exist
        po.stats.reset()
        on_demand, server.seconds = po.pool.on_demand, 0.0
        t0 = time.perf_counter()
        for _ in range(a.tokens - 1):
            one_token(po, L, inputs)
        wall = time.perf_counter() - t0
        n = a.tokens - 1
        rounds.append({"runner": (wall - server.seconds) / n, **{k: v / n for k, v in po.stats.trusted_s.items()},
                       "on_demand": po.pool.on_demand - on_demand})
        po.close()
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    calls = L * len(OPS) + 1
    print(f"{a.model}: {calls} one-row calls per token ({L} layers x {len(OPS)} + lm_head), "
          f"{'unverified' if a.no_verify else 'verified'}, {torch.get_num_threads()} threads, median of "
          f"{a.repeat} rounds of {a.tokens - 1} tokens; pads made on demand: {sum(r['on_demand'] for r in rounds)}")
    print("| runner's step | ms per token | us per call |\n|---|---|---|")
    steps = [k for k in ("mask", "unmask", "verify") if k in med]
    for k in steps:
        print(f"| {k} | {1e3 * med[k]:.2f} | {1e6 * med[k] / calls:.0f} |")
    rest = med["runner"] - sum(med[k] for k in steps)
    print(f"| the rest (pad pool, bookkeeping) | {1e3 * rest:.2f} | {1e6 * rest / calls:.0f} |")
    print(f"| **total** | **{1e3 * med['runner']:.2f}** | **{1e6 * med['runner'] / calls:.0f}** |")


if __name__ == "__main__":
    main()
