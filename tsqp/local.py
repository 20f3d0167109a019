"""The compute in the runner's own process: the baseline every transport is measured against, and the
single-process mode of a TDX VM with GPU passthrough. It joins the two trust domains in one process, so it
lives beside them, not in either."""
from __future__ import annotations

import time

import torch

from .ops import output_of
from .untrusted.compute import Compute
from .wire.protocol import DTYPE_NAME, WIRE_DTYPES
from .wire.shm import Arena
from .stats import Stats
from .trusted.offload import Done


class Launched:
    """A request queued on the device; result() waits for it."""

    def __init__(self, offload: "LocalOffload", value: torch.Tensor, finish, t0: float, regions: list[int]):
        self.offload, self.value, self.finish, self.t0, self.regions = offload, value, finish, t0, regions
        self.done = False

    def result(self) -> torch.Tensor:
        if not self.done:
            stats = self.offload.stats
            t = time.perf_counter()
            stats.server_compute_s += self.finish()
            stats.wait_s += time.perf_counter() - t
            stats.rpc_time_s += time.perf_counter() - self.t0
            self.done = True
        return self.value

    def release(self) -> None:
        for off in self.regions:
            self.offload.arena.free(off)
        self.regions = []


class LocalOffload:
    """The compute service in the runner's own process: the baseline the transports are measured against,
    and the single-process mode of a TDX VM with GPU passthrough. The trusted side's tensors stay on the
    CPU; with a CUDA compute, buffers come from a pinned staging arena and requests are queued
    asynchronously, as the shared-memory transport does across processes."""

    STAGING_BYTES = 256 * 2**20

    def __init__(self, compute: Compute, stats: Stats | None = None):
        self.compute, self.dtype = compute, compute.dtype
        self.stats = stats or Stats()
        self.arena = None
        if compute.cuda and hasattr(compute, "launch"):     # IntCompute has none: its run() copies back itself
            self.arena = Arena.anonymous(self.STAGING_BYTES)
            self.arena.register_cuda()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.arena is not None:
            return self.arena.empty(shape, dtype or self.dtype)    # freed with the request it feeds
        return torch.empty(shape, dtype=dtype or self.dtype)

    def discard(self, t: torch.Tensor) -> None:
        """An empty() buffer that will feed no request."""
        if self.arena is not None:
            self.arena.discard(t)

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor):
        t0 = time.perf_counter()
        self.stats.rpc_calls += 1
        if self.arena is None:
            y, compute_s = self.compute.run(op, layer, list(xs))
            self.stats.rpc_time_s += time.perf_counter() - t0
            self.stats.server_compute_s += compute_s
            return Done(y)
        regions = [off for off in map(self.arena.offset_of, xs) if off is not None]
        dtype, shape = output_of(self.compute.cfg, DTYPE_NAME[self.dtype], op, layer,
                                 [(DTYPE_NAME[x.dtype], tuple(x.shape)) for x in xs])
        out = self.arena.empty(shape, WIRE_DTYPES[dtype])
        regions.append(self.arena.offset_of(out))
        y, finish = self.compute.launch(op, layer, list(xs), out)
        return Launched(self, y, finish, t0, regions)

    def close(self) -> None:
        if self.arena is not None:
            self.arena.close()
            self.arena = None
