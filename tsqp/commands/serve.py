"""`tsqp serve`: load the weights onto the device, bind, announce, serve."""
from __future__ import annotations

import time

from .. import weights as W
from ..untrusted.compute import Compute
from ..wire.keys import server_curve
from ..untrusted.server import Server, describe_endpoint


def serve(args) -> None:
    t0 = time.perf_counter()
    curve = server_curve(args.endpoint, args.keys, args.server_key, args.allow, args.insecure)   # fail before loading
    dtype = W.torch_dtype(args.dtype)
    cfg, weights = W.load(args.model, dtype, "cpu" if args.device.startswith("cuda") else args.device)
    n = W.n_params(weights)
    compute = Compute(cfg, weights, args.device)
    norms = W.norm_weights(weights)
    del weights
    server = Server(compute, norms, args.endpoint, W.describe(args.model), args.max_sessions,
                    idle_timeout_s=args.idle_timeout, max_msg_bytes=int(args.max_message_mb * 2**20),
                    curve=curve, insecure=args.insecure, public=args.public, spin_s=args.spin_us * 1e-6)

    def ready():
        print(f"Endpoint: {args.endpoint} (bound)")
        print(f"Transport: {describe_endpoint(args.endpoint)}"
              + (f", CurveZMQ ({len(curve.allowed)} allowed client key(s))" if curve else ""))
        print(f"Device: {args.device}, Dtype: {args.dtype}")
        print(f"Model: {W.describe(args.model)} ({cfg.num_layers} layers, {n / 1e6:.1f} M parameters, "
              f"{n * dtype.itemsize / 2**20:.1f} MiB)")
        print(f"ready in {time.perf_counter() - t0:.1f} s", flush=True)

    server.serve_forever(on_ready=ready)
    print("server stopped", flush=True)
