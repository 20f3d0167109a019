"""How a call's tensors reach the server: in the session's shared-memory arena (the header carries offsets)
or as raw ZeroMQ frames after the header. Either builds a call's header and turns its reply into the result,
checking the reply against what the op table says the runner asked for."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..ops import output_of
from . import protocol as P
from .shm import Arena

MAX_COMPUTE_S = 1e6          # a server's stated compute time for one call, summed into the statistics


@dataclass
class Call:
    header: bytes
    frames: list
    want: P.TensorMeta            # the output the runner asked for (offset: the arena region, or None)
    out: torch.Tensor | None      # that region's view (arena)
    regions: list[int]            # arena offsets to free with the call
    in_bytes: int


def expected_output(cfg: ModelConfig, wire: str, op: str, layer, metas: list[P.TensorMeta]) -> P.TensorMeta:
    dtype, shape = output_of(cfg, wire, op, layer, [(m.dtype, m.shape) for m in metas])
    return P.TensorMeta(dtype, shape)


def check_reply(m: P.Message, op: str, layer, want: P.TensorMeta) -> None:
    """A result must answer the op and layer asked and hold exactly the output asked for: its dtype, its shape
    and (shm) the region the runner named. A hostile server may lie about any of it."""
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


class ArenaPath:
    def __init__(self, arena: Arena, cfg: ModelConfig, wire: torch.dtype):
        self.arena, self.cfg, self.wire = arena, cfg, P.DTYPE_NAME[wire]
        self.outputs: dict[tuple, P.TensorMeta] = {}     # (op, layer, input dtypes and shapes) -> the output

    def empty(self, shape, dtype=None) -> torch.Tensor:
        return self.arena.empty(tuple(shape), dtype or P.WIRE_DTYPES[self.wire])     # freed with the call it feeds

    def call(self, op: str, layer, rid: int, xs) -> Call:
        inputs = []
        for x in xs:
            off = self.arena.offset_of(x)
            if off is None:                 # not written in place: copy it in once
                x = self.arena.empty(tuple(x.shape), x.dtype).copy_(x)
                off = self.arena.offset_of(x)
            inputs.append(P.TensorMeta.of(x, off))
        key = (op, layer, *((m.dtype, m.shape) for m in inputs))
        want = self.outputs.get(key)
        if want is None:                    # a decode step asks the op table once per op and layer, not per token
            if len(self.outputs) >= 4096:
                self.outputs.clear()
            want = self.outputs[key] = expected_output(self.cfg, self.wire, op, layer, inputs)
        out = self.arena.empty(want.shape, want.torch_dtype)
        want = want._replace(offset=self.arena.offset_of(out))
        return Call(P.encode_call(op, layer, rid, inputs, want), [], want, out,
                    [*(m.offset for m in inputs), want.offset], sum(m.nbytes for m in inputs))

    def result(self, call: Call, frames: list) -> torch.Tensor:
        if len(frames) > 1:
            raise P.ProtocolError(f"a shared-memory result came with {len(frames) - 1} tensor frame(s)")
        return call.out

    def release(self, regions: list[int]) -> None:
        for off in regions:
            self.arena.free(off)

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
                    sum(f.nbytes for f in frames))

    def result(self, call: Call, frames: list) -> torch.Tensor:
        """The result over its frame's memory, once the frame's size matches what was asked for."""
        if len(frames) != 2:
            raise P.ProtocolError(f"a result over frames needs 1 tensor frame, got {len(frames) - 1}")
        return P.tensor_from_frame(call.want, frames[1])

    def release(self, regions: list[int]) -> None:
        pass

    def close(self) -> None:
        pass
