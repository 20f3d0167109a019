"""Decode latency of several `tsqp run` flag sets against real `tsqp serve` processes, in alternating rounds.

One plain server and one `--protect otp` server run side by side (a flag set with --protect talks to the
protected one); each round runs every flag set once, in order: a prompt of fixed ids, then new tokens,
the decode p50 per token read from `tsqp run --json`. Prints per flag set the median over rounds of the p50,
its min-max, and the median ratio to the first flag set, paired by round.

    python3 scripts/decode_ab.py [--model random:small] [--rounds 5] [--prompt 64] [--new 32] \
        "--protect otp --verify" "--protect otp --verify --deferred-checks"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile

from tsqp.commands.launch import private_ipc_endpoint, start_server, stop_servers, wait_ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("flag_sets", nargs="+", help="one quoted string of `tsqp run` flags per configuration")
    ap.add_argument("--model", default="random:small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    ap.add_argument("--new", type=int, default=32, help="new tokens per run")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tsqp-decode-ab-")          # the runs' JSON
    servers = {kind: start_server(private_ipc_endpoint(kind), a.model, extra=extra)
               for kind, extra in (("plain", ()), ("otp", ("--protect", "otp")))}
    try:
        wait_ready(list(servers.values()), 120)
        ids = ",".join(str(5 + i % 200) for i in range(a.prompt))
        p50 = {flags: [] for flags in a.flag_sets}
        for r in range(a.rounds):
            for flags in a.flag_sets:
                argv = shlex.split(flags)
                server = servers["otp" if "--protect" in argv else "plain"]
                out = os.path.join(work, "run.json")
                run = subprocess.run([sys.executable, "-m", "tsqp.cli", "run", "--endpoint", server.endpoint,
                                      "--model", a.model, "--prompt-ids", ids, "--max-new-tokens", str(a.new),
                                      "--ignore-eos", "--json", out, *argv], capture_output=True, text=True,
                                     timeout=600)
                if run.returncode:
                    raise SystemExit(f"`tsqp run {flags}` failed:\n{run.stderr}")
                with open(out) as f:
                    p50[flags].append(json.load(f)["stats"]["decode_ms_p50"])
            print(f"round {r + 1}: " + ", ".join(f"{v[-1]:.1f}" for v in p50.values()), flush=True)
    finally:
        stop_servers(list(servers.values()))
        for path in [work] + [os.path.dirname(s.endpoint.removeprefix("ipc://")) for s in servers.values()]:
            shutil.rmtree(path, ignore_errors=True)
    base = p50[a.flag_sets[0]]
    print(f"\n{a.model}, {a.prompt}-token prompt, {a.new} new tokens, {a.rounds} alternating rounds, "
          f"decode p50 per token:")
    print("| `tsqp run` flags | median p50 | min-max | x first (paired) |\n|---|---|---|---|")
    for flags, v in p50.items():
        ratio = statistics.median(x / b for x, b in zip(v, base))
        label = f"`{flags}`" if flags.strip() else "(none: the plain server)"
        print(f"| {label} | {statistics.median(v):.1f} ms | {min(v):.1f}-{max(v):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
