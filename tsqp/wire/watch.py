"""The runner's receive watch: what a server can make the runner's libzmq hold, bounded in bytes over tcp.

ZMQ_MAXMSGSIZE caps each frame and ZMQ_RCVHWM counts whole messages, and libzmq hands a message to the
application only once its last frame is in (ypipe: "incomplete items are never flushed"), so one message of
many frames passes both while the runner computes or idles, and the application cannot see it to refuse it.
The kernel can: TCP_INFO's tcpi_bytes_received counts every byte the connection delivered. This thread owns
the socket's monitor (it learns each connection's fd there) and every PERIOD_S compares that count with the
wire bytes of the frames the runner has read (ZMTP framing and CurveZMQ's box are exact per frame); the
difference is what libzmq and the kernel hold for the runner. Past the bound, the server is named hostile and
the connection is shut down under libzmq (which drops the message in progress and frees it), now and on
every reconnection. It never touches the ZeroMQ socket itself (not thread-safe): only the kernel's socket.

Over ipc the kernel keeps no such count for a unix socket: the runner's relay (relay.py) takes it instead.
"""
from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

PERIOD_S = 0.005            # how often the count is compared: the bound's overshoot is the link's rate * this
IDLE_POLL_S = 1.0           # without a tcp connection to count (ipc, or none yet) only events are waited for
HANDSHAKE_BYTES = 64 * 1024  # the ZMTP greeting and handshake (CurveZMQ's HELLO/WELCOME/INITIATE/READY: < 1 KiB)
HEARTBEAT_BYTES_PER_S = 128  # an honest server's PINGs and PONGs (each < 64 bytes, one per 2 s either way)
TCPI_BYTES_RECEIVED = 128    # offset of the u64 tcpi_bytes_received in struct tcp_info (Linux >= 4.1)
CURVE_BOX = 8 + 8 + 16 + 1   # "\x07MESSAGE", the short nonce, the MAC and the flags byte, per frame


def wire_bytes(size: int, curve: bool) -> int:
    """Bytes a frame of `size` bytes took on the wire: its ZMTP 3 header (flags and a 1- or 8-byte length) and,
    with CurveZMQ, the MESSAGE command's box around it."""
    body = size + CURVE_BOX if curve else size
    return body + (2 if body <= 255 else 9)


def kernel_buffer() -> int:
    """The most a tcp connection's receive buffer can grow to here (tcp_rmem's maximum: autotuning)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem") as f:
            return int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 32 * 2**20


class ReceiveWatch(threading.Thread):
    """limit: the most bytes an honest server's replies can have received and unread at once (client.py's
    receive_bound). `violation` names the server's breach once seen; `lost` says an established connection
    went down; either makes `wake_fd` readable for good (the runner's poller watches it)."""

    def __init__(self, monitor: zmq.Socket, endpoint: str, limit: int, curve: bool, relay=None):
        """relay: ipc's relay.Relay, which counts what the server sent (tcp: the kernel does)."""
        super().__init__(daemon=True, name="tsqp-receive-watch")
        self.monitor, self.endpoint, self.limit, self.curve = monitor, endpoint, limit, curve
        self.consumed = 0                 # wire bytes of the frames the runner has read (its thread adds)
        self.violation: str | None = None
        self.lost = self.up = False
        self.conn: socket.socket | None = None
        self.conn_consumed, self.conn_since = 0, time.monotonic()
        self.wake_fd, self._wake_w = os.pipe()
        self.stopping = threading.Event()
        self._stop_r, self._stop_w = os.pipe()               # wakes run() at once when stop() is called
        self.poller = zmq.Poller()
        self.poller.register(monitor, zmq.POLLIN)
        self.poller.register(self._stop_r, zmq.POLLIN)
        if relay is not None:
            relay.watch = self
        self.start()

    def count(self, frames) -> None:
        """The runner read these frames (zmq.Frame or bytes): libzmq holds them no more."""
        self.consumed += sum(wire_bytes(len(f), self.curve) for f in frames)

    def run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(zmq.ZMQError):
                ready = dict(self.poller.poll(int(1000 * (PERIOD_S if self.conn is not None else IDLE_POLL_S))))
                if self.monitor in ready:
                    self._events()
            if self.conn is not None:
                self._check()

    def _events(self) -> None:
        while self.monitor.poll(0):
            msg = recv_monitor_message(self.monitor)
            event = msg["event"]
            if event == zmq.EVENT_CONNECTED:
                self._adopt(msg["value"])
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
            elif event == zmq.EVENT_DISCONNECTED and self.up:
                self.lost = True
                self._wake()

    def _adopt(self, fd: int) -> None:
        """A new connection (libzmq's fd): watch it through a duplicate of our own (libzmq may close its one)."""
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        try:
            conn = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        if conn.family not in (socket.AF_INET, socket.AF_INET6):
            conn.close()                  # ipc: the kernel counts nothing for a unix socket
            return
        self.conn, self.conn_consumed, self.conn_since = conn, self.consumed, time.monotonic()
        if self.violation is not None:
            self._shut()                  # a server named hostile gets no second connection

    def unread(self) -> int:
        """Bytes this connection delivered that the runner has not read as frames: libzmq's queue, the message
        in progress, the kernel's buffer, and the handshake's and heartbeats' bytes (read by libzmq itself)."""
        consumed = self.consumed - self.conn_consumed          # read first: the count below is then the later
        info = self.conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        return struct.unpack_from("<Q", info, TCPI_BYTES_RECEIVED)[0] - consumed

    def held(self) -> int:
        """unread() less the handshake's and the heartbeats' allowance: what the server made libzmq hold."""
        return self.unread() - self.allowance()

    def allowance(self) -> int:
        return int(HANDSHAKE_BYTES + HEARTBEAT_BYTES_PER_S * (time.monotonic() - self.conn_since))

    def _check(self) -> None:
        try:
            held = self.held()
        except OSError:
            return
        if held > self.limit and self.violation is None:
            self._name_hostile(held)
            self._shut()

    def new_connection(self) -> None:
        """The relay made a new connection to the server: count it from here."""
        self.conn_consumed, self.conn_since = self.consumed, time.monotonic()

    def over(self, taken: int) -> bool:
        """The relay took `taken` bytes from the server on this connection: past the bound, name the server
        (the relay then drops the connection)."""
        held = taken - (self.consumed - self.conn_consumed) - self.allowance()
        if held <= self.limit:
            return False
        self._name_hostile(held)
        return True

    def name(self, why: str) -> None:
        self.violation = why
        self._wake()

    def _name_hostile(self, held: int) -> None:
        self.name(f"the server at {self.endpoint} is hostile: it sent {held} bytes that no reply the runner read "
                  f"accounts for, over this runner's receive bound of {self.limit} bytes (one message of many "
                  f"frames, or replies nobody asked for); connection dropped")

    def _shut(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)      # libzmq sees the connection end and frees what it held
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def stop(self) -> None:
        """Stop the thread and close what it owns (the monitor socket included)."""
        self.stopping.set()
        os.write(self._stop_w, b"!")
        self.join(5)
        if self.conn is not None:
            self.conn.close()
        self.monitor.close(linger=0)
        for fd in (self.wake_fd, self._wake_w, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)
