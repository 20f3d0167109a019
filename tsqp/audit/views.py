"""A recorded session cut into what an attacker reasons about: sequences (one prompt and its decode steps),
each a prefill pass and one pass per decode step, with the rows each layer received.

A pass ends with its `lm_head` call (the runner asks for logits once per prefill and once per decode step;
a chunked prefill's chunks all come before that call). The first pass of a session is a prefill; a later
pass with more than one row at layer 0 starts a new sequence (a second prompt on the same session); a
one-row pass after a prefill is a decode step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .recording import RecordedCall, RecordedSession


@dataclass
class Pass:
    """One forward pass as the server saw it: its calls in order."""
    calls: list[RecordedCall]

    def rows(self, op: str, layer: int | None) -> torch.Tensor | None:
        """The first inputs of every `op` call at `layer`, concatenated in order: [T, width], or None."""
        parts = [c.input(0) for c in self.calls if c.op == op and c.layer == layer]
        return torch.cat(parts) if parts else None

    def row_blocks(self, op: str, layer: int | None) -> list[torch.Tensor]:
        """The same inputs, one block per call (a chunked prefill sends several)."""
        return [c.input(0) for c in self.calls if c.op == op and c.layer == layer]

    def calls_of(self, op: str, layer: int | None = None) -> list[RecordedCall]:
        return [c for c in self.calls if c.op == op and (layer is None or c.layer == layer)]

    @property
    def n_rows(self) -> int:
        """Positions in this pass: rows of layer 0's qkv input (or of the embedding request)."""
        calls = self.calls_of("qkv", 0) or self.calls_of("embed")
        return sum(c.input_refs[0].shape[0] for c in calls)

    def logits(self) -> torch.Tensor | None:
        """What the server returned for the LM head: [rows, V]."""
        calls = self.calls_of("lm_head")
        return calls[-1].output if calls else None


@dataclass
class Sequence:
    session: RecordedSession
    index: int                       # the sequence's number within its session
    prefill: Pass
    decode: list[Pass] = field(default_factory=list)

    @property
    def passes(self) -> list[Pass]:
        return [self.prefill, *self.decode]

    @property
    def prompt_len(self) -> int:
        return self.prefill.n_rows


def passes(session: RecordedSession) -> list[Pass]:
    out, current = [], []
    for call in session.calls:
        current.append(call)
        if call.op == "lm_head":
            out.append(Pass(current))
            current = []
    if current:                       # a pass cut short (the runner stopped before its logits)
        out.append(Pass(current))
    return out


def sequences(session: RecordedSession) -> list[Sequence]:
    found: list[Sequence] = []
    for p in passes(session):
        if p.n_rows == 0:
            continue
        if not found or p.n_rows > 1:
            found.append(Sequence(session, len(found), p))
        else:
            found[-1].decode.append(p)
    return found
