"""`tsqp diagnose`: a real run against its own echo servers, and the environment report's socket checks
(a live server's report is tested in test_shm.py, next to its server)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import short_endpoint
from tsqp.commands.diagnose import TRANSPORTS, inspect_endpoint, parse_size

KEYS = ("transport", "size_bytes", "p50_us", "p99_us", "bandwidth_GBps")


def stale_socket(path: Path) -> None:
    """A dead server's socket file: bound, then the socket is gone and the file stays."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def test_quick_run_reports_all_transports_verdicts_and_environment(tmp_path):
    out = tmp_path / "out.json"
    endpoint = short_endpoint()
    sock = Path(endpoint.removeprefix("ipc://"))
    stale_socket(sock)
    try:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")},
               "LLAMA_IPC_PATH": str(sock)}                     # the environment selects it, no --endpoint
        r = subprocess.run([sys.executable, "-m", "tsqp.cli", "diagnose", "--quick", "--json", str(out)],
                           capture_output=True, text=True, timeout=120, env=env)
    finally:
        sock.unlink()
        sock.parent.rmdir()
    assert r.returncode == 0, r.stdout + r.stderr
    d = json.loads(out.read_text())

    rows = d["rows"]
    assert {row["transport"] for row in rows} == set(TRANSPORTS)
    for t in TRANSPORTS:
        sizes = sorted(row["size_bytes"] for row in rows if row["transport"] == t)
        assert sizes == sorted(d["settings"]["sizes"]) and 16 * 2**20 in sizes, (t, sizes)
    for row in rows:
        assert all(k in row for k in KEYS), row
        assert 0 < row["p50_us"] <= row["p99_us"]
        # bandwidth is the echo's bytes (there and back) over the median round trip
        assert abs(row["bandwidth_GBps"] - 2 * row["size_bytes"] / row["p50_us"] / 1e3) < 1e-6 * row["bandwidth_GBps"]
    assert {lat["transport"] for lat in d["latency"]} == set(TRANSPORTS)

    checks = {v["check"]: v for v in d["verdicts"]}
    assert {"ipc round trip", "ipc vs tcp", "shm", "shm vs ipc at 16 MiB"} <= set(checks)
    assert all(v["status"] in ("ok", "warn", "problem") and v["detail"] for v in d["verdicts"])

    e = d["env"]
    assert e["selected_endpoint"] == [endpoint, f"LLAMA_IPC_PATH={sock}"]
    assert e["endpoint"]["endpoint"] == endpoint and e["endpoint"]["status"] == "stale"
    assert any("no server answers" in p for p in e["endpoint"]["problems"])
    v = e["versions"]
    assert v["python"] and v["torch"] and v["libzmq"] and v["pyzmq"] and "cuda" in v and "gpu" in v
    assert e["shm"]["free_bytes"] > 0
    assert (d["cuda_copies"] is None) == (not v["cuda_available"])
    for word in ("ipc p50 us", "tcp GB/s", "shm GB/s", "16 MiB", "shm / ipc"):
        assert word in r.stdout, word


def test_environment_report_names_missing_stale_and_open_sockets():
    endpoint = short_endpoint()
    path = Path(endpoint.removeprefix("ipc://"))
    try:
        missing = inspect_endpoint(endpoint)
        assert missing["status"] == "missing" and str(path) in missing["problems"][0]

        stale_socket(path)
        os.chmod(path, 0o666)
        stale = inspect_endpoint(endpoint)
        assert stale["status"] == "stale" and stale["is_socket"] and stale["mode"] == "0o666"
        assert any("no server answers" in p for p in stale["problems"])
        assert any("other users may connect" in p for p in stale["problems"])
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()
    assert inspect_endpoint("udp://x")["status"] == "invalid"


def test_sizes_parse():
    assert [parse_size(s) for s in ("4K", "16M", "16MiB", "65536")] == [4096, 16 * 2**20, 16 * 2**20, 65536]
