"""How a call's tensors reach the server: in the session's shared-memory arena (the header carries offsets)
or as raw ZeroMQ frames after the header. Either builds a call's header and turns its reply into the result,
checking the reply against what the op table says the runner asked for."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..ops import output_of
from . import protocol as P
from .shm import Arena

MAX_COMPUTE_S = 1e6          # a server's stated compute time for one call, summed into the statistics


@dataclass(slots=True)
class Call:
    header: bytes
    frames: list
    want: P.TensorMeta            # the output the runner asked for (offset: the arena region, or None)
    out: torch.Tensor | None      # that region's view (arena)
    regions: list[int]            # arena offsets to free with the call
    in_bytes: int
    reply: bytes                  # the one result header that answers it, but for its id and time (but_id)


def expected_output(cfg: ModelConfig, wire: str, op: str, layer, metas: list[P.TensorMeta]) -> P.TensorMeta:
    dtype, shape = output_of(cfg, wire, op, layer, [(m.dtype, m.shape) for m in metas])
    return P.TensorMeta(dtype, shape)


def reply_time(head: bytes, op: str, layer, call: Call) -> float:
    """The compute seconds a result header states, once it is the one result that answers `call` (of op and
    layer): byte for byte the header asked for but for its id (matched by the caller) and the time. Anything
    else is a ProtocolError naming what differs. A hostile server may lie about any of it."""
    if len(head) == len(call.reply) + P.ID_TIME.size and P.but_id(head) == call.reply:
        compute_s = P.ID_TIME.unpack_from(head, P.ID_OFFSET)[1]
        if 0 <= compute_s < MAX_COMPUTE_S:          # NaN and inf too
            return compute_s
    m = P.unpack(head)
    check_reply(m, op, layer, call.want)
    return m.compute_s          # differs only in bytes that carry nothing (padding)


def check_reply(m: P.Message, op: str, layer, want: P.TensorMeta) -> None:
    """A result must answer the op and layer asked and hold exactly the output asked for: its dtype, its shape
    and (shm) the region the runner named."""
    if m.kind != P.RESULT:
        raise P.ProtocolError(f"the reply to op {op} is a call, not a result")
    if (m.op, m.layer) != (op, layer):
        raise P.ProtocolError(f"the reply to op {op} (layer {layer}) is a result of op {m.op} (layer {m.layer})")
    if len(m.tensors) != 1:
        raise P.ProtocolError(f"the reply to op {op} holds {len(m.tensors)} tensor records; a result has 1")
    got = m.tensors[0]
    if (got.dtype, got.shape, got.offset) != (want.dtype, want.shape, want.offset):
        raise P.ProtocolError(f"the reply to op {op} is {got.dtype}{list(got.shape)} (offset {got.offset}); "
                              f"asked for {want.dtype}{list(want.shape)} (offset {want.offset})")
    if not 0 <= m.compute_s < MAX_COMPUTE_S:          # NaN and inf too
        raise P.ProtocolError(f"the reply to op {op} reports compute_s {m.compute_s}")


@dataclass
class Plan:
    """What a call of one op on given input regions always is: worked out once (a decode step repeats its
    calls on the same regions, a prefill too), then reused with a fresh id."""
    inputs: list[P.TensorMeta]
    output: P.TensorMeta          # dtype and shape; its region is allocated per call
    in_bytes: int
    headers: dict = field(default_factory=dict)    # output offset -> (call header, Call.reply, output meta)


class ArenaPath:
    def __init__(self, arena: Arena, cfg: ModelConfig, wire: torch.dtype):
        self.arena, self.cfg, self.wire = arena, cfg, P.DTYPE_NAME[wire]
        self.plans: dict[tuple, Plan] = {}     # (op, layer, each input's offset, dtype, shape) -> its plan

    def empty(self, shape, dtype=None) -> torch.Tensor:
        return self.arena.empty(tuple(shape), dtype or P.WIRE_DTYPES[self.wire])     # freed with the call it feeds

    def call(self, op: str, layer, rid: int, xs) -> Call:
        offsets, key = [], [op, layer]
        for x in xs:
            off = self.arena.offset_of(x)
            if off is None:                 # not written in place: copy it in once
                x = self.arena.empty(tuple(x.shape), x.dtype).copy_(x)
                off = self.arena.offset_of(x)
            offsets.append(off)
            key += (off, x.dtype, x.shape)
        key = tuple(key)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= 4096:
                self.plans.clear()
            inputs = [P.TensorMeta.of(x, off) for x, off in zip(xs, offsets)]
            plan = self.plans[key] = Plan(inputs, expected_output(self.cfg, self.wire, op, layer, inputs),
                                          sum(m.nbytes for m in inputs))
        out = self.arena.empty(plan.output.shape, P.WIRE_DTYPES[plan.output.dtype])
        out_offset = self.arena.offset_of(out)
        headers = plan.headers.get(out_offset)
        if headers is None:
            want = plan.output._replace(offset=out_offset)
            headers = plan.headers[out_offset] = (P.encode_call(op, layer, 0, plan.inputs, want),
                                                  P.but_id(P.encode_result(op, layer, 0, want, 0.0)), want)
        return Call(P.with_id(headers[0], rid), [], headers[2], out, [*offsets, out_offset], plan.in_bytes,
                    headers[1])

    def result(self, call: Call, frames: list) -> torch.Tensor:
        if len(frames) > 1:
            raise P.ProtocolError(f"a shared-memory result came with {len(frames) - 1} tensor frame(s)")
        return call.out

    def release(self, regions: list[int]) -> None:
        for off in regions:
            self.arena.free(off)

    def discard(self, t: torch.Tensor) -> None:
        self.arena.discard(t)

    def close(self) -> None:
        self.arena.close()


class FramePath:
    def __init__(self, cfg: ModelConfig, wire: torch.dtype):
        self.cfg, self.wire = cfg, wire

    def empty(self, shape, dtype=None) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=dtype or self.wire)

    def call(self, op: str, layer, rid: int, xs) -> Call:
        metas = [P.TensorMeta.of(x) for x in xs]
        want = expected_output(self.cfg, P.DTYPE_NAME[self.wire], op, layer, metas)
        frames = [P.tensor_bytes(x) for x in xs]
        return Call(P.encode_call(op, layer, rid, metas, want), frames, want, None, [],
                    sum(f.nbytes for f in frames), P.but_id(P.encode_result(op, layer, 0, want, 0.0)))

    def result(self, call: Call, frames: list) -> torch.Tensor:
        """The result over its frame's memory, once the frame's size matches what was asked for."""
        if len(frames) != 2:
            raise P.ProtocolError(f"a result over frames needs 1 tensor frame, got {len(frames) - 1}")
        return P.tensor_from_frame(call.want, frames[1])

    def release(self, regions: list[int]) -> None:
        pass

    def discard(self, t: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass
