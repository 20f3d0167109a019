"""How much code one offload call runs, in checkouts of tsqp: issue 11's "the per-call code in client and
server is shorter", measured by running it rather than by choosing functions to count.

A runner opens the bench's shm trial (control pipes, random:small) against a `tsqp serve` of the same
checkout, and makes decode-shaped calls (submit, result, release of qkv, o, gate_up and down for every
layer). A line tracer in each process records every line of the checkout's `tsqp` package that runs:
  lines, cold       distinct lines run by the first calls of each shape (these build the per-shape caches on
                    both sides)
  lines, warm       distinct lines run by the later calls (the steady path a decode step takes)
  events per call   line events per call, warm (how much Python one call executes)
The server is traced in its own process (a wrapper that runs `tsqp serve`; signals mark the phases).

    python3 scripts/per_call_lines.py CHECKOUT [CHECKOUT ...] [--functions]
    (e.g. git worktree add /tmp/before 0d996c0; python3 scripts/per_call_lines.py /tmp/before .)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class LineTracer:
    """Records (file, line) of every line run in files under `root` by the thread that installs it."""

    def __init__(self, root: str):
        self.root, self.seen, self.events = root, set(), 0

    def __call__(self, frame, event, arg):
        if not frame.f_code.co_filename.startswith(self.root):
            return None
        if event == "line":
            self.seen.add((frame.f_code.co_filename, frame.f_lineno))
            self.events += 1
        return self

    def take(self) -> tuple[set, int]:
        """What was recorded since the last take."""
        seen, events = self.seen, self.events
        self.seen, self.events = set(), 0
        return seen, events


def traced_server(out_path: str, serve_args: list[str]) -> None:
    """`tsqp serve serve_args` under a line tracer. Each SIGUSR1 ends a phase (the start, then the first
    calls); SIGUSR2 ends the last (the later calls) and writes the first calls' and later calls' records to
    out_path."""
    import tsqp
    tracer = LineTracer(os.path.dirname(tsqp.__file__))
    phases = []

    def mark(signum, _frame):
        phases.append(tracer.take())
        if signum == signal.SIGUSR2:
            _, (cold, _), (warm, events) = phases
            with open(out_path + ".part", "w") as f:
                json.dump({"cold": sorted(cold), "warm": sorted(warm), "events": events}, f)
            os.replace(out_path + ".part", out_path)

    signal.signal(signal.SIGUSR1, mark)
    signal.signal(signal.SIGUSR2, mark)
    sys.argv = ["tsqp", "serve", *serve_args]
    from tsqp import cli
    sys.settrace(tracer)
    cli.main(sys.argv[1:])


def worker() -> None:
    import argparse
    try:
        from tsqp.commands import bench as B
        from tsqp.commands.launch import stop_servers, wait_ready
    except ImportError:                      # the layout before the trust domains (issue 11)
        from tsqp import bench as B
        from tsqp.launch import stop_servers, wait_ready
    sys.path.insert(0, HERE)
    from ab_lockstep import decode_shaped_calls, decode_widths     # the same calls as the A/B (this folder)
    import tsqp
    from tsqp import weights as W
    root = os.path.dirname(tsqp.__file__)
    folder = tempfile.mkdtemp(prefix="tsqp-lines-")                # 0700: the ipc endpoint's directory
    endpoint, server_out = f"ipc://{folder}/serve.ipc", os.path.join(folder, "server.json")
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--traced-server", server_out,
                               "--model", "random:small", "--device", "cpu", "--dtype", "float32",
                               "--endpoint", endpoint], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_ready([server])
    a = argparse.Namespace(model="random:small", device="cpu", tokens=64, spin_us=0, timeout=60, compile=False,
                           endpoint=endpoint, warmup=1, repeat=1)
    cfg = W.load_config(a.model)
    bench = B.Bench(a)
    trial = bench.open(B.Config("shm", "float32", "linear", 1), fixed_prompt(cfg))
    off, widths = trial.offload, decode_widths(cfg)
    tracer = LineTracer(root)
    server.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    sys.settrace(tracer)
    decode_shaped_calls(off, widths, cfg.num_layers, 2)
    sys.settrace(None)
    cold, _ = tracer.take()
    server.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    sys.settrace(tracer)
    n = decode_shaped_calls(off, widths, cfg.num_layers, 5)
    sys.settrace(None)
    warm, events = tracer.take()
    server.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not os.path.exists(server_out) and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(server_out) as f:
        served = json.load(f)
    trial.close()
    stop_servers([server])
    s_cold, s_warm = {tuple(x) for x in served["cold"]}, {tuple(x) for x in served["warm"]}
    print(json.dumps({"runner": side(root, cold, warm, events / n),
                      "server": side(root, s_cold, s_warm, served["events"] / n)}), flush=True)


def fixed_prompt(cfg):
    try:
        from tsqp.commands.run import fixed_prompt as make
    except ImportError:
        from tsqp.runner import fixed_prompt as make
    return make(cfg, 64)


def side(root: str, cold: set, warm: set, events_per_call: float) -> dict:
    return {"lines_cold": len(cold), "lines_warm": len(warm), "events_per_call": events_per_call,
            "by_function": by_function(root, warm)}


def by_function(root: str, seen: set) -> dict[str, int]:
    """Distinct lines per function, named file:function (the innermost function whose span holds the line)."""
    import ast
    counts: dict[str, int] = {}
    spans: dict[str, list] = {}
    for f in {f for f, _ in seen}:
        tree = ast.parse(open(f).read())
        spans[f] = sorted((n.lineno, n.end_lineno, n.name) for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    for f, line in seen:
        inner = [s for s in spans[f] if s[0] <= line <= s[1]]
        name = f"{os.path.relpath(f, root)}:{inner[-1][2] if inner else '<module>'}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def measure(checkout: str) -> dict:
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                         cwd=checkout, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker()
        return
    if sys.argv[1:2] == ["--traced-server"]:
        traced_server(sys.argv[2], sys.argv[3:])
        return
    functions = "--functions" in sys.argv
    checkouts = [os.path.abspath(c) for c in sys.argv[1:] if c != "--functions"]
    got = {c: measure(c) for c in checkouts}
    names = [os.path.basename(c) or c for c in checkouts]
    print("| side | figure | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for who in ("runner", "server"):
        for key, label in (("lines_cold", "distinct lines, the first calls of each shape"),
                           ("lines_warm", "distinct lines, later calls"),
                           ("events_per_call", "line events per later call")):
            print(f"| {who} | {label} | " + " | ".join(f"{got[c][who][key]:g}" for c in checkouts) + " |")
    if functions:
        for c in checkouts:
            print(f"\n{c}:")
            for who in ("runner", "server"):
                print(f"  {who}: " + ", ".join(f"{k} {v}" for k, v in got[c][who]["by_function"].items()))


if __name__ == "__main__":
    main()
