"""Deliberate wrong answers from the server, to measure that the runner's checks catch them.

`FaultInjector(kind)` alters an int64 result [T, out] of a linear op:
  flip    one random bit (of the ring's 40) of one random element
  replay  an earlier result of the same op and shape (the first one of each is passed through)
  swap    two different rows exchanged (two different elements when T == 1)
  zero    every element 0
kind None (the default) leaves results alone. `altered` counts the results actually changed: a replay of
an identical result or a swap of equal rows would change nothing and is not counted.
"""
from __future__ import annotations

import secrets

import torch

KINDS = ("flip", "replay", "swap", "zero")
RING_BITS = 40


class FaultInjector:
    def __init__(self, kind: str | None = None):
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown fault '{kind}'; choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.seen = 0
        self.altered = 0
        self._history: dict[tuple, torch.Tensor] = {}

    def apply(self, op: str, layer: int | None, z: torch.Tensor) -> torch.Tensor:
        """The (possibly altered) result; z itself is not modified."""
        if self.kind is None:
            return z
        self.seen += 1
        bad = getattr(self, "_" + self.kind)(op, layer, z)
        if not torch.equal(bad, z):
            self.altered += 1
        return bad

    def _flip(self, op, layer, z):
        bad = z.clone()
        flat = bad.view(-1)
        flat[secrets.randbelow(flat.numel())] ^= 1 << secrets.randbelow(RING_BITS)
        return bad

    def _replay(self, op, layer, z):
        key = (op, layer, tuple(z.shape))
        earlier = self._history.get(key)
        self._history[key] = z.clone()
        return z if earlier is None else earlier.clone()

    def _swap(self, op, layer, z):
        bad = z.clone()
        rows = bad if bad.shape[0] > 1 else bad.view(-1, 1)              # [T, out] or [out, 1]
        n = rows.shape[0]
        if n < 2:
            return bad
        i = secrets.randbelow(n)
        j = (i + 1 + secrets.randbelow(n - 1)) % n                      # j != i
        rows[[i, j]] = rows[[j, i]]
        return bad

    def _zero(self, op, layer, z):
        return torch.zeros_like(z)
