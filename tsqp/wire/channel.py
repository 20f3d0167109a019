"""Where a runner's calls and the server's replies travel: the ZeroMQ socket, or the two control pipes beside
the arena. Both move whole messages ([header bytes, *frames]) and wait for replies against a deadline that the
caller fixed (one per call, from its submit), whatever else arrives meanwhile. `what` names the wait in
errors (anything printable: made into text only when an error needs it)."""
from __future__ import annotations

import time

import zmq

from .pipes import Channel as Pipes
from .transport import Client, ServerTimeout
from .relay import Relay
from .watch import ReceiveWatch


class ConnectionLost(ServerTimeout):
    """No reply can come any more: the connection dropped (said at once, not at the deadline). A server that
    went away, or one that sent a frame over the runner's receive cap (libzmq drops the connection)."""


MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class MonitoredSocket(zmq.Socket):
    """A DEALER whose monitor starts with it, before it connects, so no event of its first connection is missed
    (a monitor attached after connect() races the handshake)."""
    watch = None          # its monitor's PAIR socket (a class attribute: pyzmq takes other names for options)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.type == zmq.DEALER:
            self.watch = self.get_monitor_socket(MONITORED)


class RunnerContext(zmq.Context):
    """The runner's own ZeroMQ context: its DEALER sockets are monitored from birth (see SocketChannel)."""
    _socket_class = MonitoredSocket


class SocketChannel:
    """Calls and replies over the session's ZeroMQ socket (the control messages; the calls too with the frames
    transport or shm with --control socket). Its receive watch (watch.py) reads the socket's monitor: a
    dropped connection is told at once (the session is gone with it: a reconnection gets a new identity, so
    waiting on would only delay the error), and so is a server that made the runner hold more than its bound.
    A connection that never completed its handshake (a CurveZMQ server refusing the key) is not a drop: that
    wait ends at the deadline, as before."""

    def __init__(self, client: Client, receive_cap: int, limit: int, relay: Relay | None = None):
        """client: made in a RunnerContext (its socket carries its monitor); limit: client.receive_bound;
        relay: ipc's, which the client connects through (this channel stops it with the watch)."""
        self.client, self.receive_cap, self.relay = client, receive_cap, relay
        self.watch = ReceiveWatch(client.sock.watch, client.endpoint, limit, client.curve, relay)
        self.poller = zmq.Poller()
        self.poller.register(client.sock, zmq.POLLIN)
        self.poller.register(self.watch.wake_fd, zmq.POLLIN)

    def send(self, header: bytes, frames: list, what) -> None:
        self.client.send([header, *frames], what=what)

    def receive(self, deadline: float, what, timeout_s: float | None = None) -> list[list]:
        """The messages that arrived by the deadline (at least one), each [header, *frames]. timeout_s: the
        wait the deadline stands for, as the message says it (default: the session's reply timeout)."""
        left = deadline - time.monotonic()
        ready = dict(self.poller.poll(max(0, int(left * 1000)))) if left > 0 else {}
        if self.watch.violation is not None:
            raise ConnectionLost(f"{self.watch.violation} while waiting for {what}")
        if self.client.sock in ready:         # a reply that came before a drop is still read
            header, *frames = self.client.sock.recv_multipart(copy=False)
            self.watch.count((header, *frames))
            return [[header.bytes, *frames]]
        if self.watch.lost:
            raise ConnectionLost(f"the connection to {self.client.endpoint} dropped while waiting for {what}: "
                                 f"the server went away, or sent a frame over this runner's receive cap of "
                                 f"{self.receive_cap} bytes")
        t = self.client.timeout_s if timeout_s is None else timeout_s
        raise ServerTimeout(f"no reply from {self.client.endpoint} within {t:g} s while waiting for {what}; "
                            f"is `tsqp serve` running there?")

    def close(self) -> None:
        self.client.sock.disable_monitor()
        self.watch.stop()
        if self.relay is not None:
            self.relay.stop()


class PipeChannel:
    """Calls and replies over the control pipes (one wake-up per message instead of ZeroMQ's three threads).
    spin_s: poll for each reply this long before sleeping."""

    def __init__(self, pipes: Pipes, endpoint: str, timeout_s: float, spin_s: float = 0.0):
        self.pipes, self.endpoint, self.timeout_s, self.spin_s = pipes, endpoint, timeout_s, spin_s

    def send(self, header: bytes, frames: list, what) -> None:
        try:
            self.pipes.send(header, self.timeout_s)
        except TimeoutError as e:
            raise ServerTimeout(f"could not send {what} to {self.endpoint}: {e}") from None

    def receive(self, deadline: float, what) -> list[list]:
        now = time.monotonic()
        spin_until = now + self.spin_s
        while True:
            # wait first: a reply is seldom there already, and reading an empty pipe costs an exception (a
            # receive() takes every whole message read, so none waits in the buffer)
            if self.pipes.wait(0.0 if now < spin_until else deadline - now):
                got = self.pipes.receive()
                if got:
                    return [[m] for m in got]
            now = time.monotonic()
            if now >= deadline:
                raise ServerTimeout(f"no reply from {self.endpoint} within {self.timeout_s:g} s while waiting "
                                    f"for {what} (control pipes); is `tsqp serve` running there?")

    def close(self) -> None:
        self.pipes.close()
