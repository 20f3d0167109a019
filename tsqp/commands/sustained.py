"""`tsqp bench --pad-rate N --sustained N`: the pad pool against the machine, and the honest sustained rows
(issue 28, items 4 and 5).

A protected prefill is fast when its pads are ready: the runner then only masks and unmasks. Making the pads
(U = R W^T in int8, ten multiply-adds per weight) costs the runner's cores about ten times the model's own
multiply-adds, so a runner that prefills without pause is bound by its pad rate. These rows say how close
the pool comes to the cores' int8 peak, and what a prompt costs with no pads ready, back to back, and with
the whole model run on the runner's cores instead (the all-in-enclave alternative).
"""
from __future__ import annotations

import statistics
import time

import torch
from rich.table import Table

from .. import ring
from ..trusted.protect import fast
from ..trusted.protect.pads import PadPool

SQUARE = (2048, 2048, 2048)       # a cache-sized GEMM beside the pool's own shapes, for the peak


SPAN_S = 0.05                     # each timing spans at least this long: the kernel's CPU clock of threads
# other than the caller's is brought up to date only now and then, so a shorter span under-counts their time


def best_s(fn, repeat: int) -> tuple[float, float]:
    """Seconds per call, the best of `repeat` spans of calls (each at least SPAN_S) after one warm-up call:
    (wall seconds, the process's CPU seconds)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        calls, t0, cpu0 = 0, time.perf_counter(), time.process_time()
        while calls == 0 or time.perf_counter() - t0 < SPAN_S:
            fn()
            calls += 1
        walls.append((time.perf_counter() - t0) / calls)
        cpus.append((time.process_time() - cpu0) / calls)
    return min(walls), min(cpus)


def token_macs(weights: dict) -> int:
    """int8 multiply-adds in a token of pads: 5 limbs x 2 weight planes x every weight (the LM head once)."""
    return sum(ring.LIMBS * 2 * w.in_features * w.out_features for w in weights.values())


def int8_peak(weights: dict, rows: int, repeat: int) -> tuple[float, float, tuple[int, int, int]]:
    """The best multiply-adds/s of torch._int_mm (the kernel the pool runs, on the threads it runs on) over
    the GEMMs the pool makes a `rows`-row block with ([5 rows, in] x a block of w.wt's columns, the same
    strided slice) and a cache-sized square: (per wall second, per CPU second, (m, k, n) of the wall best)."""
    top, top_cpu, where = 0.0, 0.0, SQUARE
    shapes = {(w.in_features, fast.block_columns(rows, w.out_features)): w for w in weights.values()}
    # timing operands only, never pads (the pool's R comes from pads.PadSource's ChaCha20 keyed by os.urandom)
    cases = [(torch.randint(-128, 128, (ring.LIMBS * rows, k), dtype=torch.int8), w.wt[:, :n])
             for (k, n), w in shapes.items()]
    m, k, n = SQUARE
    cases.append((torch.randint(-128, 128, (m, k), dtype=torch.int8), torch.randint(-128, 128, (k, n),
                                                                                        dtype=torch.int8)))
    for a, b in cases:
        wall, cpu = best_s(lambda: torch._int_mm(a, b), repeat)
        macs = a.shape[0] * a.shape[1] * b.shape[1]
        if macs / wall > top:
            top, where = macs / wall, (a.shape[0], a.shape[1], b.shape[1])
        top_cpu = max(top_cpu, macs / cpu if cpu else 0.0)
    return top, top_cpu, where


def pad_rate(weights: dict, tokens: int, repeat: int) -> dict:
    """In one run: the int8 peak (measured before and after the fill, the higher kept: other work on a shared
    machine lowers a short measurement more than the fill's long one), the ideal pad rate it allows, and the
    rate a fresh pool's own filler thread fills `tokens` tokens of pads at (from start to full; a token: one
    row of every linear). Each per wall second and per CPU second of this process (the second is what other
    work on the machine does not change: the share that the pool's code, not the machine's load, decides)."""
    probe = PadPool(weights, pool_tokens=0, lm_head_rows=0, background=False)
    rows, macs, per_token = probe.fill_rows, token_macs(weights), probe.bytes_per_token
    probe.close()
    before = int8_peak(weights, min(rows, tokens), repeat)
    t0, cpu0 = time.perf_counter(), time.process_time()
    pool = PadPool(weights, pool_tokens=tokens, lm_head_rows=tokens)
    try:
        if not pool.wait_full(None):
            raise RuntimeError(f"the pad pool's filler failed: {pool.stats()['filler_error']}")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        made = pool.tokens_made
    finally:
        pool.close()
    after = int8_peak(weights, min(rows, tokens), repeat)
    peak, _, where = max(before, after)
    peak_cpu = max(before[1], after[1])
    ideal, ideal_cpu = peak / macs, peak_cpu / macs
    return {"int8_peak_macs_per_s": peak, "peak_gemm": list(where), "threads": torch.get_num_threads(),
            "token_macs": macs, "ideal_tokens_per_s": ideal, "fill_tokens": made, "fill_s": wall,
            "fill_tokens_per_s": made / wall, "share_of_ideal": made / wall / ideal, "fill_rows": rows,
            "int8_peak_macs_per_cpu_s": peak_cpu, "ideal_tokens_per_cpu_s": ideal_cpu, "fill_cpu_s": cpu,
            "fill_tokens_per_cpu_s": made / cpu, "share_of_ideal_cpu": made / cpu / ideal_cpu,
            "pool_bytes_per_token": per_token}


def pad_rate_line(p: dict) -> str:
    return (f"pads: int8 GEMM peak {p['int8_peak_macs_per_s'] / 1e9:.1f} G multiply-adds/s (torch._int_mm "
            f"{p['peak_gemm']}, {p['threads']} threads); a token of pads is {p['token_macs'] / 1e9:.3g} G: ideal "
            f"{p['ideal_tokens_per_s']:.2f} tokens/s; the pool filled {p['fill_tokens']:.0f} tokens in "
            f"{p['fill_s']:.2f} s ({p['fill_rows']} rows per GEMM): {p['fill_tokens_per_s']:.2f} tokens/s, "
            f"{p['share_of_ideal']:.0%} of ideal; per CPU second: peak {p['int8_peak_macs_per_cpu_s'] / 1e9:.1f} G, "
            f"ideal {p['ideal_tokens_per_cpu_s']:.2f}, fill {p['fill_tokens_per_cpu_s']:.2f} tokens/s, "
            f"{p['share_of_ideal_cpu']:.0%} of ideal")


def row(label: str, tokens: int, wall_s: float, cpu_s: float, on_demand_rows: int | None = None) -> dict:
    """A sustained row: seconds per prefill (wall and the runner process's CPU), prompt tokens/s by wall and
    per the runner's cores (tokens/s if the runner's CPU seconds were spread over its threads, the server's
    compute elsewhere: what the runner alone allows on a machine whose server has its own GPU)."""
    threads = torch.get_num_threads()
    return {"row": label, "s_per_prefill": wall_s, "tokens_per_s": tokens / wall_s, "runner_cpu_s": cpu_s,
            "tokens_per_s_runner_bound": tokens * threads / cpu_s if cpu_s else 0.0, "threads": threads,
            **({"on_demand_rows": on_demand_rows} if on_demand_rows is not None else {})}


def timed(trial, ids: torch.Tensor, repeat: int, sync, label: str, ready: bool) -> dict:
    """`repeat` prefills with the trial's pool swapped for one with no filler thread: filled on this thread
    before each (ready: pads ready, nothing else on the cores while timed) or never (cold: every pad made as
    its linear runs). Medians of wall and of the runner process's CPU seconds."""
    offload, kept = trial.offload, trial.offload.pool
    rows = ids.numel() if ready else 0
    offload.pool = PadPool(kept.weights, pool_tokens=rows, lm_head_rows=1 if ready else 0, background=False)
    walls, cpus = [], []
    try:
        for _ in range(repeat):
            offload.pool.fill_now()
            t0, cpu0 = time.perf_counter(), time.process_time()
            trial.prefill(ids, sync)
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - cpu0)
        on_demand = offload.pool.stats()["on_demand_rows"] // repeat
    finally:
        offload.pool.close()
        offload.pool = kept
    return {**row(label, ids.numel(), statistics.median(walls), statistics.median(cpus), on_demand),
            "times_s": walls}


def back_to_back(trial, ids: torch.Tensor, count: int, sync, label: str) -> dict:
    """`count` prefills in a row from a full pool, none waiting for the pool to refill: the pad-bound rate
    (per prefill: the run's wall and CPU seconds over count)."""
    trial.settle_pool()
    before = trial.offload.pool.stats()["on_demand_rows"]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(count):
        trial.prefill(ids, sync)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    on_demand = (trial.offload.pool.stats()["on_demand_rows"] - before) // count
    return {**row(label, ids.numel(), wall / count, cpu / count, on_demand), "prefills": count}


def table(rows: list[dict], tokens: int) -> Table:
    t = Table(title=f"sustained: {tokens}-token prefills (runner on {rows[0]['threads']} threads)")
    for col in ("row", "s per prefill", "runner CPU s", "prompt tokens/s", "tokens/s runner-bound",
                "pad rows made on demand per prefill"):
        t.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        t.add_row(r["row"], f"{r['s_per_prefill']:.3f}", f"{r['runner_cpu_s']:.3f}", f"{r['tokens_per_s']:.1f}",
                  f"{r['tokens_per_s_runner_bound']:.1f}", str(r["on_demand_rows"]) if "on_demand_rows" in r else "-")
    return t
