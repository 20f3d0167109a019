"""Who sent a message, and whether their connection still stands: the kernel's word and libzmq's, never
the runner's.

Each message the ROUTER socket receives carries, from libzmq, the connection it came on (ZMQ_SRCFD) and
what the kernel said about that connection when it was accepted: over ipc:// the peer's uid, gid and pid
(SO_PEERCRED, in "Peer-Address"), over tcp:// its address, and with CurveZMQ its public key ("User-Id",
set by the authenticator). A socket monitor reports each connection accepted and closed, by fd; the
server drains it before it reads each message, so it learns of a closed connection before it could see
a message from a new one that reuses the fd.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from ..wire.transport import peer_creds

EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
EVENTS_OPTION, READABLE = int(zmq.EVENTS), int(zmq.POLLIN)   # plain ints: pyzmq's enums cost microseconds


@dataclass(frozen=True)
class Peer:
    user: str               # whom the per-user quota counts: "uid N", a CurveZMQ key, or an address
    uid: int | None = None  # ipc: the connecting process's uid (SO_PEERCRED)
    pid: int | None = None  # ipc: the connecting process (SO_PEERCRED): where its memfd arena is found
    fd: int | None = None   # the connection it came on; the session ends when that closes

    @classmethod
    def of(cls, frame: zmq.Frame, transport: str) -> "Peer":
        fd = srcfd(frame)
        if transport == "ipc":
            creds = peer_creds(frame)
            if creds is None:
                return cls("unknown", None, None, fd)
            return cls(f"uid {creds.uid}", creds.uid, creds.pid, fd)
        user = metadata(frame, "User-Id")            # the client's CurveZMQ key, when the server has keys
        return cls(user if user and user != "anonymous" else metadata(frame, "Peer-Address") or "unknown",
                   None, None, fd)


THIS_PROCESS = Peer(f"uid {os.getuid()}", os.getuid(), os.getpid(), None)   # in-process callers (tests)


def metadata(frame: zmq.Frame, name: str) -> str | None:
    try:
        return frame.get(name)
    except (AttributeError, zmq.ZMQError):
        return None


def srcfd(frame: zmq.Frame) -> int | None:
    try:
        return frame.get(zmq.SRCFD)
    except (AttributeError, zmq.ZMQError):
        return None


class Connections:
    """The ROUTER socket's open connections, by fd, from its monitor."""

    def __init__(self, sock: zmq.Socket):
        self.monitor = sock.get_monitor_socket(EVENTS)
        self.open: set[int] = set()

    def drain(self) -> list[int]:
        """Take every pending event; returns the fds of connections closed since the last call."""
        closed = []
        while self.monitor.get(EVENTS_OPTION) & READABLE:   # asked first: a failed recv costs an exception
            event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.open.add(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.open.discard(fd)
                closed.append(fd)
        return closed

    def is_open(self, fd: int | None) -> bool:
        return fd is None or fd in self.open

    def close(self, sock: zmq.Socket) -> None:
        sock.disable_monitor()
        self.monitor.close(linger=0)
