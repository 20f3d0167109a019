"""The offload interface the trusted model talks to, and its in-process implementation.

An Offload has:
  dtype                        the wire dtype (the server's weights' dtype)
  empty(shape) -> Tensor       a buffer the runner may write a request's input into (shared memory
                               when remote, so nothing is copied twice)
  submit(op, layer, *xs)       send one request; returns a Pending whose result() is the output tensor,
                               valid until its release() (the inputs' buffers go with it)
  stats                        a stats.Stats
The remote implementation lives in remote.py; in-process and remote are interchangeable.
"""
from __future__ import annotations

import time

import torch

from .compute import Compute
from .stats import Stats


class Done:
    """A request that already completed."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value

    def release(self) -> None:
        pass


class LocalOffload:
    """The compute service in the runner's own process: the baseline the transports are measured against,
    and the single-process mode of a TDX VM with GPU passthrough."""

    def __init__(self, compute: Compute, stats: Stats | None = None, buffer_device: str = "cpu"):
        """buffer_device: where the trusted side's tensors live (the compute's device for a no-split run)."""
        self.compute, self.dtype, self.buffer_device = compute, compute.dtype, buffer_device
        self.stats = stats or Stats()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.buffer_device)

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor) -> Done:
        t0 = time.perf_counter()
        y, compute_s = self.compute.run(op, layer, list(xs))
        self.stats.rpc_calls += 1
        self.stats.rpc_time_s += time.perf_counter() - t0
        self.stats.server_compute_s += compute_s
        return Done(y)

    def close(self) -> None:
        pass
