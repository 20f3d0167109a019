"""ZeroMQ plumbing: endpoints, sockets with timeouts, multipart frames. It moves bytes; protocol.py knows
what they mean."""
from __future__ import annotations

import os
from pathlib import Path

import zmq

MAX_MSG_BYTES = 4 * 2**30   # ZMQ_MAXMSGSIZE on the server: larger messages are dropped by libzmq


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

    def __init__(self, endpoint: str, timeout_s: float, ctx: zmq.Context | None = None):
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.transport = transport_of(endpoint)
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def send(self, frames: list, copy: bool = False) -> None:
        self.sock.send_multipart(frames, copy=copy)

    def recv(self, waiting_for: str, timeout_s: float | None = None) -> list[zmq.Frame]:
        t = self.timeout_s if timeout_s is None else timeout_s
        if not self.poller.poll(int(t * 1000)):
            raise ServerTimeout(f"no reply from {self.endpoint} within {t:g} s while waiting for {waiting_for}; "
                                f"is `tsqp serve` running there?")
        return self.sock.recv_multipart(copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


def bind_server(endpoint: str, ctx: zmq.Context) -> zmq.Socket:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_BYTES)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    path = ipc_path(endpoint)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)        # the socket file is created owner-only
        try:
            sock.bind(endpoint)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
    else:
        sock.bind(endpoint)
    return sock
