"""ipc only: the runner's libzmq talks to the server through a relay thread of the runner's own, which counts
the bytes it takes from the server (what TCP_INFO counts for a tcp connection: the kernel keeps no such
count for a unix socket). libzmq connects to a socket in a fresh 0700 directory of the runner's; for each
connection it makes there, the relay connects to the server's socket, checks the kernel's word on who that
is (SO_PEERCRED: the runner's own uid), and moves bytes both ways. Once the bytes taken from the server and
not read by the runner as frames pass the receive bound, it stops reading, names the server hostile and
drops both connections (libzmq frees the message in progress): the bound is strict, with no overshoot.
"""
from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
from pathlib import Path

CHUNK = 1 << 20              # bytes read from either side at a time


class Relay(threading.Thread):
    def __init__(self, endpoint: str):
        super().__init__(daemon=True, name="tsqp-ipc-relay")
        self.server_path, self.server_endpoint = endpoint.removeprefix("ipc://"), endpoint
        self.dir = Path(tempfile.mkdtemp(prefix="tsqp-relay-"))        # 0700, a name no one could take first
        self.path = self.dir / "r.ipc"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(4)
        self.endpoint = f"ipc://{self.path}"
        self.watch = None                     # the ReceiveWatch that counts what the runner read (set by it)
        self.taken = 0                        # bytes taken from the server on this connection
        self.pair: tuple[socket.socket, socket.socket] | None = None       # (libzmq's side, the server's)
        self.out = {}                         # socket -> bytes still to write to it
        self.buf = bytearray(CHUNK)
        self._stop_r, self._stop_w = os.pipe()
        self.poll = select.poll()
        self.poll.register(self._stop_r, select.POLLIN)
        self.poll.register(self.listener, select.POLLIN)
        self.events: dict[socket.socket, int] = {}      # what each side of the pair is polled for
        self.start()

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while True:
                ready = self._wait()
                if self._stop_r in ready:
                    return
                if self.listener.fileno() in ready:
                    self._accept()
                if self.pair is not None:
                    self._move(ready)

    def _wait(self) -> dict[int, int]:
        """Readiness of the sockets; a side is read only while its peer has nothing left to write (so the
        relay holds at most CHUNK per direction) and watched for writing while it has."""
        if self.pair is not None:
            for s, peer in (self.pair, self.pair[::-1]):
                events = (select.POLLOUT if self.out.get(s) else 0) | (0 if self.out.get(peer) else select.POLLIN)
                if self.events.get(s) != events:
                    self.poll.modify(s, events)
                    self.events[s] = events
        return dict(self.poll.poll())

    def _accept(self) -> None:
        """libzmq (re)connected: a fresh connection to the server for it, or none (it retries)."""
        zmq_side, _ = self.listener.accept()
        self._drop()
        if self.watch is not None and self.watch.violation is not None:
            zmq_side.close()                  # a server named hostile gets no second connection
            return
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.connect(self.server_path)
        except OSError:
            server.close()
            zmq_side.close()                  # not bound yet: libzmq reconnects, and the hello waits
            return
        pid, uid, _ = struct.unpack("3i", server.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.getuid():
            self._refuse(f"the server on {self.server_endpoint} runs as uid {uid} (pid {pid}), not as this user "
                         f"(uid {os.getuid()}); refusing to talk to it", (zmq_side, server))
            return
        for s in (zmq_side, server):
            s.setblocking(False)
        self.pair, self.taken = (zmq_side, server), 0
        for s in self.pair:
            self.poll.register(s, select.POLLIN)
            self.events[s] = select.POLLIN
        if self.watch is not None:
            self.watch.new_connection()

    def _move(self, ready: dict[int, int]) -> None:
        for src, dst in (self.pair, self.pair[::-1]):
            if self.out.get(dst) and ready.get(dst.fileno(), 0) & (select.POLLOUT | select.POLLERR):
                self._write(dst, self.out.pop(dst))
            if self.pair is None:
                return
            if ready.get(src.fileno(), 0) & (select.POLLIN | select.POLLHUP | select.POLLERR) and not self.out.get(dst):
                try:
                    n = src.recv_into(self.buf)
                except BlockingIOError:
                    continue
                except OSError:
                    n = 0
                if n == 0:
                    self._drop()              # either side left: so does the other (libzmq: a disconnect)
                    return
                if src is self.pair[1]:
                    self.taken += n
                    if self.watch is not None and self.watch.over(self.taken):
                        self._drop()          # libzmq sees the connection end and frees what it held
                        return
                self._write(dst, bytes(self.buf[:n]))

    def _write(self, dst: socket.socket, data: bytes) -> None:
        try:
            sent = dst.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop()                      # that side is gone: so is the other
            return
        if sent < len(data):
            self.out[dst] = data[sent:]

    def _refuse(self, why: str, pair) -> None:
        for s in pair:
            s.close()
        if self.watch is not None:
            self.watch.name(why)

    def _drop(self) -> None:
        if self.pair is not None:
            for s in self.pair:
                with contextlib.suppress(KeyError, ValueError):
                    self.poll.unregister(s)
                s.close()
        self.pair, self.out, self.events = None, {}, {}

    def stop(self) -> None:
        os.write(self._stop_w, b"!")
        self.join(5)
        self._drop()
        self.listener.close()
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)
