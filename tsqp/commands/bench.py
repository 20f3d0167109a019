"""`tsqp bench`: the before/after table of the original checklist, as one command.

Starts its own servers (or uses --endpoint), connects and warms up every configuration of the matrix, then
times `--repeat` rounds in which each configuration runs one prefill in turn (so drift of a noisy machine
hits every row alike), and reports the median with min and max. In the same run it measures two
references: the whole model on the server's device alone (no split) and the whole model on the CPU in
this process (what running everything inside the enclave costs). Every row shows its ratio to both.
With --decode N each timed prefill is followed by N greedy decode steps from its KV cache: a row gets the
median over rounds of each round's median ms per token, and its ratio to the plain shm row of the same
dtype, policy and chunks, paired by round (the protected rows' decode target is a ratio to unprotected).
"""
from __future__ import annotations

import itertools
import os
import platform
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .. import weights as W
from ..local import LocalOffload
from ..stats import Stats
from ..trusted.model import POLICIES, TrustedModel
from ..trusted.protect.masked import ProtectedOffload
from ..untrusted.compute import Compute
from ..wire.client import RemoteOffload, default_arena_bytes
from . import sustained
from .engine import attn_dtype
from .files import write_figure, write_json
from .launch import free_tcp_port, private_ipc_endpoint, start_server, stop_servers, wait_ready
from .nosplit import NoSplitModel, NoSplitOffload
from .run import fixed_prompt

console = Console(highlight=False, width=None if os.isatty(1) else 200)
# shm-socket: shm, control messages over ZeroMQ; shm-otp(-verify): --protect otp (--verify) over shm;
# shm-otp-verify-deferred: --verify --deferred-checks
TRANSPORTS = ("local", "shm", "shm-socket", "ipc", "tcp", "shm-otp", "shm-otp-verify", "shm-otp-verify-deferred")
ATTN_DTYPES = ("auto", "float32", "bfloat16")
BATCH_TOKENS = 16                  # protected rows: pad rows the pool makes per GEMM


@dataclass
class Config:
    transport: str
    dtype: str
    policy: str
    chunks: int
    attn: str = "auto"

    @property
    def label(self) -> str:
        return label_of(self.__dict__)


def label_of(r: dict) -> str:
    return (f"{r['transport']} {r['dtype']} {r['policy']}" + (f" x{r['chunks']}" if r["chunks"] > 1 else "")
            + (f" attn:{r['attn']}" if r.get("attn", "auto") != "auto" else ""))


def timed_prefills(model: TrustedModel, ids: torch.Tensor, chunks: int, repeat: int, warmup: int,
                   stats: Stats, sync) -> tuple[list[float], list[dict]]:
    """Seconds per prefill (warm-up discarded, device synchronised) and each run's statistics."""
    for _ in range(warmup):
        model.prefill(ids, model.new_cache(ids.numel()), chunks)
    sync()
    times, runs = [], []
    for _ in range(repeat):
        stats.reset()
        t0, cpu0 = time.perf_counter(), time.process_time()
        model.prefill(ids, model.new_cache(ids.numel()), chunks)
        sync()
        stats.total_s = time.perf_counter() - t0
        times.append(stats.total_s)
        runs.append({**stats.to_dict(), "cpu_s": time.process_time() - cpu0})
    return times, runs


def summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def median_stats(runs: list[dict]) -> dict:
    """Per-key median over the timed runs (bytes and calls are the same in every run)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["trusted_s"] = {k: statistics.median(r["trusted_s"][k] for r in runs) for k in runs[0]["trusted_s"]}
    return out


class Trial:
    """One configuration, connected and ready; its timed prefills are interleaved with the others'."""

    def __init__(self, config: Config, model: TrustedModel, offload, stats: Stats, decode: int = 0):
        self.config, self.model, self.offload, self.stats, self.decode = config, model, offload, stats, decode
        self.times, self.runs, self.decode_s = [], [], []     # decode_s: each round's median seconds per token

    def prefill(self, ids: torch.Tensor, sync) -> tuple[torch.Tensor, object]:
        cache = self.model.new_cache(ids.numel() + self.decode)
        logits = self.model.prefill(ids, cache, self.config.chunks)
        sync()
        return logits, cache

    def settle_pool(self) -> None:
        """Protected rows: wait until the pad pool is full again, as a real runner's is after an idle moment."""
        pool = getattr(self.offload, "pool", None)
        if pool is not None:
            pool.wait_full()

    def timed(self, ids: torch.Tensor, sync) -> None:
        self.stats.reset()
        t0 = time.perf_counter()
        logits, cache = self.prefill(ids, sync)
        self.stats.total_s = time.perf_counter() - t0
        self.times.append(self.stats.total_s)
        self.runs.append(self.stats.to_dict())            # the prefill's figures, before any decode step
        steps = []
        for _ in range(self.decode):
            t0 = time.perf_counter()
            logits = self.model.decode(int(logits.argmax()), cache)
            sync()
            steps.append(time.perf_counter() - t0)
        if steps:
            self.decode_s.append(statistics.median(steps))

    def row(self, ids: torch.Tensor) -> dict:
        c, st = self.config, median_stats(self.runs)
        trusted = sum(st["trusted_s"].values())
        med = statistics.median(self.times)
        return {"transport": c.transport, "dtype": c.dtype, "policy": c.policy, "chunks": c.chunks, "attn": c.attn,
                "tokens": int(ids.numel()), **summary(self.times), "times_s": self.times,
                "bytes_moved": int(st["bytes_moved"]),
                "trusted_s": trusted, "server_s": st["server_compute_s"],
                "transport_s": max(med - trusted - st["server_compute_s"], 0.0), "stats": st,
                **({"decode_steps": self.decode, "decode_ms": 1e3 * statistics.median(self.decode_s),
                    "decode_ms_rounds": [1e3 * v for v in self.decode_s]} if self.decode_s else {}),
                **({"protection": self.offload.report()} if hasattr(self.offload, "report") else {})}

    def close(self) -> None:
        self.offload.close()


class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = args.device.startswith("cuda")
        self.sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.servers: dict[tuple[str, str], str] = {}     # (dtype, socket) -> endpoint
        self.procs = []
        self.weights: dict[str, tuple] = {}                # dtype -> (cfg, weights on CPU)
        self.computes: dict[str, Compute] = {}

    # ---- servers ---------------------------------------------------------------------------------------
    def start_servers(self, configs: list[Config]) -> None:
        if self.args.endpoint:
            return
        need = {(c.dtype, server_kind(c)) for c in configs if c.transport != "local"}
        for dtype, sock in sorted(need):
            endpoint = f"tcp://127.0.0.1:{free_tcp_port()}" if sock == "tcp" else private_ipc_endpoint(dtype[:4])
            # tcp has no control pipes to poll; a protected server computes from float32 whatever the row's dtype
            extra = ("--spin-us", str(self.args.spin_us)) if self.args.spin_us and sock != "tcp" else ()
            extra += ("--protect", "otp") if sock == "ipc-otp" else ()
            served = "float32" if sock == "ipc-otp" else dtype
            self.procs.append(start_server(endpoint, self.args.model, served, self.args.device, extra))
            self.servers[(dtype, sock)] = endpoint
        wait_ready(self.procs)

    def stop_servers(self) -> None:
        stop_servers(self.procs)
        for endpoint in self.servers.values():
            if endpoint.startswith("ipc://"):
                shutil.rmtree(Path(endpoint.removeprefix("ipc://")).parent, ignore_errors=True)

    def endpoint(self, c: Config) -> str:
        if self.args.endpoint:
            return self.args.endpoint
        return self.servers[(c.dtype, server_kind(c))]

    # ---- one configuration -----------------------------------------------------------------------------
    def compute(self, dtype: str) -> Compute:
        """One in-process compute per dtype, shared by the local configurations."""
        if dtype not in self.computes:
            cfg, weights = self.local_weights(dtype)
            self.computes[dtype] = Compute(cfg, weights, self.args.device)
        return self.computes[dtype]

    def local_weights(self, dtype: str):
        if dtype not in self.weights:
            self.weights[dtype] = W.load(self.args.model, W.torch_dtype(dtype), "cpu")
        return self.weights[dtype]

    def open(self, c: Config, ids: torch.Tensor) -> "Trial":
        a, stats = self.args, Stats()
        if c.transport == "local":
            cfg, weights = self.local_weights(c.dtype)
            offload = LocalOffload(self.compute(c.dtype), stats)
            norms = W.norm_weights(weights)
        elif "otp" in c.transport:
            if c.policy != "linear":
                raise ValueError(f"{c.label}: --protect needs --policy linear")
            cfg, weights = self.local_weights("float32")     # the runner's own copy, quantized from float32
            inner = RemoteOffload(self.endpoint(c), "shm", timeout_s=a.timeout, stats=stats,
                                  arena_bytes=lambda cfg: 2 * default_arena_bytes(cfg, ids.numel() + a.decode,
                                                                                  c.chunks),
                                  spin_s=a.spin_us * 1e-6)
            # a pool refills once it lacks a whole batch (16 rows), so it holds a batch more than a round takes:
            # every pad the timed prefill and decode steps use is ready (on-demand events stay 0)
            rows = ids.numel() + a.decode + BATCH_TOKENS
            offload = ProtectedOffload(inner, cfg, weights, verify="verify" in c.transport,
                                       deferred_checks=c.transport.endswith("deferred"), pool_tokens=rows,
                                       batch_tokens=BATCH_TOKENS, lm_head_rows=1 + a.decode + BATCH_TOKENS,
                                       stats=stats)
            offload.expect_fingerprint(inner.info.get("fingerprint"))
            norms = W.norm_weights(weights)
        else:
            transport = "shm" if c.transport.startswith("shm") else "frames"
            arena = lambda cfg: default_arena_bytes(cfg, ids.numel() + a.decode, c.chunks,  # noqa: E731
                                                    c.policy == "seed")
            offload = RemoteOffload(self.endpoint(c), transport, timeout_s=a.timeout, arena_bytes=arena, stats=stats,
                                    control="socket" if c.transport == "shm-socket" else "pipes",
                                    spin_s=a.spin_us * 1e-6)
            cfg, norms = offload.cfg, offload.norms
        try:
            model = TrustedModel(cfg, norms, offload, c.policy, stats, attn_dtype(c.attn, offload.dtype),
                                 fused=a.compile)
        except BaseException:
            offload.close()
            raise
        return Trial(c, model, offload, stats, a.decode)

    def reference(self, dtype: str, ids: torch.Tensor, device: str) -> dict:
        """The whole model on one device, no split: the same math, trusted part and compute together."""
        cfg, weights = self.local_weights(dtype)
        stats = Stats()
        offload = NoSplitOffload(Compute(cfg, weights, device), stats)
        norms = W.norm_weights(weights)
        model = NoSplitModel(device, cfg, norms, offload, "linear", stats,
                             W.torch_dtype(dtype) if device != "cpu" else attn_dtype("auto", W.torch_dtype(dtype)),
                             fused=self.args.compile and device == "cpu")
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        times, runs = timed_prefills(model, ids.to(device), 1, self.args.repeat, self.args.warmup, stats, sync)
        del model, offload
        return {**summary(times), "cpu_s": statistics.median(r["cpu_s"] for r in runs)}


def choices(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """A comma list of choices; the first unknown one is refused by name."""
    items = value.split(",")
    for item in items:
        if item not in allowed:
            raise ValueError(f"unknown {what} '{item}'; choose from {', '.join(allowed)}")
    return items


def server_kind(c: Config) -> str:
    """Which of the bench's own servers a configuration talks to."""
    return "tcp" if c.transport == "tcp" else "ipc-otp" if "otp" in c.transport else "ipc"


def run_bench(args) -> dict:
    a = args
    policies = choices(a.policy, POLICIES, "policy")
    transports = choices(a.transport, TRANSPORTS, "transport")
    dtypes = choices(a.dtype, tuple(W.DTYPE), "dtype")
    chunk_list = [int(c) for c in str(a.chunks).split(",")]
    attns = choices(a.attn_dtype, ATTN_DTYPES, "attention dtype")
    configs = [Config(t, d, p, c, at) for d, p, c, at, t in
               itertools.product(dtypes, policies, chunk_list, attns, transports)]
    cfg = W.load_config(a.model)
    ids = fixed_prompt(cfg, a.tokens)
    bench = Bench(a)
    result = {"settings": settings(a, cfg), "references": {}, "rows": []}
    console.print(f"tsqp bench: {a.model}, {a.tokens} tokens, device {a.device}, {len(configs)} configurations, "
                  f"median of {a.repeat} after {a.warmup} warm-up, {torch.get_num_threads()} threads")
    try:
        bench.start_servers(configs)
        with Progress(console=console, transient=True) as progress:
            task_total = 0 if a.no_references else 2 * len(dtypes)
            task = progress.add_task("measuring", total=task_total)
            if not a.no_references:
                for d in dtypes:
                    progress.update(task, description=f"reference: {a.device} alone, {d}")
                    dev = bench.reference(d, ids, a.device)
                    progress.advance(task)
                    progress.update(task, description=f"reference: runner's CPU alone, {d}")
                    cpu = bench.reference(d, ids, "cpu")
                    progress.advance(task)
                    result["references"][d] = {"device_only_s": dev["median_s"], "cpu_only_s": cpu["median_s"],
                                               "device_only": dev, "cpu_only": cpu}
            trials = []
            for c in configs:                  # connect and warm up every configuration first ...
                progress.update(task, description=f"warming up {c.label}")
                try:
                    trial = bench.open(c, ids)
                    trials.append(trial)
                    for _ in range(a.warmup):
                        trial.settle_pool()
                        trial.prefill(ids, bench.sync)
                except (RuntimeError, ValueError, OSError) as e:
                    failed(result, c, e)
            progress.update(task, total=task_total + a.repeat * len(trials))
            for _ in range(a.repeat):          # ... then time them in turns, so drift hits all rows alike
                for trial in list(trials):
                    progress.update(task, description=trial.config.label)
                    try:
                        for other in trials:   # every pool full: no filler thread shares the cores while timed
                            other.settle_pool()
                        trial.timed(ids, bench.sync)
                    except (RuntimeError, ValueError, OSError) as e:
                        failed(result, trial.config, e)
                        trials.remove(trial)
                        trial.close()
                    progress.advance(task)
            result["rows"] = [t.row(ids) for t in trials]
            if a.pad_rate or a.sustained:
                progress.update(task, description="pad rate and sustained rows")
                measure_sustained(bench, trials, ids, result)
            for trial in trials:
                trial.close()
    finally:
        bench.stop_servers()
    first = dtypes[0]
    if result["references"]:
        # the headline references: for the first dtype of the matrix
        result["references"]["device_only_s"] = result["references"][first]["device_only_s"]
        result["references"]["cpu_only_s"] = result["references"][first]["cpu_only_s"]
    add_ratios(result)
    print_tables(result)
    if a.json:
        write_json(a.json, result)
        console.print(f"wrote {a.json}")
    if a.plot:
        plot(result, a.plot)
        console.print(f"wrote {a.plot}")
    return result


def print_tables(result: dict) -> None:
    console.print(table(result))
    if tax_line(result):
        console.print(tax_line(result), soft_wrap=True)
    if "pad_rate" in result:
        console.print(sustained.pad_rate_line(result["pad_rate"]), soft_wrap=True)
    if "sustained" in result:
        console.print(sustained.table(result["sustained"], result["settings"]["tokens"]))


def measure_sustained(bench: Bench, trials: list[Trial], ids: torch.Tensor, result: dict) -> None:
    """--pad-rate and --sustained, for the first protected row of the matrix (every pool full first: the
    measurements are the only work on the runner's cores)."""
    a = bench.args
    trial = next((t for t in trials if "otp" in t.config.transport), None)
    if trial is None:
        console.print("[red]--pad-rate / --sustained: no protected row is left to measure (see its error)[/red]")
        return
    for other in trials:
        other.settle_pool()
    if a.pad_rate:
        result["pad_rate"] = sustained.pad_rate(trial.offload.ring_weights, a.pad_rate, 2)
    if not a.sustained:
        return
    label = trial.config.transport
    rows = [sustained.timed(trial, ids, a.repeat, bench.sync, f"{label}, pads ready (after idle time)", True),
            sustained.timed(trial, ids, a.repeat, bench.sync, f"{label}, pool cold (pads made as it runs)", False)]
    rows.append(sustained.back_to_back(trial, ids, a.sustained, bench.sync,
                                       f"{label}, {a.sustained} prefills back to back (pad-bound)"))
    ref = result["references"].get("float32")
    whole = ref["cpu_only"] if ref else bench.reference("float32", ids, "cpu")
    rows.append(sustained.row("whole model on the runner's CPU (all in the enclave), float32", ids.numel(),
                              whole["median_s"], whole["cpu_s"]))
    result["sustained"] = rows


def failed(result: dict, c: Config, e: Exception) -> None:
    """Report a configuration that failed and go on with the matrix."""
    console.print(f"[red]{c.label}: {type(e).__name__}: {e}[/red]")
    result.setdefault("errors", []).append({**c.__dict__, "error": f"{type(e).__name__}: {e}"})


def settings(a, cfg) -> dict:
    gpu = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else None
    return {"model": a.model, "device": a.device, "gpu": gpu, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "tokens": a.tokens, "repeat": a.repeat, "warmup": a.warmup, "attn_dtype": a.attn_dtype,
            "layers": cfg.num_layers, "hidden": cfg.hidden_size, "compile": a.compile, "spin_us": a.spin_us,
            "decode": a.decode}


def add_ratios(result: dict) -> None:
    rows = result["rows"]
    if not rows:
        return
    base = rows[0]["median_s"]
    local = {(r["dtype"], r["policy"], r["chunks"], r["attn"]): r for r in rows if r["transport"] == "local"}
    for r in rows:
        r["speedup_vs_first"] = base / r["median_s"]
        ref = result["references"].get(r["dtype"])
        if ref:
            r["vs_device_only"] = r["median_s"] / ref["device_only_s"]
            r["vs_cpu_only"] = r["median_s"] / ref["cpu_only_s"]
        key = (r["dtype"], r["policy"], r["chunks"], r["attn"])
        if key in local:
            base_row = local[key]
            r["vs_local"] = r["median_s"] / base_row["median_s"]
            # rounds run the rows in turn, so a round's two times share the machine's state of the moment
            r["vs_local_paired"] = statistics.median(t / b for t, b in zip(r["times_s"], base_row["times_s"]))
    shm = {(r["dtype"], r["policy"], r["chunks"], r["attn"]): r for r in rows
           if r["transport"] == "shm" and "decode_ms" in r}
    for r in rows:
        base_row = shm.get((r["dtype"], r["policy"], r["chunks"], r["attn"]))
        if base_row is not None and "decode_ms" in r:
            r["decode_vs_shm_paired"] = statistics.median(t / b for t, b in zip(r["decode_ms_rounds"],
                                                                                 base_row["decode_ms_rounds"]))


def tax_line(result: dict) -> str | None:
    """The transport tax as the median over rounds of each row's time over --local's time in that round."""
    taxes = [f"{label_of(r)} {r['vs_local_paired']:.2f}x" for r in result["rows"]
             if r["transport"] != "local" and "vs_local_paired" in r]
    lines = ["x local, paired by round (median of each round's ratio): " + ", ".join(taxes)] if taxes else []
    decode = [f"{label_of(r)} {r['decode_ms']:.1f} ms" + (f" ({r['decode_vs_shm_paired']:.2f}x shm)"
                                                          if "decode_vs_shm_paired" in r else "")
              for r in result["rows"] if "decode_ms" in r]
    if decode:
        lines.append(f"decode, median ms per token over {result['rows'][0]['decode_steps']} steps after each prefill "
                     f"(x shm paired by round): " + ", ".join(decode))
    return "\n".join(lines) or None


def table(result: dict) -> Table:
    t = Table(title=f"tsqp bench: {result['settings']['model']}, {result['settings']['tokens']} tokens, "
                    f"{result['settings']['device']}" + (f" ({result['settings']['gpu']})" if result['settings']['gpu'] else ""))
    for col in ("configuration", "median s", "min-max s", "RPC ms/call", "sent MB", "recv MB", "speedup",
                "x local", "x device-only", "x cpu-only", "trusted s", "server s", "transport s"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    mb = 1 / 1e6
    for d, ref in result["references"].items():
        if isinstance(ref, dict):
            device = result["settings"]["device"]
            t.add_row(f"reference: {device} (server's device) alone, {d}", f"{ref['device_only_s']:.4f}",
                      f"{ref['device_only']['min_s']:.4f}-{ref['device_only']['max_s']:.4f}", *[""] * 10)
            t.add_row(f"reference: runner's CPU alone, {d}", f"{ref['cpu_only_s']:.4f}",
                      f"{ref['cpu_only']['min_s']:.4f}-{ref['cpu_only']['max_s']:.4f}", *[""] * 10)
    for r in result["rows"]:
        st = r["stats"]
        sent = st["sent_bytes"] + st["shm_sent_bytes"]
        recv = st["received_bytes"] + st["shm_received_bytes"]
        label = label_of(r)
        opt = lambda k: f"{r[k]:.2f}" if k in r else "-"  # noqa: E731
        t.add_row(label, f"{r['median_s']:.4f}", f"{r['min_s']:.4f}-{r['max_s']:.4f}",
                  f"{st['rpc_ms_per_call']:.3f}", f"{sent * mb:.1f}", f"{recv * mb:.1f}",
                  f"{r['speedup_vs_first']:.2f}x", opt("vs_local"), opt("vs_device_only"), opt("vs_cpu_only"),
                  f"{r['trusted_s']:.4f}", f"{r['server_s']:.4f}", f"{r['transport_s']:.4f}")
    return t


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'tsqp[plot]'") from None
    rows = result["rows"]
    labels = [label_of(r).replace(" ", "\n") for r in rows]
    parts = [("trusted compute", "trusted_s", "#4c72b0"), ("server compute", "server_s", "#dd8452"),
             ("transport / wait", "transport_s", "#8c8c8c")]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    bottom = [0.0] * len(rows)
    for name, key, color in parts:
        vals = [r[key] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(labels, [r["median_s"] for r in rows], color="black", marker="_", s=400, zorder=3,
               label="median wall time")
    refs = result["references"]
    if "device_only_s" in refs:
        ax.axhline(refs["device_only_s"], color="green", ls="--", lw=1, label="device alone")
        ax.axhline(refs["cpu_only_s"], color="red", ls="--", lw=1, label="CPU alone")
    ax.set_ylabel("seconds per prefill")
    ax.set_title(f"{result['settings']['model']}, {result['settings']['tokens']} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(path, fig, dpi=120)
    plt.close(fig)

