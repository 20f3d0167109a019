"""The remote offload: the trusted runner's side of the wire, composed of three parts.

  session   the ZeroMQ socket's JSON conversation: hello (config, norms), attach (the arena), bye
  data path where tensors travel: the shared-memory arena (`ArenaPath`) or raw frames (`FramePath`)
  channel   where calls and replies travel: the control pipes (`PipeChannel`) or the socket (`SocketChannel`)

The server is untrusted: the welcome is checked field by field (hello.py), every reply against the call it
answers (datapath.check_reply), and the runner's memory is bounded by its own numbers (`Budget`), fixed
before the server says anything: the socket's receive cap and queue, the arena, the KV cache.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass

import torch
import zmq

from ..config import PEER_LIMITS, ModelConfig
from ..stats import Stats
from . import protocol as P
from .channel import PipeChannel, RunnerContext, SocketChannel
from .datapath import ArenaPath, Call, FramePath, reply_time
from .hello import Expected, HelloError, printable, read_welcome
from .pipes import Channel as Pipes
from .pipes import PipeError, make_pipes, open_pipe
from .shm import Arena
from .transport import Client, ServerTimeout, TransportError, check_ipc_owner
from .relay import Relay
from .watch import kernel_buffer

MiB = 2**20
DEFAULT_MAX_BYTES = 4096 * MiB   # --max-arena-mb
QUEUE_BYTES = 16 * MiB           # what ZeroMQ may hold unread for the runner, whatever the server sends
MAX_QUEUE = 64                   # messages, when they are small (control messages, shared-memory replies)
WIDEST = 8                       # bytes per element of the widest result (int64, protected)


class RemoteError(RuntimeError):
    """The server answered with an error, or broke the protocol; the message names the op."""


def describe(op: str, layer: int | None) -> str:
    return f"op {op}" + (f" (layer {layer})" if layer is not None else "")


def server_text(message) -> str:
    """What a server said, made safe to print on one line (it may be anything: escapes, 64 KiB of it)."""
    return printable(message if isinstance(message, str) else repr(message), 300)


@dataclass(frozen=True)
class Budget:
    """The runner's own bounds, fixed before it hears from a server: nothing a server states raises them.
    tokens: the longest step the runner will run (prompt + new tokens), None when unknown; max_bytes: the
    most it allocates for the arena, for the KV cache, and for any one frame it receives."""
    tokens: int | None = None
    seed_policy: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES

    def check(self, cfg: ModelConfig, transport: str, arena_bytes: int, endpoint: str, model: str) -> None:
        """Before allocating anything sized from the served model: the arena, the KV cache and (frames) the
        largest result within the runner's own limit."""
        need = {"the arena": arena_bytes}
        if self.tokens is not None:
            need["the KV cache"] = 2 * cfg.num_layers * cfg.kv_size * self.tokens * 4       # float32 K and V
            if transport == "frames":
                need["the largest result"] = largest_result(cfg, self.tokens, self.seed_policy)
        for what, n in need.items():
            if n > self.max_bytes:
                raise RemoteError(f"{endpoint}: {what} would take {n / MiB:.0f} MiB (the served model {model}: "
                                  f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}"
                                  f"{f'; {self.tokens} tokens' if self.tokens else ''}), above this runner's "
                                  f"limit of {self.max_bytes / MiB:.0f} MiB (--max-arena-mb)")


def largest_result(cfg: ModelConfig, tokens: int, seed_policy: bool) -> int:
    """Bytes of the largest result a step of `tokens` tokens gets (lm_head answers the last row only)."""
    T = tokens
    n = max(T * max(cfg.qkv_size, 2 * cfg.intermediate_size, cfg.hidden_size), cfg.vocab_size)
    if seed_policy:
        n = max(n, cfg.num_heads * T * T)          # Q K^T scores [H, T, S]
    return WIDEST * n


def receive_cap(transport: str, cfg: ModelConfig | None, budget: Budget) -> int:
    """The largest frame the runner accepts (ZMQ_MAXMSGSIZE), set before connecting: a control message or a
    norm weight, and with the frames transport and a known config a result (sized from the config and the
    runner's tokens when it has them, else the budget). A frames runner that does not know the model yet
    connects with the control cap, and again with this one once the hello told it the model."""
    hidden = cfg.hidden_size if cfg is not None else PEER_LIMITS["hidden_size"]
    cap = max(P.MAX_CONTROL_BYTES, 4 * hidden)      # a norm weight: [D] of at most 4-byte floats
    if transport == "frames" and cfg is not None:
        cap = max(cap, budget.max_bytes if budget.tokens is None else
                  min(budget.max_bytes, largest_result(cfg, budget.tokens, budget.seed_policy)))
    return cap


def receive_queue(cap: int) -> int:
    """ZMQ_RCVHWM from the runner's largest frame: messages libzmq may hold unread, QUEUE_BYTES of them at most
    and never fewer than 2. A full queue only slows the server down: a DEALER stops reading its connection and
    the replies wait on the server's side (whose queue per session is larger than the calls a runner has in
    flight), none is dropped. What it holds unread is then at most (queue + 1) * cap bytes: the queue and the
    message being decoded, but only for messages of one frame (a reply has at most two): libzmq counts whole
    messages, so one message of many frames passes the queue's bound (docs/security.md)."""
    return max(2, min(MAX_QUEUE, QUEUE_BYTES // cap))


def receive_bound(cap: int, cfg: ModelConfig | None, tcp: bool) -> int:
    """The most bytes an honest server's replies can have delivered and the runner not read at once, over tcp
    (watch.py drops the connection beyond): the queue's replies (a frame of the cap and a header each), one
    reply in progress (the welcome: its norms, two per layer and the final one, of the served or the largest
    allowed model), and over tcp the kernel's receive buffer (over ipc the relay counts bytes as it takes
    them from the server, so the buffer between it and libzmq is inside the count)."""
    layers = cfg.num_layers if cfg is not None else PEER_LIMITS["num_layers"]
    welcome = (2 * layers + 2) * min(cap, P.MAX_CONTROL_BYTES if cfg is None else 4 * cfg.hidden_size) \
        + P.MAX_CONTROL_BYTES
    reply = cap + P.MAX_CONTROL_BYTES
    return receive_queue(cap) * reply + max(reply, welcome) + (kernel_buffer() if tcp else 0)


class Pending:
    value = None            # the result, once received
    reply = None            # (compute s, frames, arrival time), once filed
    sent_at = 0.0           # once its header is written (rpc_time_s: request sent -> reply received)

    def __init__(self, remote: "RemoteOffload", rid: int, call: Call):
        self.remote, self.rid, self.call = remote, rid, call
        self.regions = call.regions
        self.deadline = time.monotonic() + remote.client.timeout_s     # one deadline per call, from submit

    def result(self) -> torch.Tensor:
        return self.remote._wait(self) if self.value is None else self.value

    def release(self) -> None:
        """The caller is done with the result: its arena regions may be reused."""
        self.remote.path.release(self.regions)
        self.regions = ()

    def __str__(self) -> str:
        return describe(self.call.op, self.call.layer)


class RemoteOffload:
    def __init__(self, endpoint: str, transport: str = "shm", timeout_s: float = 30.0,
                 connect_timeout_s: float = 5.0, arena_bytes=64 * 2**20,
                 stats: Stats | None = None, curve=None, control: str = "pipes", spin_s: float = 0.0,
                 expect: Expected | None = None, budget: Budget = Budget()):
        """arena_bytes: an int, or a function of the served model's config (known after the hello).
        curve: a keys.ClientCurve for a CurveZMQ (tcp) server, or None.
        control: with shm, where calls go: "pipes" beside the arena (pipes.py) or "socket"; spin_s: with
        pipes, poll for each reply this long before sleeping.
        expect: the runner's own copy of the model (config and norms): the server must serve exactly it.
        budget: the runner's bounds on what it allocates."""
        if transport not in ("shm", "frames"):
            raise ValueError(f"unknown transport '{transport}'; choose shm or frames")
        if control not in ("pipes", "socket"):
            raise ValueError(f"unknown control channel '{control}'; choose pipes or socket")
        self.endpoint, self.transport, self.budget = endpoint, transport, budget
        self.stats = stats or Stats()
        self.client = self.link = self.path = self.channel = self.ctx = None
        self.ids = itertools.count(1)
        self.cfg = expect.cfg if expect else None    # the runner's own model until the hello names the served one
        self.waiting: dict[int, Pending] = {}       # calls sent and not yet answered
        check_ipc_owner(endpoint)
        # a context of its own: its sockets get the runner's caps before they connect (libzmq copies a
        # socket's options into each connection when it is made)
        self.ctx = RunnerContext()
        try:
            self._connect(receive_cap(transport, self.cfg, budget), timeout_s, curve)
            self._hello(connect_timeout_s, expect)
            nbytes = arena_bytes(self.cfg) if callable(arena_bytes) else arena_bytes
            budget.check(self.cfg, transport, nbytes if transport == "shm" else 0, endpoint, self.info["model"])
            cap = receive_cap(transport, self.cfg, budget)
            if cap > self.receive_cap:          # frames: results need more than the hello did, now bounded
                self._rehello(cap, timeout_s, connect_timeout_s, curve, expect)
            if transport == "shm":
                self.path, bell = attach(self, nbytes, connect_timeout_s, pipes=control == "pipes")
                self.channel = PipeChannel(bell, endpoint, timeout_s, spin_s) if bell else self.link
            else:
                self.path, self.channel = FramePath(self.cfg, self.dtype), self.link
        except BaseException:
            self.close()
            raise

    # ---- the session: JSON control messages -------------------------------------------------------------
    def _connect(self, cap: int, timeout_s: float, curve) -> None:
        self.receive_cap, self.receive_queue = cap, receive_queue(cap)
        self.ctx.setsockopt(zmq.MAXMSGSIZE, cap)
        self.ctx.setsockopt(zmq.RCVHWM, self.receive_queue)
        relay = Relay(self.endpoint) if self.endpoint.startswith("ipc://") else None      # counts for ipc
        self.client = Client(self.endpoint, timeout_s, ctx=self.ctx, curve=curve, via=relay and relay.endpoint)
        self.link = SocketChannel(self.client, cap, receive_bound(cap, self.cfg, relay is None), relay)

    def _ask(self, message: dict, what: str, timeout_s: float) -> tuple[dict, list]:
        self.client.send([P.encode(message)])
        frames = self.link.receive(time.monotonic() + timeout_s, what, timeout_s)[0]
        try:
            head = P.decode(frames[0])
        except P.ProtocolError as e:
            raise RemoteError(f"{self.endpoint}: bad reply to {what}: {e}") from None
        if head["type"] == "error":
            raise RemoteError(f"{self.endpoint}: {server_text(head.get('error'))}")
        return head, frames[1:]

    def _hello(self, timeout_s: float, expect: Expected | None) -> None:
        # the pid lets a server on this host drop the session (and its arena) if this process dies
        try:
            head, frames = self._ask({"type": "hello", "pid": os.getpid()}, "the hello (connect)", timeout_s)
        except ServerTimeout as e:
            if self.client.transport != "tcp":
                raise
            raise ServerTimeout(f"{e} (a CurveZMQ server does not answer a client whose public key it has not "
                                f"allowed, nor a plain one: check --keys, --server-key, --client-key)") from None
        try:
            welcome = read_welcome(head, frames, expect)
        except HelloError as e:
            raise RemoteError(f"{self.endpoint}: refusing the server's hello: {e}") from None
        self.cfg, self.dtype, self.norms, self.info = welcome.cfg, welcome.dtype, welcome.norms, welcome.info

    def _rehello(self, cap: int, timeout_s: float, connect_timeout_s: float, curve, expect) -> None:
        """A new session on a connection with the larger cap; its hello must equal the first one's."""
        cfg, norms = self.cfg, self.norms
        self._say_bye()
        self._connect(cap, timeout_s, curve)
        self._hello(connect_timeout_s, expect)
        if self.cfg != cfg or self.norms.keys() != norms.keys() or \
                any(not torch.equal(self.norms[k], norms[k]) for k in norms):
            raise RemoteError(f"{self.endpoint}: the server's second hello differs from its first")

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

    def discard(self, t: torch.Tensor) -> None:
        """An empty() buffer that will feed no call (the request was refused before it was sent)."""
        self.path.discard(t)

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor) -> Pending:
        t0 = time.perf_counter()
        rid = next(self.ids)
        call = self.path.call(op, layer, xs)
        header = P.with_id(call.header, rid)
        t1 = time.perf_counter()
        pending = Pending(self, rid, call)
        self.channel.send(header, call.frames, pending)       # the pending call names itself in errors
        pending.sent_at = time.perf_counter()
        self.waiting[rid] = pending
        self.stats.serialize_s += t1 - t0
        self.stats.sent_bytes += len(header) + call.frame_bytes
        self.stats.shm_sent_bytes += call.shm_in_bytes
        self.stats.rpc_calls += 1
        return pending

    def _wait(self, pending: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        while pending.reply is None:
            try:
                arrived = self.channel.receive(pending.deadline, pending)
            except PipeError as e:
                raise RemoteError(f"server at {self.endpoint} broke the protocol on the control pipe while "
                                  f"{pending} was pending: {e}") from None
            for frames in arrived:
                self._file(frames, pending)
        compute_s, frames, got_at = pending.reply
        t1 = time.perf_counter()
        try:
            pending.value = self.path.result(pending.call, frames)
        except P.ProtocolError as e:
            raise RemoteError(f"server at {self.endpoint} broke the protocol answering {pending}: {e}") from None
        self.stats.wait_s += t1 - t0
        self.stats.rpc_time_s += got_at - pending.sent_at
        self.stats.received_bytes += sum(len(f) for f in frames)
        self.stats.shm_received_bytes += pending.call.shm_out_bytes
        self.stats.server_compute_s += compute_s
        self.stats.deserialize_s += time.perf_counter() - t1
        return pending.value

    def _file(self, frames: list, pending: Pending) -> None:
        """Match one reply ([header bytes, *frames]) to the call it answers; anything else ends the run with a
        named error. Only replies to calls in flight are kept, so what waits is bounded by the calls made."""
        asked = self.waiting.pop(P.peek_id(frames[0]), None)
        try:
            if asked is None:
                refuse(self.waiting, frames[0], pending, self.endpoint)
            asked.reply = (reply_time(frames[0], asked.call), frames, time.perf_counter())
        except P.ProtocolError as e:
            raise RemoteError(f"server at {self.endpoint} broke the protocol while {pending} was pending: {e}") \
                from None

    def _say_bye(self) -> None:
        """End the session (best effort, and only to a server that answered the hello: it may be gone) and
        close its socket."""
        if self.client is None:
            return
        with contextlib.suppress(TransportError, zmq.ZMQError):
            if hasattr(self, "info"):
                self.client.send([P.encode({"type": "bye"})], block=False)
                self.client.recv("bye", timeout_s=1.0)
        if self.link is not None:
            self.link.close()
            self.link = None
        self.client.close()
        self.client = None

    def close(self) -> None:
        if self.channel is not None and self.channel is not self.link:
            self.channel.close()
        self.channel = None
        self._say_bye()
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
            self.ctx = None
        if self.path is not None:
            self.path.close()
            self.path = None


def attach(remote: RemoteOffload, nbytes: int, timeout_s: float, pipes: bool) -> tuple[ArenaPath, Pipes | None]:
    """Create the session's arena (and its control pipes) and have the server map it (the server then unlinks
    the files). Returns the data path and the pipes (None: calls go on the socket)."""
    arena, paths, bell = Arena.create(nbytes), (), None
    try:
        if pipes:
            paths = make_pipes(arena.path)
            bell = Pipes(open_pipe(paths[1]), open_pipe(paths[0]), max_message=P.MAX_CONTROL_BYTES)
        spec = {"name": arena.name, "size": arena.size} | ({"dir": str(arena.path.parent)} if pipes else {})
        head, frames = remote._ask({"type": "attach", "arena": spec, "pipes": pipes}, "the arena attach", timeout_s)
        if head["type"] != "attached" or frames:
            raise RemoteError(f"{remote.endpoint}: a {server_text(head['type'])} message with {len(frames)} "
                              f"frame(s) answered the arena attach")
    except BaseException:
        arena.close()
        for p in paths:
            p.unlink(missing_ok=True)
        if bell is not None:
            bell.close()
        raise
    arena.path = None
    return ArenaPath(arena, remote.cfg, remote.dtype), bell


def refuse(waiting: dict, head: bytes, pending: Pending, endpoint: str) -> None:
    """A reply that answers no call in flight: the server's error (naming the call it failed), a header too
    malformed to read an id from, or an id no call in flight has. Raises."""
    if not P.is_binary(head):
        msg = P.decode(head)
        rid = msg.get("id")
        what = waiting.get(rid, pending) if isinstance(rid, int) else pending
        raise RemoteError(f"server at {endpoint} failed {what}: {server_text(msg.get('error', msg))}")
    rid = P.peek_id(head)
    if rid is None:
        P.unpack(head)                # raises, naming what is wrong
    raise P.ProtocolError(f"a reply with id {rid}, which no call in flight has")


def default_arena_bytes(cfg: ModelConfig, tokens: int, chunks: int = 1, seed_policy: bool = False) -> int:
    """Room for what each of `chunks` interleaved chunks holds at its peak (the gate/up result, the SiLU
    output and the down result; for `seed` the score and probability matrices), twice over, in float32."""
    T = -(-tokens // chunks)
    D, I, itemsize = cfg.hidden_size, cfg.intermediate_size, 4
    per_chunk = max(T * (3 * I + 2 * D), T * (D + cfg.qkv_size + cfg.q_size) + 2 * cfg.kv_size * tokens)
    if seed_policy:
        per_chunk = max(per_chunk, 2 * cfg.num_heads * T * tokens + 2 * cfg.kv_size * tokens + cfg.q_size * T)
    return max(16 * 2**20, 2 * chunks * per_chunk * itemsize + 2 * cfg.vocab_size * itemsize)
