"""Measure --verify: injected faults detected, and false alarms over clean checked calls.

Each call is one masked linear op (qkv, o, gate_up, down or lm_head, a random layer, 1-4 rows of random
activations) through ProtectedOffload over the server's real integer compute (IntCompute) in this process,
with the server's FaultInjector switched on for the faulty calls. A detection latches the session as over
(as in a real run); this harness counts it and clears the latch, so one session measures many faults.
With --deferred-checks every call is one row (a decode step's), its result is handed out unchecked, and its
check runs at the next settle (deferred.py), as the LM head's call makes it.

    python3 scripts/protect_faults.py [--faults 10000] [--clean 100000] [--model random:tiny] [--json PATH]
                                      [--deferred-checks]
"""
from __future__ import annotations

import argparse
import json
import secrets
import time

import torch

from tsqp import weights as W
from tsqp.local import LocalOffload
from tsqp.ops import MATMUL_OPS, matmul_widths
from tsqp.trusted.protect.freivalds import VerificationError
from tsqp.trusted.protect.masked import ProtectedOffload
from tsqp.untrusted.faults import KINDS, FaultInjector
from tsqp.untrusted.intmm import IntCompute


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faults", type=int, default=10_000)
    ap.add_argument("--clean", type=int, default=100_000)
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--json", default=None)
    ap.add_argument("--deferred-checks", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg, weights = W.load(a.model, torch.float32, "cpu")
    injector = FaultInjector(None)
    offload = ProtectedOffload(LocalOffload(IntCompute(cfg, weights, "cpu", injector)), cfg, weights,
                               verify=True, pool_tokens=256, deferred_checks=a.deferred_checks)
    gen = torch.Generator().manual_seed(secrets.randbits(32))     # activations only; pads come from the CSPRNG

    def one_call() -> bool:
        """One random masked call; True if the runner's checks refused its result."""
        op = MATMUL_OPS[secrets.randbelow(len(MATMUL_OPS))]
        layer = None if op == "lm_head" else secrets.randbelow(cfg.num_layers)
        width_in, _ = matmul_widths(cfg, op)
        rows = 1 if a.deferred_checks else 1 + secrets.randbelow(4)
        x = torch.randn(rows, width_in, generator=gen)                               # [T, in]
        pending = offload.submit(op, layer, x)
        try:
            y = pending.result()
            offload.settle()                  # a deferred check runs here (none is queued otherwise)
        except VerificationError:
            offload.failure = None            # counted; the harness goes on with the same session
            return True
        finally:
            pending.release()
        assert torch.isfinite(y).all()
        return False

    per_kind = {k: {"injected": 0, "detected": 0} for k in KINDS}
    t0 = time.perf_counter()
    for i in range(a.faults):
        kind = KINDS[i % len(KINDS)]
        injector.kind = kind
        before = injector.altered
        refused = one_call()
        if injector.altered > before:          # a fault actually changed the result
            per_kind[kind]["injected"] += 1
            per_kind[kind]["detected"] += refused
    fault_s = time.perf_counter() - t0
    injector.kind = None
    t0 = time.perf_counter()
    false_alarms = sum(one_call() for _ in range(a.clean))
    clean_s = time.perf_counter() - t0
    injected = sum(v["injected"] for v in per_kind.values())
    detected = sum(v["detected"] for v in per_kind.values())
    result = {"model": a.model, "deferred_checks": a.deferred_checks, "faults_injected": injected, "faults_detected": detected, "per_kind": per_kind,
              "clean_calls": a.clean, "false_alarms": false_alarms, "fault_s": fault_s, "clean_s": clean_s,
              "checked_rows": offload.report()["checked_rows"], "pool": offload.pool.stats()}
    offload.close()
    kinds = ", ".join(f"{k} {v['detected']}/{v['injected']}" for k, v in per_kind.items())
    print(f"{'deferred' if a.deferred_checks else 'strict'} checks: faults: {detected}/{injected} detected ({kinds}); "
          f"false alarms: {false_alarms}/{a.clean} clean checked calls; {fault_s + clean_s:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
