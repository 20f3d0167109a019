"""Start and stop `tsqp serve` processes for the commands that bring their own (bench, diagnose)."""
from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_ipc_endpoint(tag: str = "srv") -> str:
    """A fresh ipc endpoint in an owner-only temporary directory (short: socket paths max ~100 bytes)."""
    return f"ipc://{tempfile.mkdtemp(prefix='tsqp-', dir='/tmp')}/{tag}.ipc"


def start_server(endpoint: str | None, model: str | None = "random:tiny", dtype: str = "float32",
                 device: str = "cpu", extra: tuple[str, ...] = (), env: dict | None = None,
                 insecure_tcp: bool = True) -> subprocess.Popen:
    """`tsqp serve` as a real process, its output piped (wait_ready reads it); `proc.endpoint` is where it
    binds. model=None leaves model, device, dtype and endpoint to `extra` and the environment."""
    cmd = [sys.executable, "-m", "tsqp.cli", "serve"]
    if model is not None:
        cmd += ["--model", str(model), "--device", device, "--dtype", dtype, "--endpoint", endpoint]
    cmd += list(extra)
    if insecure_tcp and endpoint and endpoint.startswith("tcp://"):
        cmd.append("--insecure")     # our own server on 127.0.0.1, for timing only: plain tcp, said so
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"})
    proc.endpoint = endpoint
    return proc


def wait_ready(procs: list[subprocess.Popen], timeout_s: float = 120.0) -> list[str]:
    """Block until every server printed its `ready` line; a server that exits or stays silent is an error.
    Returns each one's banner (also as proc.banner)."""
    sel = selectors.DefaultSelector()
    bufs = {}
    for p in procs:
        sel.register(p.stdout, selectors.EVENT_READ, p)
        bufs[p] = b""
    deadline = time.monotonic() + timeout_s
    try:
        while any(b"ready in" not in b for b in bufs.values()):
            left = deadline - time.monotonic()
            events = sel.select(left) if left > 0 else []
            if not events:
                raise RuntimeError(f"server not ready within {timeout_s:g} s")
            for key, _ in events:
                p = key.data
                chunk = os.read(key.fileobj.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"server exited before ready:\n{bufs[p].decode(errors='replace')}")
                bufs[p] += chunk
                if b"ready in" in bufs[p]:
                    sel.unregister(key.fileobj)
    finally:
        sel.close()
    for p in procs:
        p.banner = bufs[p].decode(errors="replace")
    return [p.banner for p in procs]


def stop_servers(procs: list[subprocess.Popen]) -> None:
    for p in procs:              # signal all first: they shut down in parallel
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        p.stdout.close()
