"""Where a runner's calls and the server's replies travel: the ZeroMQ socket, or the two control pipes beside
the arena. Both move whole messages ([header, *frames]) and wait for replies against a deadline."""
from __future__ import annotations

import time

from .pipes import Channel as Pipes
from .transport import Client, ServerTimeout


class SocketChannel:
    """Calls and replies over the session's ZeroMQ socket (frames transport, or shm with --control socket)."""

    def __init__(self, client: Client):
        self.client = client

    def send(self, header: bytes, frames: list, what: str) -> None:
        self.client.send([header, *frames], what=what)

    def receive(self, deadline: float, what: str) -> list[list]:
        """The messages that arrived by the deadline (at least one), each [header, *frames]."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerTimeout(f"no reply from {self.client.endpoint} within {self.client.timeout_s:g} s while "
                                f"waiting for {what}; is `tsqp serve` running there?")
        return [self.client.recv(what, left)]

    def close(self) -> None:
        pass                       # the socket belongs to the session


class PipeChannel:
    """Calls and replies over the control pipes (one wake-up per message instead of ZeroMQ's three threads).
    spin_s: poll this long for each reply before sleeping."""

    def __init__(self, pipes: Pipes, endpoint: str, timeout_s: float, spin_s: float = 0.0):
        self.pipes, self.endpoint, self.timeout_s, self.spin_s = pipes, endpoint, timeout_s, spin_s

    def send(self, header: bytes, frames: list, what: str) -> None:
        try:
            self.pipes.send(header, self.timeout_s)
        except TimeoutError as e:
            raise ServerTimeout(f"could not send {what} to {self.endpoint}: {e}") from None

    def receive(self, deadline: float, what: str) -> list[list]:
        now = time.monotonic()
        spin_until = now + self.spin_s
        while True:
            got = self.pipes.receive()
            if got:
                return [[m] for m in got]
            if now >= deadline:
                raise ServerTimeout(f"no reply from {self.endpoint} within {self.timeout_s:g} s while waiting "
                                    f"for {what} (control pipes); is `tsqp serve` running there?")
            self.pipes.wait(0.0 if now < spin_until else deadline - now)    # poll(0) while spinning
            now = time.monotonic()

    def close(self) -> None:
        self.pipes.close()
