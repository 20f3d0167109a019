"""`tsqp serve`: load the weights onto the device, bind, announce, serve."""
from __future__ import annotations

import time

from .. import weights as W
import torch

from ..untrusted.compute import Compute
from ..untrusted.faults import FaultInjector
from ..untrusted.intmm import IntCompute
from ..untrusted.record import Recorder
from ..wire.keys import server_curve
from ..untrusted.server import Server, describe_endpoint


def check_limits(args) -> None:
    """The bounds must be positive: one line naming the flag otherwise."""
    for flag in ("max_sessions", "max_sessions_per_user", "max_request_mb", "max_message_mb", "max_queued_mb",
                 "max_arena_mb"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")


def serve(args) -> None:
    t0 = time.perf_counter()
    check_limits(args)
    curve = server_curve(args.endpoint, args.keys, args.server_key, args.allow, args.insecure)   # fail before loading
    # protected: 12-bit weights quantized from float32, as every runner quantizes its own copy (quant.py)
    dtype = torch.float32 if args.protect else W.torch_dtype(args.dtype)
    cfg, weights = W.load(args.model, dtype, "cpu" if args.device.startswith("cuda") else args.device)
    n = W.n_params(weights)
    if args.protect:
        faults = FaultInjector(args.inject_faults) if args.inject_faults else None
        compute = IntCompute(cfg, weights, args.device, faults)
    else:
        compute = Compute(cfg, weights, args.device)
    norms = W.norm_weights(weights)
    del weights
    max_message_mb = args.max_message_mb if args.max_message_mb is not None else args.max_request_mb + 1
    recorder = Recorder(args.record) if args.record else None
    server = Server(compute, norms, args.endpoint, W.describe(args.model), args.max_sessions, recorder=recorder,
                    idle_timeout_s=args.idle_timeout, max_msg_bytes=int(max_message_mb * 2**20),
                    curve=curve, insecure=args.insecure, public=args.public, spin_s=args.spin_us * 1e-6,
                    max_sessions_per_user=args.max_sessions_per_user,
                    max_request_bytes=int(args.max_request_mb * 2**20),
                    max_queued_bytes=int(args.max_queued_mb * 2**20), max_arena_bytes=int(args.max_arena_mb * 2**20))

    def ready():
        print(f"Endpoint: {args.endpoint} (bound)")
        print(f"Transport: {describe_endpoint(args.endpoint)}"
              + (f", CurveZMQ ({len(curve.allowed)} allowed client key(s))" if curve else ""))
        print(f"Device: {args.device}, Dtype: {'12-bit weights (two int8 planes), masked uint8 limbs in' if args.protect else args.dtype}")
        if args.protect:
            print(f"Protected: answers masked x @ W only; weights fingerprint {compute.fingerprint[:16]}...")
        if recorder is not None:
            print(f"RECORDING: everything received and returned is written to {args.record} (for tsqp audit)")
        if args.inject_faults:
            print(f"WARNING: --inject-faults {args.inject_faults}: this server ALTERS results on purpose "
                  f"(for measuring detection only)")
        print(f"Model: {W.describe(args.model)} ({cfg.num_layers} layers, {n / 1e6:.1f} M parameters, "
              f"{n * dtype.itemsize / 2**20:.1f} MiB)")
        print(f"ready in {time.perf_counter() - t0:.1f} s", flush=True)

    server.serve_forever(on_ready=ready)
    print("server stopped", flush=True)
