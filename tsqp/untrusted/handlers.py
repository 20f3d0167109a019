"""What the server answers: control messages (JSON: hello, attach, bye, info, echo) and calls (binary headers).

Frames in, frames out; a bad message gets an error reply naming the problem and never raises, so one runner's
garbage cannot stop the others' service. Before anything else: over ipc, a runner of another uid than the
server's is refused (the kernel's SO_PEERCRED, never a claim in the message); a header's length is checked
before it is copied; a call whose output and temporaries would exceed --max-request-mb is refused before
anything is allocated for it.
"""
from __future__ import annotations

import os

import torch

from ..ops import OpError, output_of
from ..wire import protocol as P
from ..wire.shm import ArenaError
from ..wire.transport import transport_of
from .compute import Compute
from .peers import THIS_PROCESS, Peer
from .sessions import Session, Sessions

BAD_INPUT = (P.ProtocolError, OpError, ArenaError, ValueError, TypeError, KeyError, IndexError, RuntimeError)
MAX_HEADER = P.HEAD.size + P.MAX_TENSORS * P.TENSOR.size
MAX_REQUEST_BYTES = 1024 * 2**20     # --max-request-mb: output and temporaries of one call


class Handlers:
    def __init__(self, compute: Compute, norms: dict[str, torch.Tensor], sessions: Sessions, endpoint: str,
                 model: str, recorder=None, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.compute, self.norms, self.sessions, self.endpoint, self.model = compute, norms, sessions, endpoint, model
        self.cfg, self.wire = compute.cfg, P.DTYPE_NAME[compute.dtype]
        self.recorder = recorder          # record.Recorder under `tsqp serve --record DIR`, else None
        self.max_request_bytes = max_request_bytes
        self.local = transport_of(endpoint) == "ipc"
        self.requests = 0

    def handle(self, peer: bytes, frames: list, who: Peer = THIS_PROCESS) -> list:
        """Any message from `peer`, sent by `who` (the kernel's account of the connection); returns the reply's
        frames."""
        if not frames:
            return [P.error("empty message")]
        if self.local and who.uid != os.getuid():
            whose = "the kernel gave no credentials for this connection" if who.uid is None else \
                f"the runner on this connection runs as uid {who.uid} (pid {who.pid}, from SO_PEERCRED)"
            return [P.error(f"refused: {whose}; this server (uid {os.getuid()}) serves its own user only")]
        if len(frames[0]) > max(MAX_HEADER, P.MAX_CONTROL_BYTES):     # before anything copies it
            return [P.error(f"a header frame of {len(frames[0])} bytes; headers are at most "
                            f"{max(MAX_HEADER, P.MAX_CONTROL_BYTES)}")]
        if P.is_binary(frames[0]):
            return self.call(peer, bytes(frames[0]), frames[1:])
        header = {}
        try:
            header = P.decode(frames[0])
            kind = header["type"]
            if kind == "hello":
                return self.hello(peer, header, who)
            if kind == "attach":
                arena = self.sessions.attach(peer, header.get("arena"), bool(header.get("pipes")),
                                             self.compute.cuda)
                return [P.encode({"type": "attached", "size": arena.size})]
            if kind == "bye":
                self.sessions.drop(peer)
                return [P.encode({"type": "bye"})]
            if kind == "info":
                return [P.encode({"type": "info", **self.info()})]
            if kind == "echo":
                return self.echo(peer, header, frames[1:])
            raise P.ProtocolError(f"unknown message type {kind!r}")
        except BAD_INPUT as e:
            rid = header.get("id") if isinstance(header, dict) else None
            return [P.error(f"message {header.get('type', '?')!r}: {type(e).__name__}: {e}",
                            rid if isinstance(rid, int) and not isinstance(rid, bool) else None)]

    def info(self) -> dict:
        return {"model": self.model, "dtype": self.wire, "device": str(self.compute.device),
                "config": self.cfg.to_dict(), "sessions": len(self.sessions.by_peer), "requests": self.requests,
                "pid": os.getpid(), "recording": self.recorder is not None,
                "fingerprint": getattr(self.compute, "fingerprint", None)}

    def hello(self, peer: bytes, header: dict, who: Peer) -> list:
        """Open a session; the runner gets the config and the norm weights. A `pid` in the hello is ignored:
        the session lives as long as the connection `who` came on."""
        session = self.sessions.open(peer, who)
        if self.recorder is not None:
            session.record = self.recorder.session(peer.hex())
        names = sorted(self.norms)
        metas = [P.meta_to_json(P.TensorMeta.of(self.norms[n])) for n in names]
        head = {"type": "welcome", **self.info(), "norms": names, "tensors": metas}
        return [P.encode(head)] + [P.tensor_bytes(self.norms[n]) for n in names]

    # ---- calls ------------------------------------------------------------------------------------------
    def call(self, peer: bytes, head: bytes, frames: list = ()) -> list:
        """A call: its header and (frames transport) its inputs' frames; the reply's frames."""
        session = self.sessions.by_peer.get(peer)
        # the same bytes but the id as a call checked before (a decode step repeats its calls): no parse
        checked = session.checked.get(P.but_id(head)) if session is not None and session.arena is not None else None
        try:
            op, layer, inputs, out, reply = checked or self.check_new(peer, head, frames)
            y, compute_s = self.compute.run(op, layer, inputs, out)
        except BAD_INPUT as e:
            op = P.op_of(head)
            return [P.error(f"op {op or '?'}: {type(e).__name__}: {e}", P.peek_id(head), op)]
        self.requests += 1
        if session.record is not None:
            session.record.call(op, layer, P.peek_id(head), inputs, y, {"compute_s": compute_s})
        reply = P.answering(head, reply, compute_s)
        return [reply] if session.arena is not None else [reply, P.tensor_bytes(y)]

    def check_new(self, peer: bytes, head: bytes, frames: list) -> tuple:
        """A call header not checked before: parsed, checked (check()) and, over shm, remembered for its repeats."""
        if not P.is_binary(head):           # JSON on a control pipe, of any length: named as such
            raise P.ProtocolError("not a call header: the control pipes carry calls only")
        if len(head) > MAX_HEADER:
            raise P.ProtocolError(f"a call header of {len(head)} bytes; at most {MAX_HEADER}")
        m = P.unpack(head)
        if m.kind != P.CALL:
            raise P.ProtocolError("a result sent to the server")
        session = self.sessions.need(peer)
        checked = self.check(session, m, frames)
        if session.arena is not None and m.op != "embed":     # token ids are checked on every call
            session.remember(P.but_id(head), checked)
        return checked

    def check(self, session: Session, m: P.Message, frames: list) -> tuple:
        """A call's inputs and output against the op table and the session's arena: (op, layer, inputs, out,
        the result's header but for its id and compute time)."""
        metas, want = list(m.tensors[:-1]), m.tensors[-1]
        dtype, shape = output_of(self.cfg, self.wire, m.op, m.layer, [(t.dtype, t.shape) for t in metas])
        need = footprint(self.cfg, self.wire, m.op, metas, P.TensorMeta(dtype, shape))
        if need > self.max_request_bytes:
            raise P.ProtocolError(f"needs about {need / 2**20:.0f} MiB for its output {dtype}{list(shape)} and "
                                  f"temporaries, above this server's limit of "
                                  f"{self.max_request_bytes / 2**20:.0f} MiB per request (--max-request-mb)")
        arena = session.arena
        if arena is not None:
            if frames:
                raise P.ProtocolError("shared-memory session sent tensor frames")
            inputs = [arena.view(t) for t in metas]
            out = arena.view(P.TensorMeta(dtype, shape, want.offset))
            if overlaps(out, inputs):
                raise P.ProtocolError("output region overlaps an input region")
        else:
            if len(frames) != len(metas) or want.offset is not None:
                raise P.ProtocolError(f"{len(metas)} tensor metas but {len(frames)} frames")
            inputs = [P.tensor_from_frame(t, f) for t, f in zip(metas, frames)]
            out = None
        if m.op == "embed":
            inputs = [inputs[0].clone()]      # copied out of the runner's memory before it is checked and used
            if inputs[0].numel():
                lo, hi = int(inputs[0].min()), int(inputs[0].max())
                if lo < 0 or hi >= self.cfg.vocab_size:
                    raise P.ProtocolError(f"token id {lo if lo < 0 else hi} outside the vocabulary "
                                          f"0..{self.cfg.vocab_size - 1}")
        if (want.dtype, want.shape) != (dtype, shape):
            raise P.ProtocolError(f"asks for a {want.dtype}{list(want.shape)} output; the op gives "
                                  f"{dtype}{list(shape)}")
        return m.op, m.layer, inputs, out, P.encode_result(m.op, m.layer, 0, want, 0.0)

    def echo(self, peer: bytes, header: dict, frames: list) -> list:
        """For `tsqp diagnose`: frames come back as they are; in a shm session, `nbytes` are copied from
        offset `src` to `dst` in the arena (the server consumes and produces that much; nbytes a multiple of 4)."""
        if not header.get("shm"):
            return [P.encode({"type": "echo"})] + list(frames)
        session = self.sessions.need(peer)
        if session.arena is None:
            raise P.ProtocolError("echo over shm needs a shared-memory session")
        n = header.get("nbytes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n % 4:
            raise P.ProtocolError(f"echo: bad nbytes {n!r}")
        src, dst = header.get("src"), header.get("dst")
        for off in (src, dst):
            if not isinstance(off, int) or isinstance(off, bool):
                raise P.ProtocolError(f"echo: bad offset {off!r}")
        src = session.arena.view(P.TensorMeta("float32", (n // 4,), src))
        dst = session.arena.view(P.TensorMeta("float32", (n // 4,), dst))
        if overlaps(dst, [src]):
            raise P.ProtocolError("echo: src and dst regions overlap")
        dst.copy_(src)      # with the server's threads, as its ops read and write the arena
        return [P.encode({"type": "echo"})]


def footprint(cfg, wire: str, op: str, inputs: list[P.TensorMeta], out: P.TensorMeta) -> int:
    """Bytes one call occupies on the server, estimated from the shapes alone: its inputs (copied out of
    shared memory or to the device), its output and the op's temporaries."""
    total = sum(m.nbytes for m in inputs) + out.nbytes
    if wire == "uint8":              # protected: int32 partial products [5, T, out] and their int64 sum
        return total + 3 * out.nbytes
    item = P.WIRE_DTYPES[out.dtype].itemsize
    group = cfg.num_heads // max(cfg.num_kv_heads, 1)
    if op in ("qk", "av"):           # k or v repeated over each group of heads: [H, S, hd]
        return total + inputs[1].nbytes * group
    if op == "attn_o":               # scores and probabilities [H, T, S], the mask, k and v repeated, [T, H*hd]
        T, S = inputs[0].shape[0], inputs[1].shape[1]
        return (total + 2 * cfg.num_heads * T * S * item + T * S + 2 * inputs[1].nbytes * group
                + 2 * T * cfg.q_size * item)
    return total                     # matmul, embed: the output is all they make


def overlaps(out: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
    o0 = out.data_ptr()
    o1 = o0 + out.numel() * out.element_size()
    return any(x.data_ptr() < o1 and o0 < x.data_ptr() + x.numel() * x.element_size() for x in inputs)
