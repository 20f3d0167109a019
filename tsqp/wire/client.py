"""The remote offload: the trusted runner's side of the wire, composed of three parts.

  session   the ZeroMQ socket's JSON conversation: hello (config, norms), attach (the arena), bye
  data path where tensors travel: the shared-memory arena (`ArenaPath`) or raw frames (`FramePath`)
  channel   where calls and replies travel: the control pipes (`PipeChannel`) or the socket (`SocketChannel`)
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time

import torch
import zmq

from ..config import ModelConfig
from ..stats import Stats
from . import protocol as P
from .channel import PipeChannel, SocketChannel
from .datapath import ArenaPath, Call, FramePath, check_reply
from .pipes import Channel as Pipes
from .pipes import make_pipes, open_pipe
from .shm import Arena
from .transport import Client, ServerTimeout, TransportError, check_ipc_owner


class RemoteError(RuntimeError):
    """The server answered with an error, or broke the protocol; the message names the op."""


def describe(op: str, layer: int | None) -> str:
    return f"op {op}" + (f" (layer {layer})" if layer is not None else "")


class Pending:
    def __init__(self, remote: "RemoteOffload", rid: int, op: str, layer, call: Call, sent_at: float):
        self.remote, self.rid, self.op, self.layer, self.call, self.sent_at = remote, rid, op, layer, call, sent_at
        self.deadline = time.monotonic() + remote.client.timeout_s     # one deadline per call, from submit
        self.value = None

    def result(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.remote._wait(self)
        return self.value

    def release(self) -> None:
        """The caller is done with the result: its arena regions may be reused."""
        self.remote.path.release(self.call.regions)
        self.call.regions = []

    def __str__(self) -> str:
        return describe(self.op, self.layer)


class RemoteOffload:
    def __init__(self, endpoint: str, transport: str = "shm", timeout_s: float = 30.0,
                 connect_timeout_s: float = 5.0, arena_bytes=64 * 2**20,
                 stats: Stats | None = None, curve=None, control: str = "pipes", spin_s: float = 0.0):
        """arena_bytes: an int, or a function of the served model's config (known after the hello).
        curve: a keys.ClientCurve for a CurveZMQ (tcp) server, or None.
        control: with shm, where calls go: "pipes" beside the arena (pipes.py) or "socket"; spin_s: with
        pipes, poll for each reply this long before sleeping."""
        if transport not in ("shm", "frames"):
            raise ValueError(f"unknown transport '{transport}'; choose shm or frames")
        if control not in ("pipes", "socket"):
            raise ValueError(f"unknown control channel '{control}'; choose pipes or socket")
        self.endpoint, self.transport = endpoint, transport
        self.stats = stats or Stats()
        self.client = self.path = self.channel = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, Pending] = {}       # calls sent and not yet answered
        self.replies: dict[int, tuple] = {}         # answered, not yet collected: id -> (message, frames, time)
        check_ipc_owner(endpoint)
        self.client = Client(endpoint, timeout_s, curve=curve)
        try:
            self._hello(connect_timeout_s)
            if transport == "shm":
                nbytes = arena_bytes(self.cfg) if callable(arena_bytes) else arena_bytes
                self._attach(nbytes, connect_timeout_s, pipes=control == "pipes", spin_s=spin_s)
            else:
                self.path, self.channel = FramePath(self.cfg, self.dtype), SocketChannel(self.client)
        except BaseException:
            self.close()
            raise

    # ---- the session: JSON control messages -------------------------------------------------------------
    def _ask(self, message: dict, what: str, timeout_s: float) -> tuple[dict, list]:
        self.client.send([P.encode(message)])
        frames = self.client.recv(what, timeout_s)
        try:
            head = P.decode(frames[0])
        except P.ProtocolError as e:
            raise RemoteError(f"{self.endpoint}: bad reply to {what}: {e}") from None
        if head["type"] == "error":
            raise RemoteError(f"{self.endpoint}: {head.get('error')}")
        return head, frames[1:]

    def _hello(self, timeout_s: float) -> None:
        # the pid lets a server on this host drop the session (and its arena) if this process dies
        try:
            head, frames = self._ask({"type": "hello", "pid": os.getpid()}, "the hello (connect)", timeout_s)
        except ServerTimeout as e:
            if self.client.transport != "tcp":
                raise
            raise ServerTimeout(f"{e} (a CurveZMQ server does not answer a client whose public key it has not "
                                f"allowed, nor a plain one: check --keys, --server-key, --client-key)") from None
        try:
            self.info = head
            self.cfg = ModelConfig.from_dict(head["config"])
            self.dtype = P.WIRE_DTYPES[head["dtype"]]
            metas = [P.meta_from_json(m) for m in head["tensors"]]
            if len(metas) != len(head["norms"]) or len(frames) != len(metas):
                raise P.ProtocolError(f"{len(head['norms'])} norm names, {len(metas)} metas, {len(frames)} frames")
            self.norms = {n: P.tensor_from_frame(m, f).clone() for n, m, f in zip(head["norms"], metas, frames)}
        except (KeyError, TypeError, ValueError) as e:
            raise RemoteError(f"{self.endpoint}: malformed hello: {type(e).__name__}: {e}") from None

    def _attach(self, nbytes: int, timeout_s: float, pipes: bool, spin_s: float) -> None:
        """Create the session's arena (and its control pipes) and have the server map it (the server then
        unlinks the files)."""
        arena, paths, bell = Arena.create(nbytes), (), None
        try:
            if pipes:
                paths = make_pipes(arena.path)
                bell = Pipes(open_pipe(paths[1]), open_pipe(paths[0]))    # read replies, write requests
            self._ask({"type": "attach", "arena": {"name": arena.name, "size": arena.size}, "pipes": pipes},
                      "the arena attach", timeout_s)
        except BaseException:
            arena.close()
            for p in paths:
                p.unlink(missing_ok=True)
            if bell is not None:
                bell.close()
            raise
        arena.path = None
        self.path = ArenaPath(arena, self.cfg, self.dtype)
        self.channel = PipeChannel(bell, self.endpoint, self.client.timeout_s, spin_s) if pipes else \
            SocketChannel(self.client)

    def server_alive(self, timeout_s: float) -> bool:
        """Whether the server process that welcomed this session still answers within timeout_s, for a runner
        that keeps a session between jobs: a dead server would otherwise cost the next call its whole timeout,
        and a restarted one (another pid) has forgotten the session. Only between calls (none in flight)."""
        if self.waiting:
            raise RuntimeError("server_alive() with calls in flight")
        try:
            head, _ = self._ask({"type": "info"}, "the info (is the server alive?)", timeout_s)
        except (TransportError, RemoteError, zmq.ZMQError):
            return False
        return head.get("pid") == self.info.get("pid")

    @property
    def arena(self) -> Arena | None:
        return self.path.arena if isinstance(self.path, ArenaPath) else None

    # ---- the Offload interface ----------------------------------------------------------------------------
    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.path.empty(shape, dtype)

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor) -> Pending:
        t0 = time.perf_counter()
        rid = next(self.ids)
        call = self.path.call(op, layer, rid, xs)
        t1 = time.perf_counter()
        self.channel.send(call.header, call.frames, describe(op, layer))
        self.stats.serialize_s += t1 - t0
        self.stats.sent_bytes += len(call.header) + (0 if call.out is not None else call.in_bytes)
        self.stats.shm_sent_bytes += call.in_bytes if call.out is not None else 0
        self.stats.rpc_calls += 1
        pending = self.waiting[rid] = Pending(self, rid, op, layer, call, time.perf_counter())
        return pending

    def _wait(self, pending: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        while pending.rid not in self.replies:
            for frames in self.channel.receive(pending.deadline, str(pending)):
                self._file(frames, pending)
        m, frames, got_at = self.replies.pop(pending.rid)
        self.stats.wait_s += time.perf_counter() - t0
        self.stats.rpc_time_s += got_at - pending.sent_at
        self.stats.received_bytes += sum(len(f) for f in frames)
        self.stats.server_compute_s += m.compute_s
        t1 = time.perf_counter()
        y = self.path.result(pending.call, frames)
        if pending.call.out is not None:
            self.stats.shm_received_bytes += pending.call.want.nbytes
        self.stats.deserialize_s += time.perf_counter() - t1
        return y

    def _file(self, frames: list, pending: Pending) -> None:
        """Match one reply to the call it answers; anything else ends the run with a named error."""
        head = frames[0]
        try:
            if not P.is_binary(head):
                msg = P.decode(head)
                rid = msg.get("id")
                what = self.waiting.get(rid, pending) if isinstance(rid, int) else pending
                raise RemoteError(f"server at {self.endpoint} failed {what}: {msg.get('error', msg)}")
            m = P.unpack(head)
            asked = self.waiting.pop(m.id, None)
            if asked is None:
                raise P.ProtocolError(f"a reply with id {m.id}, which no call in flight has")
            check_reply(m, asked.op, asked.call.want)
        except P.ProtocolError as e:
            raise RemoteError(f"server at {self.endpoint} broke the protocol while {pending} was pending: {e}") \
                from None
        self.replies[m.id] = (m, frames, time.perf_counter())

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.client is not None:
            # best effort, and only to a server that answered the hello: the server may be gone
            with contextlib.suppress(TransportError, zmq.ZMQError):
                if hasattr(self, "info"):
                    self.client.send([P.encode({"type": "bye"})], block=False)
                    self.client.recv("bye", timeout_s=1.0)
            self.client.close()
            self.client = None
        if self.path is not None:
            self.path.close()
            self.path = None


def default_arena_bytes(cfg: ModelConfig, tokens: int, chunks: int = 1, seed_policy: bool = False) -> int:
    """Room for what each of `chunks` interleaved chunks holds at its peak (the gate/up result, the SiLU
    output and the down result; for `seed` the score and probability matrices), twice over, in float32."""
    T = -(-tokens // chunks)
    D, I, itemsize = cfg.hidden_size, cfg.intermediate_size, 4
    per_chunk = max(T * (3 * I + 2 * D), T * (D + cfg.qkv_size + cfg.q_size) + 2 * cfg.kv_size * tokens)
    if seed_policy:
        per_chunk = max(per_chunk, 2 * cfg.num_heads * T * tokens + 2 * cfg.kv_size * tokens + cfg.q_size * T)
    return max(16 * 2**20, 2 * chunks * per_chunk * itemsize + 2 * cfg.vocab_size * itemsize)
