"""The compute server (untrusted side): holds the weights on its device and answers offload requests.

One ROUTER socket and each session's control pipes, one thread, requests served in order. The loop here
moves messages; `handlers` decides what they mean; `sessions` keeps who is connected.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback

import torch
import zmq

from ..wire import protocol as P
from ..wire.keys import ServerCurve, check_bind
from ..wire.pipes import PipeError
from ..wire.transport import MAX_MSG_BYTES, Client, ServerTimeout, TransportError, bind_server, ipc_path, transport_of
from .compute import Compute
from .handlers import Handlers
from .sessions import Sessions

POLL_MS = 100
REAP_EVERY_S = 1.0
PIPE_SEND_S = 1.0   # a runner that leaves its reply pipe full this long loses its session


class Server:
    def __init__(self, compute: Compute, norms: dict[str, torch.Tensor], endpoint: str, model: str,
                 max_sessions: int = 8, idle_timeout_s: float = 600.0, max_msg_bytes: int = MAX_MSG_BYTES,
                 curve: ServerCurve | None = None, insecure: bool = False, public: bool = False,
                 spin_s: float = 0.0, recorder=None):
        """idle_timeout_s: a session without a known pid (tcp) is dropped after this long unheard (0: never).
        curve / insecure / public: the tcp:// policy (keys.check_bind). recorder: `--record DIR`."""
        self.endpoint, self.max_msg_bytes = endpoint, max_msg_bytes
        self.curve, self.insecure, self.public = curve, insecure, public
        self.spin_s = spin_s      # after a call from the pipes, poll this long for the next before sleeping
        self.stopping = False
        self.poller = zmq.Poller()            # the socket, and each session's control pipe
        self.sessions_ = Sessions(max_sessions, idle_timeout_s, self._follow_pipe)
        self.handlers = Handlers(compute, norms, self.sessions_, endpoint, model, recorder)

    @property
    def sessions(self) -> dict:
        return self.sessions_.by_peer

    def handle(self, peer: bytes, frames: list) -> list:
        return self.handlers.handle(peer, frames)

    def reap(self) -> list[bytes]:
        return self.sessions_.reap()

    def drop(self, peer: bytes) -> None:
        self.sessions_.drop(peer)

    def _follow_pipe(self, fd: int, added: bool) -> None:
        if added:
            self.poller.register(fd, zmq.POLLIN)
        else:
            self.poller.unregister(fd)

    def serve_pipe(self, peer: bytes) -> None:
        """Serve the calls that arrived on a session's control pipe, in order; replies go back the same way."""
        session = self.sessions_.get(peer)
        if session is None or session.pipes is None:
            return
        try:
            messages = session.pipes.receive()
        except PipeError as e:        # framing lost: say why on the reply pipe, then end the session
            with contextlib.suppress(TimeoutError, OSError):
                session.pipes.send(P.error(f"control pipe: {e}; session dropped"), 0.1)
            self.sessions_.drop(peer, str(e))
            return
        for payload in messages:
            try:
                reply = self.handlers.call(peer, [payload])[0] if P.is_binary(payload) else \
                    P.error("the control pipes carry calls only")
            except Exception as e:     # a bug, not bad input (call answers that): log, answer, go on
                traceback.print_exc()
                reply = P.error(f"internal server error: {type(e).__name__}: {e}")
            try:
                session.pipes.send(reply, PIPE_SEND_S)
            except (TimeoutError, OSError) as e:
                self.sessions_.drop(peer, f"its reply pipe: {e}")
                return

    # ---- the loop ------------------------------------------------------------------------------------
    def serve_forever(self, on_ready=None) -> None:
        ctx = zmq.Context.instance()
        for warning in check_bind(self.endpoint, self.curve, self.insecure, self.public):
            print(warning, file=sys.stderr, flush=True)
        claim_endpoint(self.endpoint, ctx)
        auth = self.curve.start_authenticator(ctx) if self.curve is not None else None
        try:
            sock = bind_server(self.endpoint, ctx, self.max_msg_bytes, self.curve)
        except BaseException:
            if auth is not None:
                auth.stop()
            raise
        self._install_signals()
        if on_ready:
            on_ready()
        self.poller.register(sock, zmq.POLLIN)
        next_reap = time.monotonic() + REAP_EVERY_S
        spin_until = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_reap:     # also while busy: one runner must not shield dead ones
                    self.sessions_.reap()
                    next_reap = now + REAP_EVERY_S
                ready = dict(self.poller.poll(0 if now < spin_until else POLL_MS))
                pipe_peers = self.sessions_.pipe_peers
                for fd in [fd for fd in ready if fd in pipe_peers]:
                    if fd in pipe_peers:         # not dropped while serving another pipe
                        self.serve_pipe(pipe_peers[fd])
                        spin_until = time.monotonic() + self.spin_s
                if sock not in ready:
                    continue
                frames = sock.recv_multipart(copy=False)
                peer, body = frames[0].bytes, frames[1:]
                try:
                    reply = self.handlers.handle(peer, body)
                except Exception as e:     # a bug, not bad input (handle answers that): log, answer, go on
                    traceback.print_exc()
                    reply = [P.error(f"internal server error: {type(e).__name__}: {e}")]
                sock.send_multipart([peer] + reply, copy=False)
        finally:
            self.sessions_.close_all()
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            path = ipc_path(self.endpoint)
            if path is not None:
                path.unlink(missing_ok=True)

    def _install_signals(self) -> None:
        def stop(signum, frame):
            self.stopping = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)


def claim_endpoint(endpoint: str, ctx: zmq.Context) -> None:
    """Refuse an ipc socket file that another user owns or a live server answers on; remove a stale one."""
    path = ipc_path(endpoint)
    if path is None or not path.exists():
        return
    st = path.lstat()
    if st.st_uid != os.getuid():
        raise TransportError(f"{path} belongs to uid {st.st_uid}; refusing to bind over another user's socket")
    probe = Client(endpoint, timeout_s=1.0, ctx=ctx)
    try:
        probe.send([P.encode({"type": "info"})])
        probe.recv("info")
    except ServerTimeout:
        path.unlink(missing_ok=True)     # stale: nobody answers
        return
    finally:
        probe.close()
    raise TransportError(f"a live server already answers on {endpoint}; refusing to take it over")


def describe_endpoint(endpoint: str) -> str:
    return {"ipc": "IPC (unix domain socket)", "tcp": "TCP"}[transport_of(endpoint)]
