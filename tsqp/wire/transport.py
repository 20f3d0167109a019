"""ZeroMQ plumbing: endpoints, sockets with timeouts, multipart frames. It moves bytes; protocol.py knows
what they mean."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import zmq

from ..files import create_private

MAX_MSG_BYTES = 4 * 2**30   # ZMQ_MAXMSGSIZE on the server: larger messages are dropped by libzmq
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 2000, 10000   # tcp only: notice peers that vanished without a FIN


class TransportError(RuntimeError):
    pass


class ServerTimeout(TransportError):
    """No reply within the timeout; names the endpoint and what was waited for."""


def transport_of(endpoint: str) -> str:
    if endpoint.startswith("ipc://"):
        return "ipc"
    if endpoint.startswith("tcp://"):
        return "tcp"
    raise TransportError(f"endpoint '{endpoint}' must start with ipc:// or tcp://")


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None


class Client:
    """A DEALER socket: several requests may be in flight; every receive is a timed poll."""

    def __init__(self, endpoint: str, timeout_s: float, ctx: zmq.Context | None = None, curve=None):
        """curve: a keys.ClientCurve (CurveZMQ: encrypted, and authenticated by the server), or None."""
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.transport = transport_of(endpoint)
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))   # a full queue to a dead server
        if self.transport == "tcp":
            heartbeat(self.sock)
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def send(self, frames: list, copy: bool = False, block: bool = True, what: str = "a request") -> None:
        try:
            self.sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            raise ServerTimeout(f"could not send {what} to {self.endpoint} within {self.timeout_s:g} s (no "
                                f"connection); is `tsqp serve` running there?") from None

    def recv(self, waiting_for: str, timeout_s: float | None = None) -> list[zmq.Frame]:
        t = self.timeout_s if timeout_s is None else timeout_s
        if not self.poller.poll(int(t * 1000)):
            raise ServerTimeout(f"no reply from {self.endpoint} within {t:g} s while waiting for {waiting_for}; "
                                f"is `tsqp serve` running there?")
        return self.sock.recv_multipart(copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


def heartbeat(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


def check_ipc_owner(endpoint: str) -> None:
    """A runner connects only to a socket file owned by its own user (or root): in a shared directory
    like /tmp, another user could bind the path first and receive the runner's activations."""
    path = ipc_path(endpoint)
    if path is None:
        return
    try:
        st = path.lstat()
    except FileNotFoundError:
        return                  # nothing there yet: the hello times out with a clear message
    if st.st_uid not in (os.getuid(), 0):
        raise TransportError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
                             f"refusing to send anything to it")


def private_parent(path: Path) -> None:
    """Create missing parent directories 0700; warn when an existing one lets others replace the socket."""
    create_private(path.parent)
    st = path.parent.stat()
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        print(f"WARNING: {path.parent} is writable by other users and not sticky: they could replace "
              f"{path.name}; use a directory of your own (mode 0700)", file=sys.stderr)


def bind_server(endpoint: str, ctx: zmq.Context, max_msg_bytes: int = MAX_MSG_BYTES, curve=None) -> zmq.Socket:
    """A ROUTER socket. curve: a keys.ServerCurve (its authenticator must be running), or None."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    if curve is not None:
        curve.apply(sock)
    path = ipc_path(endpoint)
    if path is not None:
        private_parent(path)
        old = os.umask(0o177)        # the socket file is created owner-only
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    else:
        heartbeat(sock)
        sock.bind(endpoint)
    return sock
