"""A recorded session cut into what an attacker reasons about: sequences (one prompt and its decode steps),
each a prefill pass and one pass per decode step, with the rows each layer received.

A pass ends with its `lm_head` call (the runner asks for logits once per prefill and once per decode step;
a chunked prefill's chunks all come before that call). The first pass of a session is a prefill; a later
pass with more than one row at layer 0 starts a new sequence (a second prompt on the same session); a
one-row pass after a prefill is a decode step.

Under `--protect otp` an input arrives as ring limbs, uint8 [5, T, in] (tsqp/ring.py: B = X + R mod 2^40 as
byte limbs). The attacker reads them as it reads any input: reassembled into ring integers and lifted to
their signed representatives (what B would be if the pad were zero), then as float rows [T, in] for the
same attacks. Integer results (int64 ring values) are lifted the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ring
from .recording import RecordedCall, RecordedSession, TensorRef


def is_limbs(ref: TensorRef) -> bool:
    """A ring element's byte limbs: uint8 [5, T, in]."""
    return ref.dtype == "uint8" and len(ref.shape) == 3 and ref.shape[0] == ring.LIMBS


def rows_of(ref: TensorRef) -> int:
    """Positions in a recorded input: T of limbs [5, T, in], else the first dimension."""
    return ref.shape[1] if is_limbs(ref) else (ref.shape[0] if ref.shape else 0)


def as_rows(call: RecordedCall, i: int = 0) -> torch.Tensor:
    """Input i as the attacker reads it: limbs -> the signed lift of their ring integers, float32 [T, in]
    (magnitudes up to 2^39: float32's range holds them and their squares); anything else as recorded."""
    ref = call.input_refs[i]
    if is_limbs(ref):
        return ring.lift(ring.from_limbs(ref.load())).float()
    return ref.load()


def as_signed(t: torch.Tensor) -> torch.Tensor:
    """A returned tensor as the attacker reads it: int64 ring values -> their signed lift (float32)."""
    return ring.lift(t.clone()).float() if t.dtype == torch.int64 else t


@dataclass
class Pass:
    """One forward pass as the server saw it: its calls in order."""
    calls: list[RecordedCall]

    def rows(self, op: str, layer: int | None) -> torch.Tensor | None:
        """The first inputs of every `op` call at `layer`, concatenated in order: [T, width], or None."""
        parts = [as_rows(c) for c in self.calls if c.op == op and c.layer == layer]
        return torch.cat(parts) if parts else None

    def row_blocks(self, op: str, layer: int | None) -> list[torch.Tensor]:
        """The same inputs, one block per call (a chunked prefill sends several)."""
        return [as_rows(c) for c in self.calls if c.op == op and c.layer == layer]

    def calls_of(self, op: str, layer: int | None = None) -> list[RecordedCall]:
        return [c for c in self.calls if c.op == op and (layer is None or c.layer == layer)]

    @property
    def n_rows(self) -> int:
        """Positions in this pass: rows of layer 0's qkv input (or of the embedding request)."""
        calls = self.calls_of("qkv", 0) or self.calls_of("embed")
        return sum(rows_of(c.input_refs[0]) for c in calls)

    def ring_rows(self, op: str, layer: int | None) -> bool:
        """Whether `op`'s inputs at `layer` came as ring limbs (integers of an unknown scale)."""
        return any(is_limbs(c.input_refs[0]) for c in self.calls_of(op, layer) if c.input_refs)

    def logits(self) -> torch.Tensor | None:
        """What the server returned for the LM head: [rows, V] (ring values lifted to signed)."""
        calls = self.calls_of("lm_head")
        return as_signed(calls[-1].output) if calls and calls[-1].output_ref is not None else None


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
