"""The compute server (untrusted side): holds the weights on its device and answers offload requests.

One ROUTER socket and each session's control pipes, one thread, requests served in order. The loop here
moves messages and never waits on a runner: a reply that cannot leave at once (a full reply pipe, a full
queue towards a runner that does not read, more than --max-queued-mb of its replies still unread) ends
that runner's session, and only that one. `handlers` decides what messages mean; `sessions` keeps who is
connected; `peers` says who sent a message and which connections closed.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import time
import traceback
from collections import deque

import torch
import zmq

from ..wire import protocol as P
from ..wire.keys import ServerCurve, check_bind, check_bound
from ..wire.pipes import PipeError
from ..wire.transport import MAX_MSG_BYTES, bind_server, transport_of
from .compute import Compute
from .handlers import MAX_REQUEST_BYTES, Handlers
from .peers import THIS_PROCESS, Connections, Peer
from .sessions import Sessions

POLL_MS = 100
REAP_EVERY_S = 1.0
DRAIN_EVERY_S = 0.05
MAX_QUEUED_BYTES = 1024 * 2**20     # --max-queued-mb: a runner's replies sent but not yet taken by the kernel
MAX_ARENA_BYTES = 16 * 2**30        # --max-arena-mb: the largest arena the server maps (and pins, on CUDA)


class Outbox:
    """A peer's replies that libzmq still holds (zero-copy frames, tracked until it lets go of them)."""

    def __init__(self):
        self.pending: deque = deque()      # (tracker, nbytes)
        self.bytes = 0

    def prune(self) -> int:
        while self.pending and self.pending[0][0].done:
            self.bytes -= self.pending.popleft()[1]
        return self.bytes

    def add(self, tracker, nbytes: int) -> None:
        if not tracker.done:
            self.pending.append((tracker, nbytes))
            self.bytes += nbytes


class Server:
    def __init__(self, compute: Compute, norms: dict[str, torch.Tensor], endpoint: str, model: str,
                 max_sessions: int = 8, idle_timeout_s: float = 600.0, max_msg_bytes: int = MAX_MSG_BYTES,
                 curve: ServerCurve | None = None, insecure: bool = False, public: bool = False,
                 spin_s: float = 0.0, recorder=None, max_sessions_per_user: int | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES, max_queued_bytes: int = MAX_QUEUED_BYTES,
                 max_arena_bytes: int = MAX_ARENA_BYTES):
        """idle_timeout_s: a tcp session is dropped after this long unheard (0: never); ipc sessions end with
        their connection. curve / insecure / public: the tcp:// policy (keys.check_bind). recorder:
        `--record DIR`. The max_* bound what one runner can make the server hold (see `tsqp serve -h`)."""
        self.endpoint, self.max_msg_bytes = endpoint, max_msg_bytes
        self.transport = transport_of(endpoint)
        self.curve, self.insecure, self.public = curve, insecure, public
        self.spin_s = spin_s      # after a call from the pipes, poll this long for the next before sleeping
        self.max_queued_bytes = max_queued_bytes
        self.stopping = False
        self.poller = zmq.Poller()            # the socket, and each session's control pipe
        self.sessions_ = Sessions(max_sessions, idle_timeout_s, self._follow_pipe, max_sessions_per_user,
                                  max_arena_bytes)
        self.handlers = Handlers(compute, norms, self.sessions_, endpoint, model, recorder, max_request_bytes)
        self.outboxes: dict[bytes, Outbox] = {}

    @property
    def sessions(self) -> dict:
        return self.sessions_.by_peer

    def handle(self, peer: bytes, frames: list, who: Peer = THIS_PROCESS) -> list:
        return self.handlers.handle(peer, frames, who)

    def reap(self) -> list[bytes]:
        return self.sessions_.reap()

    def drop(self, peer: bytes) -> None:
        self.sessions_.drop(peer)

    def _follow_pipe(self, fd: int, added: bool) -> None:
        if added:
            self.poller.register(fd, zmq.POLLIN)
        else:
            self.poller.unregister(fd)

    def serve_pipe(self, peer: bytes) -> bool:
        """Serve the next call that arrived on a session's control pipe (one per turn, so that a runner that
        floods its pipe waits its turn like the others); the reply goes back the same way, without waiting:
        a runner whose reply pipe is full does not read its replies and loses its session. True when another
        whole call waits, read ahead."""
        session = self.sessions_.by_peer.get(peer)
        if session is None or session.pipes is None:     # dropped while serving another pipe
            return False
        try:
            messages = session.pipes.receive(limit=1)
        except PipeError as e:        # framing lost: say why on the reply pipe, then end the session
            with contextlib.suppress(TimeoutError, OSError):
                session.pipes.send(P.error(f"control pipe: {e}; session dropped"), 0.0)
            self.sessions_.drop(peer, str(e))
            return False
        for payload in messages:
            try:
                reply = self.handlers.call(peer, payload)[0]
            except Exception as e:     # a bug, not bad input (call answers that): log, answer, go on
                traceback.print_exc()
                reply = P.error(f"internal server error: {type(e).__name__}: {e}")
            try:
                session.pipes.send(reply, 0.0)
            except (TimeoutError, OSError) as e:
                self.sessions_.drop(peer, f"its reply pipe is full, it does not read its replies ({e})")
                return False
        return session.pipes.buffered

    def send(self, sock: zmq.Socket, peer: bytes, reply: list) -> None:
        """A reply to `peer` if it can leave now; else that peer's session ends (no one else waits)."""
        box = self.outboxes.get(peer)
        if box is not None and box.prune() > self.max_queued_bytes:
            self.sessions_.drop(peer, f"{box.bytes / 2**20:.0f} MiB of its replies are unread "
                                      f"(--max-queued-mb {self.max_queued_bytes / 2**20:.0f})")
            return
        reply = [reply[0]] + [f.buffer if isinstance(f, zmq.Frame) else f for f in reply[1:]]   # trackable
        nbytes = sum(memoryview(f).nbytes for f in reply[1:])
        try:
            tracker = sock.send_multipart([peer] + reply, flags=zmq.NOBLOCK, copy=False, track=nbytes > 0)
        except zmq.Again:             # its queue is full (OUTBOUND_PER_PEER replies): it does not read
            self.sessions_.drop(peer, "its replies pile up unread")
            return
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.sessions_.drop(peer, "its connection closed")      # gone before its reply
            return
        if nbytes:
            self.outboxes.setdefault(peer, Outbox()).add(tracker, nbytes)

    def _tidy_outboxes(self) -> None:
        for peer in [p for p, box in self.outboxes.items() if not box.prune()]:
            del self.outboxes[peer]

    # ---- the loop ------------------------------------------------------------------------------------
    def serve_forever(self, on_ready=None) -> None:
        ctx = zmq.Context.instance()
        for warning in check_bind(self.endpoint, self.curve, self.insecure, self.public):
            print(warning, file=sys.stderr, flush=True)
        auth = self.curve.start_authenticator(ctx) if self.curve is not None else None
        try:
            sock, lock = bind_server(self.endpoint, ctx, self.max_msg_bytes, self.curve)
        except BaseException:
            if auth is not None:
                auth.stop()
            raise
        connections = None
        try:
            check_bound(sock.getsockopt_string(zmq.LAST_ENDPOINT), self.public)
            connections = Connections(sock)
            self._install_signals()
            if on_ready:
                on_ready()
            self._loop(sock, connections)
        finally:
            self.sessions_.close_all()
            if connections is not None:
                connections.close(sock)
            sock.close(linger=0)
            if lock is not None:
                lock.release()
            if auth is not None:
                auth.stop()

    def _loop(self, sock: zmq.Socket, connections: Connections) -> None:
        self.poller.register(sock, zmq.POLLIN)
        next_reap = next_drain = time.monotonic() + REAP_EVERY_S
        spin_until, backlog = 0.0, set()        # backlog: peers with a whole call read ahead on their pipe
        while not self.stopping:
            now = time.monotonic()
            if now >= next_reap:     # also while busy: one runner must not shield idle ones
                self.sessions_.reap()
                self._tidy_outboxes()
                next_reap = now + REAP_EVERY_S
            ready = dict(self.poller.poll(0 if backlog or now < spin_until else POLL_MS))
            if not ready or now >= next_drain:      # idle, or every DRAIN_EVERY_S while busy (not per call:
                next_drain = now + DRAIN_EVERY_S    # it costs a few us): a closed connection ends its session
                for fd in connections.drain():
                    self.sessions_.connection_closed(fd)
            turn = [peer for fd, peer in self.sessions_.pipe_peers.items() if fd in ready or peer in backlog]
            backlog = {peer for peer in turn if self.serve_pipe(peer)}      # one call each, in turn
            if turn:
                spin_until = time.monotonic() + self.spin_s
            if sock in ready:
                self._serve_socket(sock, connections)

    def _serve_socket(self, sock: zmq.Socket, connections: Connections) -> None:
        for fd in connections.drain():      # a closed connection is known before its fd can be reused
            self.sessions_.connection_closed(fd)
        frames = sock.recv_multipart(copy=False)
        peer, body = frames[0].bytes, frames[1:]
        who = Peer.of(body[0] if body else frames[0], self.transport)
        if not connections.is_open(who.fd):
            return                   # sent before its connection closed: no one to answer
        try:
            reply = self.handlers.handle(peer, body, who)
        except Exception as e:     # a bug, not bad input (handle answers that): log, answer, go on
            traceback.print_exc()
            reply = [P.error(f"internal server error: {type(e).__name__}: {e}")]
        self.send(sock, peer, reply)

    def _install_signals(self) -> None:
        def stop(signum, frame):
            self.stopping = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)


def describe_endpoint(endpoint: str) -> str:
    return {"ipc": "IPC (unix domain socket)", "tcp": "TCP"}[transport_of(endpoint)]
