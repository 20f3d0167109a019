"""The offload interface the trusted model talks to. Implementations: `tsqp.local.LocalOffload` (in-process),
`tsqp.wire.client.RemoteOffload` (a server over the wire); wrappers (masking, verification) take one of these
and are one themselves. The model math knows only this interface.

  dtype                        the wire dtype (the server's weights' dtype)
  empty(shape, dtype=None)     a buffer the runner may write a request's input into (shared memory when
                               remote, so nothing is copied twice)
  submit(op, layer, *xs)       send one request (ops: tsqp.ops); returns a Pending whose result() is the
                               output tensor, valid until its release() (the inputs' buffers go with it)
  discard(t)                   (optional) give back an empty() buffer that will feed no request
  stats                        a stats.Stats
  close()
"""
from __future__ import annotations

from typing import Protocol

import torch


class Pending(Protocol):
    def result(self) -> torch.Tensor: ...

    def release(self) -> None: ...


class Offload(Protocol):
    dtype: torch.dtype

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor) -> Pending: ...

    def close(self) -> None: ...


class Done:
    """A request that already completed."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def result(self) -> torch.Tensor:
        return self.value

    def release(self) -> None:
        pass
