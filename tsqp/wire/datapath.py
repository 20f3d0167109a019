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


@dataclass(slots=True, frozen=True)
class Call:
    """A call as the data path made it, but for its id: over shm the same object serves every call of an op on
    the same input and output regions (a decode step repeats its calls), over frames one is made per call."""
    op: str
    layer: int | None
    header: bytes                 # its id 0 (P.with_id sets it)
    frames: tuple                 # the inputs' frames (frames); none over shm
    want: P.TensorMeta            # the output the runner asked for (offset: the arena region, or None)
    out: torch.Tensor | None      # that region's view (shm)
    regions: tuple[int, ...]      # arena offsets to free with the call
    frame_bytes: int              # input bytes in frames (beside the header)
    shm_in_bytes: int             # input bytes in the arena
    shm_out_bytes: int            # result bytes in the arena
    reply: bytes                  # the one result header that answers it, but for its id and time (but_id)


def expected_output(cfg: ModelConfig, wire: str, op: str, layer, metas: list[P.TensorMeta]) -> P.TensorMeta:
    dtype, shape = output_of(cfg, wire, op, layer, [(m.dtype, m.shape) for m in metas])
    return P.TensorMeta(dtype, shape)


def reply_time(head: bytes, call: Call) -> float:
    """The compute seconds a result header states, once it is the one result that answers `call`: byte for
    byte the header asked for but for its id (matched by the caller) and the time. Anything else is a
    ProtocolError naming what differs. A hostile server may lie about any of it."""
    if len(head) == len(call.reply) + P.ID_TIME.size and P.but_id(head) == call.reply:
        compute_s = P.ID_TIME.unpack_from(head, P.ID_OFFSET)[1]
        if 0 <= compute_s < MAX_COMPUTE_S:          # NaN and inf too
            return compute_s
    m = P.unpack(head)
    check_reply(m, call.op, call.layer, call.want)
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
    calls on the same regions, a prefill too), then made into one Call per output region."""
    inputs: tuple[P.TensorMeta, ...]
    output: P.TensorMeta          # dtype and shape; its region is allocated per call
    out_bytes: int
    calls: dict = field(default_factory=dict)      # output offset -> the Call


class ArenaPath:
    def __init__(self, arena: Arena, cfg: ModelConfig, wire: torch.dtype):
        self.arena, self.cfg, self.wire = arena, cfg, P.DTYPE_NAME[wire]
        self.plans: dict[tuple, Plan] = {}     # (op, layer, each input's record) -> its plan

    def empty(self, shape, dtype=None) -> torch.Tensor:
        return self.arena.empty(tuple(shape), dtype or P.WIRE_DTYPES[self.wire])     # freed with the call it feeds

    def call(self, op: str, layer, xs) -> Call:
        inputs = tuple([self.arena.meta_of(x) or self._copy_in(x) for x in xs])
        plan = self.plans.get((op, layer, inputs))
        if plan is None:
            plan = self._plan(op, layer, inputs)
        out_offset = self.arena.alloc(plan.out_bytes)
        call = plan.calls.get(out_offset)
        if call is None:
            call = plan.calls[out_offset] = self._call(op, layer, plan, out_offset)
        return call

    def _copy_in(self, x: torch.Tensor) -> P.TensorMeta:
        """A tensor not written in place (by empty()) is copied into the arena for its call."""
        return self.arena.meta_of(self.arena.empty(tuple(x.shape), x.dtype).copy_(x))

    def _plan(self, op: str, layer, inputs: tuple) -> Plan:
        if len(self.plans) >= 4096:
            self.plans.clear()
        output = expected_output(self.cfg, self.wire, op, layer, inputs)
        plan = self.plans[(op, layer, inputs)] = Plan(inputs, output, output.nbytes)
        return plan

    def _call(self, op: str, layer, plan: Plan, out_offset: int) -> Call:
        if len(plan.calls) >= 64:
            plan.calls.clear()
        want = plan.output._replace(offset=out_offset)
        return Call(op, layer, P.encode_call(op, layer, 0, list(plan.inputs), want), (), want,
                    self.arena.region(out_offset, want.shape, want.torch_dtype),
                    (*[m.offset for m in plan.inputs], out_offset), 0, sum(m.nbytes for m in plan.inputs),
                    want.nbytes, P.but_id(P.encode_result(op, layer, 0, want, 0.0)))

    def result(self, call: Call, frames: list) -> torch.Tensor:
        if len(frames) > 1:
            raise P.ProtocolError(f"a shared-memory result came with {len(frames) - 1} tensor frame(s)")
        return call.out

    def release(self, regions) -> None:
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

    def call(self, op: str, layer, xs) -> Call:
        metas = [P.TensorMeta.of(x) for x in xs]
        want = expected_output(self.cfg, P.DTYPE_NAME[self.wire], op, layer, metas)
        frames = tuple(P.tensor_bytes(x) for x in xs)
        return Call(op, layer, P.encode_call(op, layer, 0, metas, want), frames, want, None, (),
                    sum(f.nbytes for f in frames), 0, 0, P.but_id(P.encode_result(op, layer, 0, want, 0.0)))

    def result(self, call: Call, frames: list) -> torch.Tensor:
        """The result over its frame's memory, once the frame's size matches what was asked for."""
        if len(frames) != 2:
            raise P.ProtocolError(f"a result over frames needs 1 tensor frame, got {len(frames) - 1}")
        return P.tensor_from_frame(call.want, frames[1])

    def release(self, regions) -> None:
        pass

    def discard(self, t: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass
