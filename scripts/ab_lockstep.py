"""Two checkouts of tsqp, timed in lockstep on one machine: the A/B behind issue 11's "no worse than before".

On a small shared VM, two benchmark runs one after the other differ by more than the change being judged
(the same code's local prefill ranged 0.15-0.32 s within one run). Here each checkout runs a long-lived
worker (its own `tsqp serve` and runner, the bench's `local` and `shm` trials, warmed up) and a coordinator
gives them rounds in a random order, so both see the same drift; each round is paired.

Per round and checkout: a 256-token prefill over local and over shm (random order), the median per-token
time of 32 decode steps after a 64-token prompt over shm and in-process, and the per-call overhead of decode-
shaped calls over shm. Printed: the medians, and new-old differences with bootstrap 95% intervals. The shm
prefill is given against local both as a ratio and as a difference: the transport's own cost is the
difference, and a ratio also moves when the in-process model alone gets faster or slower.

    python3 scripts/ab_lockstep.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 40]
    (e.g. git worktree add /tmp/before 0d996c0; python3 scripts/ab_lockstep.py /tmp/before .)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time


def decode_widths(cfg) -> dict[str, int]:
    """Each per-layer linear op's input width."""
    return {"qkv": cfg.hidden_size, "o": cfg.q_size, "gate_up": cfg.hidden_size, "down": cfg.intermediate_size}


def decode_shaped_calls(off, widths: dict[str, int], layers: int, repeat: int) -> int:
    """`repeat` rounds of one-row calls of every layer's linear ops (submit, result, release); the call count."""
    for _ in range(repeat):
        for layer in range(layers):
            for op, width in widths.items():
                x = off.empty((1, width))
                x.fill_(0.01)
                p = off.submit(op, layer, x)
                p.result()
                p.release()
    return repeat * layers * len(widths)


def worker() -> None:
    """One checkout's side, driven by lines on stdin ("ab": local first, "ba": shm first)."""
    try:
        from tsqp.commands import bench as B
        from tsqp.commands.run import fixed_prompt
    except ImportError:                      # the layout before the trust domains (issue 11)
        from tsqp import bench as B
        from tsqp.runner import fixed_prompt
    from tsqp import weights as W
    a = argparse.Namespace(model="random:small", device="cpu", tokens=256, spin_us=0, timeout=60, compile=False,
                           endpoint=None, warmup=1, repeat=1)
    cfg = W.load_config(a.model)
    ids, prompt = fixed_prompt(cfg, 256), fixed_prompt(cfg, 64)
    bench = B.Bench(a)
    configs = [B.Config("local", "float32", "linear", 1), B.Config("shm", "float32", "linear", 1)]
    bench.start_servers(configs)
    trials = [bench.open(c, ids) for c in configs]

    def decode_ms(trial) -> float:
        model = trial.model
        cache = model.new_cache(64 + 33)
        token = int(model.prefill(prompt, cache).argmax())
        times = []
        for _ in range(32):
            t0 = time.perf_counter()
            token = int(model.decode(token, cache).argmax())
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def call_us(trial, repeat: int = 30) -> float:
        """Per decode-shaped call over shm, the server's stated compute taken out."""
        trial.stats.reset()
        t0 = time.perf_counter()
        calls = decode_shaped_calls(trial.offload, decode_widths(cfg), cfg.num_layers, repeat)
        stats = trial.stats
        return 1e6 * (time.perf_counter() - t0 - stats.server_compute_s) / calls

    for t in trials:
        t.prefill(ids, bench.sync)
        decode_ms(t)
    print("ready", flush=True)
    for line in sys.stdin:
        out = {}
        for i in ((0, 1) if line.strip() == "ab" else (1, 0)):
            t0 = time.perf_counter()
            trials[i].prefill(ids, bench.sync)
            out[configs[i].transport] = time.perf_counter() - t0
        out["decode_ms"], out["local_decode_ms"] = decode_ms(trials[1]), decode_ms(trials[0])
        out["call_us"] = call_us(trials[1])
        print(json.dumps(out), flush=True)
    for t in trials:
        t.close()
    bench.stop_servers()


def interval(diffs: list[float], rng: random.Random) -> tuple[float, float, float]:
    boot = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(2000))
    return statistics.median(diffs), boot[50], boot[1949]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--json", help="write every round here")
    a = ap.parse_args()
    sides = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    procs = {}
    for side, path in sides.items():
        env = {**os.environ, "PYTHONPATH": path, "OMP_WAIT_POLICY": "PASSIVE"}
        procs[side] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env, cwd="/tmp")
    for side, p in procs.items():
        while not (line := p.stdout.readline()).startswith("ready"):
            if not line:
                raise SystemExit(f"the {side} worker ({sides[side]}) exited before it was ready")
    rng = random.Random(1)
    rounds = {side: [] for side in sides}
    for _ in range(a.rounds):
        for side in rng.sample(list(sides), 2):
            procs[side].stdin.write(rng.choice(["ab", "ba"]) + "\n")
            procs[side].stdin.flush()
            rounds[side].append(json.loads(procs[side].stdout.readline()))
    for p in procs.values():
        p.stdin.close()
        p.wait()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"checkouts": sides, "rounds": rounds}, f)
    for r in rounds.values():
        for x in r:
            x["ratio"] = x["shm"] / x["local"]
            x["over"] = 1e3 * (x["shm"] - x["local"])
    print(f"{a.rounds} rounds; old {sides['old']}, new {sides['new']}\n")
    print("| figure | old | new | new - old (95% interval) |\n|---|---|---|---|")
    for key, what in (("local", "local prefill, s"), ("shm", "shm prefill, s"),
                      ("ratio", "shm / local, paired by round"),
                      ("over", "shm - local, paired by round, ms"), ("decode_ms", "decode over shm, ms/token"),
                      ("local_decode_ms", "decode in-process, ms/token"), ("call_us", "one decode call over shm, us")):
        old, new = ([x[key] for x in rounds[s]] for s in ("old", "new"))
        mid, lo, hi = interval([n - o for o, n in zip(old, new)], rng)
        print(f"| {what} | {statistics.median(old):.4g} | {statistics.median(new):.4g} | "
              f"{mid:+.3g} ({lo:+.3g} .. {hi:+.3g}) |")


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker()
    else:
        main()
