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
the runner's range check, unmasking and Freivalds check. --server-us N,... makes each reply ready N us after
its request (a GPU server's round trip; the runner's share is then the wall time less N per call), which
deferred checks (deferred.py) overlap their work with; --checks strict,deferred. Rounds alternate between
every latency and kind of check, each a new session, and the table gives each one's ratio to strict checks
at the same latency, paired by round.

    python3 scripts/protect_decode_cost.py [--model random:llama-3.2-1b] [--tokens 32] [--repeat 5] [--threads N]
                                           [--server-us 0,100] [--checks strict,deferred]
                                           [--kernels torch,c]
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
from tsqp.trusted.protect import fast
from tsqp.trusted.protect.masked import ProtectedOffload, QuantizedModel
from tsqp.trusted.protect.pads import PadRow

OPS = ("qkv", "o", "gate_up", "down")


class ReadyServer:
    """An honest server whose reply costs the runner nothing: Z = (U + 2^39) + Xq W^T mod 2^40, from the U of
    the pad just taken (recorded by `watch`) and each op's product for its fixed input."""

    def __init__(self, products: dict[str, torch.Tensor], server_us: float = 0.0):
        self.products, self.u, self.seconds, self.latency_s = products, None, 0.0, server_us / 1e6
        self.cpu_s = 0.0                      # the process's CPU seconds in submit (this thread's, here)

    def watch(self, pool) -> None:
        take, take_row = pool.take_limbs, pool.take_row

        def recorded(key, rows):
            r, u = take(key, rows)
            self.u = u                        # U's limbs, uint8 [5, rows, out]
            return r, u

        def recorded_row(key):                # a decode step's row, where the pool holds it (pads.PadRow)
            self.u = take_row(key)            # sliced in submit, on the server's clock
            return self.u
        pool.take_limbs, pool.take_row = recorded, recorded_row

    def empty(self, shape, dtype=None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def submit(self, op: str, layer, limbs: torch.Tensor) -> Done:
        t0, c0 = time.perf_counter(), time.process_time()
        u = self.u.u() if isinstance(self.u, PadRow) else self.u
        z = ring.from_limbs(u).add_(ring.HALF).add_(self.products[op]).bitwise_and_(ring.MASK)   # [1, out]
        ready_at = time.perf_counter()
        self.seconds += ready_at - t0
        self.cpu_s += time.process_time() - c0
        return Later(z, ready_at + self.latency_s) if self.latency_s else Done(z)

    def close(self) -> None:
        pass


class Later(Done):
    """A reply that is ready at a given time (perf_counter seconds): result() waits for it."""

    def __init__(self, value: torch.Tensor, ready_at: float):
        super().__init__(value)
        self.ready_at = ready_at

    def result(self) -> torch.Tensor:
        while time.perf_counter() < self.ready_at:
            pass
        return super().result()


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


def one_round(model, cfg, L: int, inputs, products, a, server_us: float, deferred: bool, kernel: str) -> dict:
    """One session with a full pool, timed over tokens - 1 decode steps: the runner's seconds per token, with
    the per-row passes of `kernel` (fast.py: c, or the torch reference)."""
    fast.KERNEL = kernel
    # the pool is filled in one batch per op and idle while timed (the filler would share the cores; it
    # works while the runner waits for the user)
    server = ReadyServer(products, server_us)
    po = ProtectedOffload(server, cfg, model, verify=not a.no_verify, pool_tokens=L * a.tokens,
                          batch_tokens=L * a.tokens, lm_head_rows=a.tokens, background=True,
                          deferred_checks=deferred)
    server.watch(po.pool)
    if not po.pool.wait_full(600):
        raise SystemExit("the pad pool did not fill in 600 s")
    one_token(po, 1, inputs)            # warm: the scratch views and result buffers exist
    po.stats.reset()
    on_demand, server.seconds, server.cpu_s = po.pool.on_demand, 0.0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(a.tokens - 1):
        one_token(po, L, inputs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = a.tokens - 1
    latency = n * (L * len(OPS) + 1) * server.latency_s
    result = {"runner": (wall - server.seconds - latency) / n, **{k: v / n for k, v in po.stats.trusted_s.items()},
              "on_demand": po.pool.on_demand - on_demand, "cpu": (cpu - server.cpu_s) / n}
    po.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per timed round")
    ap.add_argument("--repeat", type=int, default=5, help="timed rounds, each a new session with a full pool")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--checks", default="strict",
                    help="comma-separated: strict (check before use), deferred (check one-row results while "
                         "waiting for the next reply, deferred.py); rounds alternate between them")
    ap.add_argument("--server-us", default="0", help="comma-separated: each reply is ready this long after its "
                                                     "request; rounds alternate between them")
    ap.add_argument("--kernels", default=fast.KERNEL, help="comma-separated: c (the compiled per-row passes), torch "
                    "(the reference chains); rounds alternate between them")
    ap.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    checks = a.checks.split(",")
    if not set(checks) <= {"strict", "deferred"}:
        raise SystemExit(f"--checks takes strict and deferred, got {a.checks}")
    latencies = [float(v) for v in a.server_us.split(",")]
    full = W.load_config(a.model)
    cfg = dataclasses.replace(full, num_layers=1)                 # one layer of the model's shapes, reused
    model = QuantizedModel(cfg, W.random_weights(cfg, torch.float32, "cpu"))
    L, D = full.num_layers, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    inputs = {"qkv": torch.randn(1, D, generator=g), "o": torch.randn(1, cfg.q_size, generator=g),
              "gate_up": torch.randn(1, D, generator=g), "down": torch.randn(1, cfg.intermediate_size, generator=g),
              "lm_head": torch.randn(1, D, generator=g)}
    products = {op: product(x, model.qweights[(op, None if op == "lm_head" else 0)].q) for op, x in inputs.items()}
    kernels = a.kernels.split(",")
    if not set(kernels) <= {"c", "torch"} or ("c" in kernels and fast._fastpath is None):
        raise SystemExit(f"--kernels takes c (built: {fast._fastpath is not None}) and torch, got {a.kernels}")
    configs = [(us, c, k) for us in latencies for c in checks for k in kernels]
    rounds = {cfg_: [] for cfg_ in configs}
    for _ in range(a.repeat):
        for us, c, k in configs:
            rounds[(us, c, k)].append(one_round(model, cfg, L, inputs, products, a, us, c == "deferred", k))
    calls = L * len(OPS) + 1
    print(f"{a.model}: {calls} one-row calls per token ({L} layers x {len(OPS)} + lm_head), "
          f"{'unverified' if a.no_verify else 'verified'}, {torch.get_num_threads()} threads, median of {a.repeat} "
          f"alternating rounds of {a.tokens - 1} tokens; pads made on demand: "
          f"{sum(r['on_demand'] for rs in rounds.values() for r in rs)}")
    print("The runner's share per token: the wall time less the server's (the reply latency per call). The steps "
          "are the runner's seconds in each; deferred checks run while it waits, so they may overlap the latency. "
          "CPU per token: the process's CPU seconds less the stand-in server's (on a loaded machine, what the "
          "runner would take on a core of its own; a reply awaited after N us is spun for, so counts).")
    print("| reply after | checks | passes | mask | unmask | check | the rest | **runner per token** (min-max) "
          "| us per call | x strict (paired) | x torch (paired) | CPU per token |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    for us, c, k in configs:
        rs = rounds[(us, c, k)]
        med = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in ("runner", "mask", "unmask", "verify", "cpu")}
        rest = med["runner"] - sum(med[k] for k in ("mask", "unmask", "verify"))
        base, reference = rounds.get((us, "strict", k)), rounds.get((us, c, "torch"))
        ratio = f"{statistics.median(r['runner'] / b['runner'] for r, b in zip(rs, base)):.2f}" if base else ""
        versus = f"{statistics.median(r['runner'] / b['runner'] for r, b in zip(rs, reference)):.2f}" \
            if reference else ""
        lo, hi = min(r["runner"] for r in rs), max(r["runner"] for r in rs)
        print(f"| {us:g} us | {c} | {k} | {1e3 * med['mask']:.2f} | {1e3 * med['unmask']:.2f} | {1e3 * med['verify']:.2f} "
              f"| {1e3 * rest:.2f} | **{1e3 * med['runner']:.2f} ms** ({1e3 * lo:.2f}-{1e3 * hi:.2f}) "
              f"| {1e6 * med['runner'] / calls:.0f} | {ratio} | {versus} | {1e3 * med['cpu']:.2f} ms |")


if __name__ == "__main__":
    main()
