"""How much code one offload call runs, in a checkout of tsqp: issue 11's "the per-call code is shorter",
measured by running it rather than by choosing functions to count.

A runner opens the bench's shm trial (its own `tsqp serve`, control pipes, random:small) and makes decode-
shaped calls (submit, result, release of qkv, o, gate_up and down for every layer) under a line tracer that
records every line of the checkout's `tsqp` package that runs. Printed, for the runner's process:
  lines, cold    distinct lines run by the first calls of each shape (these build the per-shape caches)
  lines, warm    distinct lines run by the later calls (the steady path a decode step takes)
  lines per call line events per call, warm (how much Python one call executes)
and the warm lines per function. Only the runner is traced (the server runs in its own process).

    python3 scripts/per_call_lines.py CHECKOUT
    (e.g. git worktree add /tmp/before 0d996c0; python3 scripts/per_call_lines.py /tmp/before)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def worker() -> None:
    import argparse
    import threading
    try:
        from tsqp.commands import bench as B
        from tsqp.commands.run import fixed_prompt
    except ImportError:                      # the layout before the trust domains (issue 11)
        from tsqp import bench as B
        from tsqp.runner import fixed_prompt
    import tsqp
    from ab_lockstep import decode_shaped_calls, decode_widths     # the same calls as the A/B (this folder)
    from tsqp import weights as W
    root = os.path.dirname(tsqp.__file__)
    a = argparse.Namespace(model="random:small", device="cpu", tokens=64, spin_us=0, timeout=60, compile=False,
                           endpoint=None, warmup=1, repeat=1)
    cfg = W.load_config(a.model)
    bench = B.Bench(a)
    config = B.Config("shm", "float32", "linear", 1)
    bench.start_servers([config])
    trial = bench.open(config, fixed_prompt(cfg, 64))
    off, widths = trial.offload, decode_widths(cfg)
    seen: set = set()
    events = [0]
    me = threading.get_ident()

    def tracer(frame, event, arg):
        if not frame.f_code.co_filename.startswith(root):
            return None
        if event == "line" and threading.get_ident() == me:
            seen.add((frame.f_code.co_filename, frame.f_lineno))
            events[0] += 1
        return tracer

    sys.settrace(tracer)
    decode_shaped_calls(off, widths, cfg.num_layers, 2)
    sys.settrace(None)
    cold = len(seen)
    seen.clear()
    events[0] = 0
    sys.settrace(tracer)
    n = decode_shaped_calls(off, widths, cfg.num_layers, 5)
    sys.settrace(None)
    print(json.dumps({"lines_cold": cold, "lines_warm": len(seen), "events_per_call": events[0] / n,
                      "files": sorted({os.path.relpath(f, root) for f, _ in seen}),
                      "by_function": by_function(seen)}), flush=True)
    trial.close()
    bench.stop_servers()


def by_function(seen: set) -> dict[str, int]:
    """Distinct lines per function, named file:function (the function whose definition precedes the line)."""
    import ast
    counts: dict[str, int] = {}
    spans: dict[str, list] = {}
    for f in {f for f, _ in seen}:
        tree = ast.parse(open(f).read())
        spans[f] = sorted((n.lineno, n.end_lineno, n.name) for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    for f, line in seen:
        inner = [s for s in spans[f] if s[0] <= line <= s[1]]
        name = f"{os.path.basename(f)}:{inner[-1][2] if inner else '<module>'}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker()
        return
    checkout = os.path.abspath(sys.argv[1])
    env = {**os.environ, "PYTHONPATH": checkout}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                         cwd=checkout, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
