"""The remote offload: the trusted runner's side of the wire.

Transport `shm`: tensors live in the session's arena (the runner's ops write their outputs straight
into it via `empty`); messages carry offsets. Transport `frames`: tensors travel as raw ZeroMQ frames.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass

import torch
import zmq

from . import protocol as P
from .config import ModelConfig
from .doorbell import Channel, make_pipes, open_pipe
from .shm import Arena
from .stats import Stats
from .transport import Client, ServerTimeout, TransportError, check_ipc_owner


class RemoteError(RuntimeError):
    """The server answered with an error; the message names the op."""


class Pending:
    def __init__(self, remote: "RemoteOffload", rid: int, op: str, layer, out: torch.Tensor | None, sent_at: float,
                 regions: list[int]):
        self.remote, self.rid, self.op, self.layer, self.out, self.sent_at = remote, rid, op, layer, out, sent_at
        self.regions = regions      # arena offsets of this request's inputs and output
        self.value = None

    def result(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.remote._wait(self)
        return self.value

    def release(self) -> None:
        """The caller is done with the result: its arena regions may be reused."""
        if self.remote.arena is not None:
            for off in self.regions:
                self.remote.arena.free(off)
        self.regions = []

    def __str__(self) -> str:
        return describe(self.op, self.layer)


def describe(op: str, layer: int | None) -> str:
    return f"op {op}" + (f" (layer {layer})" if layer is not None else "")


@dataclass
class Layout:
    """A checked call: its header up to the output offset, and what the output is. Keyed on its input
    buffers' identities; it holds them, so no other tensor can take their ids."""
    inputs: tuple[torch.Tensor, ...]
    prefix: bytes
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    in_bytes: int


class RemoteOffload:
    def __init__(self, endpoint: str, transport: str = "shm", timeout_s: float = 30.0,
                 connect_timeout_s: float = 5.0, arena_bytes=64 * 2**20,
                 stats: Stats | None = None, curve=None, control: str = "pipes", spin_s: float = 0.0):
        """arena_bytes: an int, or a function of the served model's config (known after the hello).
        curve: a keys.ClientCurve for a CurveZMQ (tcp) server, or None.
        control: with shm, where the calls' headers go: "pipes" beside the arena (doorbell.py) or "socket";
        spin_s: with pipes, poll for each reply this long before sleeping."""
        if transport not in ("shm", "frames"):
            raise ValueError(f"unknown transport '{transport}'; choose shm or frames")
        if control not in ("pipes", "socket"):
            raise ValueError(f"unknown control channel '{control}'; choose pipes or socket")
        self.bell, self.spin_s = None, spin_s
        self.endpoint, self.transport = endpoint, transport
        self.stats = stats or Stats()
        self.client, self.arena = None, None
        check_ipc_owner(endpoint)
        self.client = Client(endpoint, timeout_s, curve=curve)
        self.ids = itertools.count(1)
        self.layouts: dict[tuple, Layout] = {}     # (op, layer, ids of the input buffers) -> checked header
        self.replies: dict[int, list] = {}
        try:
            self._hello(connect_timeout_s)
            if transport == "shm":
                nbytes = arena_bytes(self.cfg) if callable(arena_bytes) else arena_bytes
                self._attach(nbytes, connect_timeout_s, doorbell=control == "pipes")
        except BaseException:
            self.close()
            raise

    def _hello(self, timeout_s: float) -> None:
        # the pid lets a server on this host drop the session (and its arena) if this process dies
        self.client.send([P.encode({"type": "hello", "pid": os.getpid()})])
        try:
            frames = self.client.recv("the hello (connect)", timeout_s)
        except ServerTimeout as e:
            if self.client.transport != "tcp":
                raise
            raise ServerTimeout(f"{e} (a CurveZMQ server does not answer a client whose public key it has not "
                                f"allowed, nor a plain one: check --keys, --server-key, --client-key)") from None
        head = P.decode(frames[0])
        if head["type"] == "error":
            raise RemoteError(f"{self.endpoint}: {head['error']}")
        self.info = head
        self.cfg = ModelConfig.from_dict(head["config"])
        self.dtype = P.WIRE_DTYPES[head["dtype"]]
        metas = [P.TensorMeta.from_json(m) for m in head["tensors"]]
        self.norms = {n: P.tensor_from_frame(m, f).clone() for n, m, f in zip(head["norms"], metas, frames[1:])}

    def _attach(self, nbytes: int, timeout_s: float, doorbell: bool = False) -> None:
        """Create the session's arena (and the doorbell's pipes) and have the server map it (the server then
        unlinks the files)."""
        arena, pipes, bell = Arena.create(nbytes), (), None
        try:
            if doorbell:
                pipes = make_pipes(arena.path)
                bell = Channel(open_pipe(pipes[1]), open_pipe(pipes[0]))    # read replies, write requests
            self.client.send([P.encode({"type": "attach", "arena": {"name": arena.name, "size": arena.size},
                                        "doorbell": doorbell})])
            head = P.decode(self.client.recv("the arena attach", timeout_s)[0])
            if head["type"] == "error":
                raise RemoteError(f"{self.endpoint}: {head['error']}")
        except BaseException:
            arena.close()
            for p in pipes:
                p.unlink(missing_ok=True)
            if bell is not None:
                bell.close()
            raise
        arena.path = None
        self.layouts.clear()
        if self.arena is not None:
            self.arena.close()
        if self.bell is not None:
            self.bell.close()
        self.arena, self.bell = arena, bell

    # ---- the Offload interface -----------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.arena is None:
            return torch.empty(shape, dtype=dtype or self.dtype)
        return self.arena.empty(shape, dtype or self.dtype)   # freed with the request it is an input of

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor) -> Pending:
        t0 = time.perf_counter()
        metas = []
        frames = []
        out = None
        regions = []
        rid = next(self.ids)
        if self.arena is not None:
            bufs = []
            for x in xs:
                off = self.arena.offset_of(x)
                if off is None:         # not written in place: copy it in once
                    x = self.arena.empty(tuple(x.shape), x.dtype).copy_(x)
                    off = self.arena.offset_of(x)
                bufs.append(x)
                regions.append(off)
            layout = (op, layer, *map(id, bufs))
            call = self.layouts.get(layout)
            if call is None or any(a is not b for a, b in zip(call.inputs, bufs)):
                call = self._layout(layout, bufs, regions)
            out = self.arena.empty(call.out_shape, call.out_dtype)
            out_offset = self.arena.offset_of(out)
            regions.append(out_offset)
            self.stats.shm_sent_bytes += call.in_bytes
            head = b"%s%d},\"id\":%d}" % (call.prefix, out_offset, rid)
        else:
            for x in xs:
                metas.append(P.TensorMeta.of(x))
                frames.append(P.tensor_bytes(x))
            header = {"type": "call", "op": op, "layer": layer, "inputs": [m.to_json() for m in metas]}
            head = P.encode({**header, "id": rid})
        t1 = time.perf_counter()
        if self.bell is not None:
            try:
                self.bell.send(head, self.client.timeout_s)
            except TimeoutError as e:
                raise ServerTimeout(f"could not send {describe(op, layer)} to {self.endpoint}: {e}") from None
        else:
            self.client.send([head] + frames, what=describe(op, layer))
        self.stats.serialize_s += t1 - t0
        self.stats.sent_bytes += len(head) + sum(f.nbytes for f in frames)
        self.stats.rpc_calls += 1
        return Pending(self, rid, op, layer, out, time.perf_counter(), regions)

    def _layout(self, layout: tuple, xs, regions: list[int]) -> "Layout":
        """Check a call's inputs once per set of input buffers; later calls on the same buffers (the same arena
        views: empty() hands out one view per region, shape and dtype) reuse the header."""
        op, layer = layout[:2]
        metas = [P.TensorMeta.of(x, off) for x, off in zip(xs, regions)]
        want = P.check_request(self.cfg, P.DTYPE_NAME[self.dtype], op, layer, metas)
        head = P.encode({"type": "call", "op": op, "layer": layer, "inputs": [m.to_json() for m in metas],
                         "output": {"offset": 0}, "id": 0})
        prefix = head[:head.rindex(b'{"offset":') + len(b'{"offset":')]     # ... "output":{"offset":
        if len(self.layouts) >= 4096:
            self.layouts.clear()
        call = self.layouts[layout] = Layout(tuple(xs), prefix, want.shape, P.WIRE_DTYPES[want.dtype],
                                             sum(m.nbytes for m in metas))
        return call

    def _wait(self, pending: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.bell is not None:
            self._wait_bell(pending)
        while pending.rid not in self.replies:
            frames = self.client.recv(f"{pending}")
            head = P.decode(frames[0])
            if head.get("id") is None and head["type"] == "error":    # the server could not tell which call
                raise RemoteError(f"server at {self.endpoint} failed while {pending} was pending: {head['error']}")
            self.replies[head.get("id")] = (head, frames, time.perf_counter())
        head, frames, got_at = self.replies.pop(pending.rid)
        self.stats.wait_s += time.perf_counter() - t0
        self.stats.rpc_time_s += got_at - pending.sent_at
        self.stats.received_bytes += sum(len(f) for f in frames)
        if head["type"] == "error":
            raise RemoteError(f"server at {self.endpoint} failed {pending}: {head['error']}")
        self.stats.server_compute_s += head.get("compute_s", 0.0)
        t1 = time.perf_counter()
        if pending.out is not None:     # the region this runner chose; the reply's meta is not needed
            y = pending.out
            self.stats.shm_received_bytes += y.numel() * y.element_size()
        else:
            y = P.tensor_from_frame(P.TensorMeta.from_json(head["output"]), frames[1])
        self.stats.deserialize_s += time.perf_counter() - t1
        return y

    def _wait_bell(self, pending: Pending) -> None:
        now = time.monotonic()
        deadline, spin_until = now + self.client.timeout_s, now + self.spin_s
        while pending.rid not in self.replies:
            if not self.bell.wait(0.0 if now < spin_until else deadline - now):   # poll(0) while spinning
                now = time.monotonic()
                if now < deadline:
                    continue
                raise ServerTimeout(f"no reply from {self.endpoint} within {self.client.timeout_s:g} s while waiting "
                                    f"for {pending} (doorbell pipes); is `tsqp serve` running there?")
            for msg in self.bell.receive():
                head = P.parse_result(msg) or P.decode(msg)
                self.replies[head.get("id")] = (head, [msg], time.perf_counter())
            if None in self.replies:        # the server could not tell which call a message was
                head = self.replies.pop(None)[0]
                raise RemoteError(f"server at {self.endpoint} failed while {pending} was pending: {head['error']}")
            now = time.monotonic()

    def close(self) -> None:
        if self.bell is not None:
            self.bell.close()
            self.bell = None
        if self.client is not None:
            # best effort, and only to a server that answered the hello: the server may be gone
            with contextlib.suppress(TransportError, zmq.ZMQError):
                if hasattr(self, "info"):
                    self.client.send([P.encode({"type": "bye"})], block=False)
                    self.client.recv("bye", timeout_s=1.0)
            self.client.close()
            self.client = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None


def default_arena_bytes(cfg: ModelConfig, tokens: int, chunks: int = 1, seed_policy: bool = False) -> int:
    """Room for what each of `chunks` interleaved chunks holds at its peak (the gate/up result, the SiLU
    output and the down result; for `seed` the score and probability matrices), twice over, in float32."""
    T = -(-tokens // chunks)
    D, I, itemsize = cfg.hidden_size, cfg.intermediate_size, 4
    per_chunk = max(T * (3 * I + 2 * D), T * (D + cfg.qkv_size + cfg.q_size) + 2 * cfg.kv_size * tokens)
    if seed_policy:
        per_chunk = max(per_chunk, 2 * cfg.num_heads * T * tokens + 2 * cfg.kv_size * tokens + cfg.q_size * T)
    return max(16 * 2**20, 2 * chunks * per_chunk * itemsize + 2 * cfg.vocab_size * itemsize)
