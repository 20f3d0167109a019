"""Deferred checks: a decode step's Freivalds checks run while the runner waits for the server's next reply.

Strictly, a result is checked before it is used, so the runner's cores check while the server idles and
the server computes while the runner's cores idle. With deferred checks a one-row result is unmasked and
handed to the model at once; its check (both sides, X . ws and Y . s, from private copies of the quantized
input and of Y + 2^39) is queued, and runs when the runner next waits: after sending the following request,
before blocking on its reply, so it overlaps the server's work. The compiled one-row passes sum both sides
in the row's own loops (from the same private copy of the reply the value is made from), so for them only
the comparison is queued (`add_sides`): copying to check later cost more than the check. The LM head's result runs every queued
check before it is returned, so the logits, and any token sampled from them, never rest on a result that
failed or was not checked.
What an unchecked result can do meanwhile is feed the same token's later requests, which are masked with
fresh pads like any other: the server's view stays independent of the text and of the secrets. A failed
check ends the session where it runs, naming its op and layer, so the Freivalds secrets stay sound
(freivalds.py). It all runs on the runner's thread: with a second Python thread doing the checks, the
runner's share of a decode token went from 14.6 to 24-30 ms on a 2-core VM (every one of its ~40 torch calls
per request waited for the GIL).
"""
from __future__ import annotations

import time
from collections import deque

import torch

from .freivalds import Freivalds, failing_rows

Key = tuple[str, int | None]


class DeferredChecks:
    """Checks handed over and not yet run, oldest first, and the buffers their copies are kept in."""

    def __init__(self):
        # (key, check, quantized, offsets), or (key, None, input side, output side) for add_sides
        self._queue: deque[tuple[Key, Freivalds | None, torch.Tensor | int, torch.Tensor | int]] = deque()
        self._free: dict[tuple, list[torch.Tensor]] = {}     # (shape, dtype) -> buffers a check is done with
        self.seconds = 0.0
        self.rows = 0

    def buffer(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """A buffer to keep a copy in until its check has run (a decode step asks for the same few shapes
        every token; a fresh one each time cost ~10% of the runner's share)."""
        free = self._free.get((shape, dtype))
        return free.pop() if free else torch.empty(shape, dtype=dtype)

    def add(self, key: Key, check: Freivalds, quantized: torch.Tensor, offsets: torch.Tensor) -> None:
        """Check a result later: quantized float32 [T, in] (the input's integers), offsets int64 [T, out]
        (Y + 2^39, consumed). Both are the caller's private copies, not to be written again."""
        self._queue.append((key, check, quantized, offsets))

    def add_sides(self, key: Key, input_side: int, output_side: int) -> None:
        """Compare later one row's check sides, X . ws and Y . s mod p, computed when its result was finished
        (the compiled row passes: computing them in the same loop costs less than keeping copies)."""
        self._queue.append((key, None, input_side, output_side))

    def __len__(self) -> int:
        return len(self._queue)

    def run(self) -> None:
        """Run every queued check, oldest first; a failed one raises VerificationError (the checks after it
        are dropped: the session is over)."""
        t0 = time.perf_counter()
        try:
            while self._queue:
                key, check, quantized, offsets = self._queue.popleft()
                if check is None:                 # one row's sides (add_sides)
                    failing_rows(quantized == offsets, *key)
                    self.rows += 1
                    continue
                failing_rows(check.copies_pass(quantized, offsets), *key)
                self.rows += quantized.shape[0]
                for done in (quantized, offsets):
                    self._free.setdefault((tuple(done.shape), done.dtype), []).append(done)
        except BaseException:
            self._queue.clear()
            raise
        finally:
            self.seconds += time.perf_counter() - t0
