"""Per-run statistics: the table the team has worked with, and the same figures as JSON."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

TRUSTED_OPS = ("rmsnorm", "rope", "attention", "silu", "other")


@dataclass
class Stats:
    rpc_calls: int = 0
    rpc_time_s: float = 0.0        # sum over calls of request sent -> reply received
    wait_s: float = 0.0            # time the runner sat blocked on replies
    serialize_s: float = 0.0       # turning tensors into frames / arena slots
    deserialize_s: float = 0.0     # turning replies back into tensors
    sent_bytes: int = 0            # through the socket (headers and tensor frames)
    received_bytes: int = 0
    shm_sent_bytes: int = 0        # tensor bytes handed over in shared memory
    shm_received_bytes: int = 0
    server_compute_s: float = 0.0  # measured on the server, device synchronised
    total_s: float = 0.0
    trusted_s: dict = field(default_factory=lambda: dict.fromkeys(TRUSTED_OPS, 0.0))

    @contextmanager
    def timer(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(name, time.perf_counter() - t0)

    def add_time(self, name: str, seconds: float) -> None:
        self.trusted_s[name] = self.trusted_s.get(name, 0.0) + seconds

    def reset(self) -> None:
        self.__init__()

    @property
    def bytes_moved(self) -> int:
        return self.sent_bytes + self.received_bytes + self.shm_sent_bytes + self.shm_received_bytes

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "trusted_s"}
        d["trusted_s"] = dict(self.trusted_s)
        d["trusted_total_s"] = sum(self.trusted_s.values())
        d["rpc_ms_per_call"] = 1e3 * self.rpc_time_s / max(self.rpc_calls, 1)
        d["bytes_moved"] = self.bytes_moved
        return d

    def table(self, title: str = "tsqp run") -> Table:
        t = Table(title=title, show_header=True)
        t.add_column("metric")
        t.add_column("value", justify="right")
        mb = 1 / 2**20
        rows = [
            ("RPC calls", f"{self.rpc_calls}"),
            ("RPC time", f"{self.rpc_time_s:.4f} s ({1e3 * self.rpc_time_s / max(self.rpc_calls, 1):.3f} ms/call)"),
            ("waiting on replies", f"{self.wait_s:.4f} s"),
            ("serialize", f"{self.serialize_s:.4f} s"),
            ("deserialize", f"{self.deserialize_s:.4f} s"),
            ("sent (socket)", f"{self.sent_bytes * mb:.2f} MB"),
            ("received (socket)", f"{self.received_bytes * mb:.2f} MB"),
            ("sent (shared memory)", f"{self.shm_sent_bytes * mb:.2f} MB"),
            ("received (shared memory)", f"{self.shm_received_bytes * mb:.2f} MB"),
            ("server compute", f"{self.server_compute_s:.4f} s"),
        ]
        rows += [(f"trusted: {k}", f"{v:.4f} s") for k, v in self.trusted_s.items()]
        rows.append(("total", f"{self.total_s:.4f} s"))
        for r in rows:
            t.add_row(*r)
        return t

    def print(self, title: str = "tsqp run") -> None:
        Console().print(self.table(title))
