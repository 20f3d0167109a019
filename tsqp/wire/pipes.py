"""A control channel beside the arena: two named pipes that carry the calls' headers, one each way.

Over ZeroMQ a message wakes three threads (the sender's I/O thread, the receiver's I/O thread, the
receiver itself); in a VM each wake of a halted vCPU is an exit to the host, ~0.1 ms. A pipe wakes the
reader directly: a round trip of ~20 us instead of ~130 us here. The runner creates the pipes next to its
arena file (0600 in the 0700 directory); the server opens them and unlinks them at once, as with the arena.
Both sides open them read-write, so neither open blocks, and no write fails because the other side left.

A message is a u32 length (little-endian) and that many bytes (a JSON header).
"""
from __future__ import annotations

import os
import select
import stat
import struct
import time
from pathlib import Path

LENGTH = struct.Struct("<I")
MAX_MESSAGE = 1 << 20          # a header is ~0.3 KiB; a length beyond this means the stream is corrupt
SUFFIXES = (".req", ".rep")    # runner -> server, server -> runner
READ_BYTES = 1 << 16           # a pipe's default capacity


class PipeError(RuntimeError):
    pass


def pipe_paths(arena_path: Path) -> tuple[Path, Path]:
    return tuple(arena_path.with_name(arena_path.name + s) for s in SUFFIXES)


def make_pipes(arena_path: Path) -> tuple[Path, Path]:
    """Runner side: create both pipes, owner-only, beside the arena file."""
    paths = pipe_paths(arena_path)
    for p in paths:
        os.mkfifo(p, 0o600)
    return paths


def open_pipe(path: Path) -> int:
    """Read-write and non-blocking; refuses anything but an owner-only pipe of this user."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISFIFO(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        raise PipeError(f"{path} is not an owner-only pipe of uid {os.getuid()}")
    return fd


class Channel:
    """One direction each: write messages to `out_fd`, read them from `in_fd`. max_message: the longest
    message the reader accepts (the runner reads replies: a header or an error, far below MAX_MESSAGE)."""

    def __init__(self, in_fd: int, out_fd: int, max_message: int = MAX_MESSAGE):
        self.in_fd, self.out_fd, self.max_message = in_fd, out_fd, max_message
        self.read_limit = LENGTH.size + max_message + READ_BYTES    # per receive(): a peer writing without
        self.buf = bytearray()                                      # pause cannot keep us reading forever
        self.poll_in = select.poll()
        self.poll_in.register(in_fd, select.POLLIN)
        self.poll_out = select.poll()
        self.poll_out.register(out_fd, select.POLLOUT)

    def send(self, payload: bytes, timeout_s: float) -> None:
        """Write one message; waits (up to timeout_s) only while the pipe is full."""
        if len(payload) > MAX_MESSAGE:
            raise PipeError(f"control message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
        data = LENGTH.pack(len(payload)) + payload
        try:
            n = os.write(self.out_fd, data)      # all of it, unless the pipe is (nearly) full
        except BlockingIOError:
            n = 0
        if n < len(data):
            self._send_rest(memoryview(data)[n:], timeout_s)

    def _send_rest(self, data: memoryview, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while data:
            try:
                data = data[os.write(self.out_fd, data):]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not self.poll_out.poll(left * 1000):
                    raise TimeoutError(f"the control pipe stayed full for {timeout_s:g} s") from None

    def receive(self, limit: int | None = None) -> list[bytes]:
        """The messages that arrived whole so far, at most `limit` of them (the rest wait in the buffer: see
        `buffered`). Never blocks; holds at most read_limit bytes read ahead. One read (a pipe's capacity):
        what is left in the pipe keeps it readable for the caller's next poll."""
        if len(self.buf) < self.read_limit:
            try:
                self.buf += os.read(self.in_fd, READ_BYTES)
            except BlockingIOError:      # (a signal does not end a read early: Python retries it, PEP 475)
                pass
        out = []
        while len(self.buf) >= LENGTH.size and (limit is None or len(out) < limit):
            (n,) = LENGTH.unpack_from(self.buf)
            if n > self.max_message:
                raise PipeError(f"control message length {n} exceeds {self.max_message}: the stream is corrupt")
            if len(self.buf) < LENGTH.size + n:
                break
            out.append(bytes(self.buf[LENGTH.size:LENGTH.size + n]))
            del self.buf[:LENGTH.size + n]
        return out

    @property
    def buffered(self) -> bool:
        """Whether a whole message already waits in the buffer (a poll of the pipe would not say so)."""
        if len(self.buf) < LENGTH.size:
            return False
        return len(self.buf) >= LENGTH.size + LENGTH.unpack_from(self.buf)[0]

    def wait(self, timeout_s: float) -> bool:
        """Block until something arrives (True) or timeout_s passes (False)."""
        return bool(self.poll_in.poll(max(0.0, timeout_s) * 1000))

    def close(self) -> None:
        for fd in {self.in_fd, self.out_fd}:
            try:
                os.close(fd)
            except OSError:
                pass
