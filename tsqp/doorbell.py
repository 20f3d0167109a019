"""A control channel inside the shared-memory arena: request and reply rings that both sides poll.

Over ZeroMQ a round trip wakes four threads (two application threads, two I/O threads) through the
kernel; under a sandboxed kernel (gVisor) that costs ~0.5 ms, 66 times per token. Here a request is a
JSON header written into a slot, then its sequence number written last; the other side spins on that
number. x86 keeps stores in order (TSO), so a reader that sees the number sees the header.
"""
from __future__ import annotations

import platform
import time

import numpy as np

SLOTS = 16
SLOT_BYTES = 4096
HEAD = 16                                   # u64 sequence number, u32 length, padding
CONTROL_BYTES = 2 * SLOTS * SLOT_BYTES      # requests, then replies, at the start of the arena
SUPPORTED = platform.machine() in ("x86_64", "AMD64", "i686")


class DoorbellError(RuntimeError):
    pass


class Ring:
    def __init__(self, mm, offset: int):
        self.bytes = np.frombuffer(mm, dtype=np.uint8, count=SLOTS * SLOT_BYTES, offset=offset)
        self.slots = self.bytes.reshape(SLOTS, SLOT_BYTES)
        self.seq = self.slots[:, :8].view(np.uint64)[:, 0]       # [SLOTS] (strided view)
        self.size = self.slots[:, 8:12].view(np.uint32)[:, 0]

    def put(self, seq: int, payload: bytes) -> None:
        if len(payload) > SLOT_BYTES - HEAD:
            raise DoorbellError(f"control message of {len(payload)} bytes exceeds {SLOT_BYTES - HEAD}")
        k = seq % SLOTS
        self.slots[k, HEAD:HEAD + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        self.size[k] = len(payload)
        self.seq[k] = seq                     # last: publishes the slot

    def get(self, seq: int) -> bytes | None:
        k = seq % SLOTS
        if int(self.seq[k]) != seq:
            return None
        return self.slots[k, HEAD:HEAD + int(self.size[k])].tobytes()


class Doorbell:
    """Both rings of one arena. The runner puts requests and takes replies; the server the reverse."""

    def __init__(self, mm):
        if not SUPPORTED:
            raise DoorbellError(f"the shared-memory control channel needs x86 store ordering, not {platform.machine()}")
        self.requests, self.replies = Ring(mm, 0), Ring(mm, SLOTS * SLOT_BYTES)

    def wait_reply(self, seq: int, timeout_s: float, what: str, endpoint: str) -> bytes:
        """Spin for the reply; after a millisecond, yield the CPU between looks (long ops take ms anyway)."""
        t0 = time.perf_counter()
        spin_until, deadline = t0 + 1e-3, t0 + timeout_s
        while True:
            reply = self.replies.get(seq)
            if reply is not None:
                return reply
            now = time.perf_counter()
            if now > deadline:
                from .transport import ServerTimeout
                raise ServerTimeout(f"no reply from {endpoint} within {timeout_s:g} s while waiting for {what} "
                                    f"(shared-memory control channel); is `tsqp serve` running there?")
            if now > spin_until:
                time.sleep(20e-6)
