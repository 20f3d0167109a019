"""`tsqp bench`'s references: the whole model on one device, the trusted math and the compute together,
nothing staged, copied or queued. The bench measures the split against these; the runtime never runs them,
so its classes (LocalOffload, TrustedModel, Compute) carry nothing for them."""
from __future__ import annotations

import time

import torch

from ..stats import Stats
from ..trusted.model import TrustedModel
from ..trusted.offload import Done
from ..untrusted.compute import Compute


class NoSplitOffload:
    """Each op computed at once on the compute's device, its inputs already there."""

    def __init__(self, compute: Compute, stats: Stats):
        self.compute, self.dtype, self.stats = compute, compute.dtype, stats

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.compute.device)

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor) -> Done:
        t0 = time.perf_counter()
        y = self.compute.forward(op, layer, *xs)     # queued on the device: the caller synchronises at the end
        seconds = time.perf_counter() - t0
        self.stats.rpc_calls += 1
        self.stats.rpc_time_s += seconds
        self.stats.server_compute_s += seconds
        return Done(y)

    def close(self) -> None:
        pass


class NoSplitModel(TrustedModel):
    """The trusted math on `device` too (the runner's own runs on the CPU)."""

    def __init__(self, device: str, *args, **kwargs):
        self.device = torch.device(device)
        super().__init__(*args, **kwargs)
