"""`tsqp diagnose`: what the transport costs on this machine, and what is wrong with the environment.

It starts its own echo servers (real `tsqp serve` processes on a temporary ipc path and a free
127.0.0.1 port) and times the server's "echo" message: a header-only round trip (latency), then
payloads of 4 KiB..64 MiB as ZeroMQ frames over ipc:// and tcp://, and through a shared-memory arena.
Each transport is timed the way tsqp uses it: frames are sent zero-copy from the runner's tensor and
used in place on arrival; in the arena the payload sits where the runner's op wrote it, the server reads
it and writes a result of the same size (a memcpy the frames echo does not even do), and the runner
uses the result in place. Every round trip moves the payload there and back: bandwidth = 2 * size / p50.
"""
from __future__ import annotations

import os
import platform
import shutil
import stat
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import zmq
from rich.console import Console
from rich.table import Table

from ..config import env_endpoint
from .files import write_json
from ..wire import protocol as P
from ..wire import shm
from .launch import free_tcp_port, start_server, stop_servers, wait_ready
from ..wire.client import RemoteError, RemoteOffload
from ..wire.transport import Client, ServerTimeout, TransportError, ipc_path, transport_of

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

KiB, MiB = 2**10, 2**20
SIZES = tuple(4 * KiB * 2**i for i in range(15))           # 4 KiB .. 64 MiB
QUICK_SIZES = (4 * KiB, 1 * MiB, 16 * MiB)
TRANSPORTS = ("ipc", "tcp", "shm")
SLOW_RTT_US = 10_000        # the prototype's line: an IPC round trip over 10 ms is a problem
RATIO_SIZE = 16 * MiB       # where shm must beat ipc frames 3x
PROBE_TIMEOUT_S = 1.0


@dataclass
class Row:
    transport: str
    size_bytes: int
    samples: int
    p50_us: float
    p99_us: float
    min_us: float
    max_us: float
    bandwidth_GBps: float     # 2 * size_bytes / p50 (there and back)
    copy_p50_us: float | None = None          # shm only: with the runner copying in and out
    copy_bandwidth_GBps: float | None = None


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def timed(fn, repeat: int, budget_s: float, warmup: int = 2, min_samples: int = 3) -> list[float]:
    """Seconds per call of fn(): warm-up discarded, then up to `repeat` samples within `budget_s`."""
    for _ in range(warmup):
        fn()
    out, deadline = [], time.perf_counter() + budget_s
    while len(out) < repeat and (len(out) < min_samples or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def row_of(transport: str, size: int, secs: list[float]) -> Row:
    us = [s * 1e6 for s in secs]
    p50 = percentile(us, 50)
    return Row(transport, size, len(us), p50, percentile(us, 99), min(us), max(us),
               2 * size / (p50 * 1e-6) / 1e9 if size else 0.0)


# ---- echo servers: real processes ------------------------------------------------------------------

# ---- the three transports ----------------------------------------------------------------------------

ECHO = P.encode({"type": "echo"})


def echo_reply(endpoint: str, frames: list, n: int) -> None:
    head = P.decode(frames[0])
    if head["type"] != "echo":
        raise RemoteError(f"{endpoint}: echo of {n} bytes failed: {head.get('error')}")


def measure_frames(transport: str, endpoint: str, sizes, repeat: int, budget_s: float,
                   lat_samples: int) -> tuple[Row, list[Row]]:
    """The payload is one raw frame, sent zero-copy from the runner's tensor; the reply is used in place."""
    client = Client(endpoint, timeout_s=30.0)
    try:
        def roundtrip(frames, n):
            client.send(frames, copy=False)
            reply = client.recv(f"the echo of {n} bytes")
            echo_reply(endpoint, reply, n)
            if len(reply) != len(frames) or (n and len(reply[1]) != n):
                raise RuntimeError(f"{endpoint}: echo of {n} bytes came back as {[len(f) for f in reply]}")
            return reply

        lat = row_of(transport, 0, timed(lambda: roundtrip([ECHO], 0), lat_samples, budget_s, warmup=20))
        rows = []
        for n in sizes:
            payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
            frames = [ECHO, memoryview(payload)]
            if not np.array_equal(np.frombuffer(roundtrip(frames, n)[1].buffer, np.uint8), payload):
                raise RuntimeError(f"{endpoint}: echo returned different bytes")
            rows.append(row_of(transport, n, timed(lambda: roundtrip(frames, n), repeat, budget_s)))
        return lat, rows
    finally:
        client.close()


def measure_shm(endpoint: str, sizes, repeat: int, budget_s: float, lat_samples: int) -> tuple[Row, list[Row]]:
    """tsqp's shm data path: the runner's ops write their outputs straight into the arena and read results
    where the server wrote them, so the payload is placed once (like the frames payload in its tensor) and
    per round trip the server reads it and writes a result of the same size (copy src -> dst: work the
    frames echo does not even do). `copy_*` fields: the same with the runner copying the payload into the
    arena and the result out of it each time (a runner whose tensors are not in the arena)."""
    top = max(sizes)
    dst = (top + shm.ALIGN - 1) // shm.ALIGN * shm.ALIGN
    remote = RemoteOffload(endpoint, "shm", timeout_s=30.0, arena_bytes=dst + top, control="socket")   # echo: socket
    try:
        arena, client = remote.arena, remote.client
        mem = arena.base.numpy()               # [size] uint8; numpy copies are single-threaded memcpy
        mem[:] = 0                             # fault every page in once, as after a session's first requests

        def roundtrip(n: int):
            client.send([P.encode({"type": "echo", "shm": True, "nbytes": n, "src": 0, "dst": dst})])
            echo_reply(endpoint, client.recv(f"the shm echo of {n} bytes"), n)

        def with_copies(payload: np.ndarray, out: np.ndarray):
            n = payload.size
            np.copyto(mem[:n], payload)
            roundtrip(n)
            np.copyto(out, mem[dst:dst + n])

        lat = row_of("shm", 0, timed(lambda: roundtrip(0), lat_samples, budget_s, warmup=20))
        rows = []
        for n in sizes:
            payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
            out = np.zeros(n, dtype=np.uint8)      # written now: no first-touch faults while timed
            with_copies(payload, out)
            if not np.array_equal(out, payload):
                raise RuntimeError(f"{endpoint}: shm echo returned different bytes")
            row = row_of("shm", n, timed(lambda: roundtrip(n), repeat, budget_s))
            copied = row_of("shm", n, timed(lambda: with_copies(payload, out), repeat, budget_s))
            row.copy_p50_us, row.copy_bandwidth_GBps = copied.p50_us, copied.bandwidth_GBps
            rows.append(row)
        return lat, rows
    finally:
        remote.close()


def shm_room(sizes) -> tuple[list[int], dict]:
    """The sizes an arena of 2x the payload fits in (keeping half of the memory available for others). Arenas
    are sealed memfds, the runner's own memory (not /dev/shm's size, which docker's --shm-size sets):
    what bounds them is the memory available; /dev/shm/tsqp-<uid> holds only control pipes."""
    try:
        probe = shm.Arena.create(shm.ALIGN)           # memfd_create and its seals work here
        d = probe.path.parent
        probe.close()
    except (OSError, shm.ArenaError) as e:
        return [], {"path": "memfd", "error": str(e)}
    dead = [f.name for f in d.iterdir() if (m := shm.LEFTOVER.match(f.name)) and not shm.pid_alive(int(m.group(1)))]
    info = {"path": "memfd (the runner's memory)", "free_bytes": available_memory(),
            "pipes_dir": str(d), "leftover_pipes": sorted(dead)}
    return [n for n in sizes if 2 * n + shm.ALIGN <= info["free_bytes"] // 2], info


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def cuda_copies(sizes=(1 * MiB, 16 * MiB, 64 * MiB), repeat: int = 10) -> list[dict]:
    """Host <-> device copy bandwidth, pinned and pageable host memory (only with CUDA)."""
    rows = []
    dev = torch.device("cuda:0")
    for n in sizes:
        gpu = torch.empty(n, dtype=torch.uint8, device=dev)
        for pinned in (True, False):
            host = torch.ones(n, dtype=torch.uint8, pin_memory=pinned)
            for direction in ("h2d", "d2h"):
                def copy():
                    (gpu.copy_(host, non_blocking=pinned) if direction == "h2d"
                     else host.copy_(gpu, non_blocking=pinned))
                    torch.cuda.synchronize(dev)
                secs = [s * 1e6 for s in timed(copy, repeat, 2.0)]
                p50 = percentile(secs, 50)
                rows.append({"direction": direction, "host": "pinned" if pinned else "pageable", "size_bytes": n,
                             "p50_us": p50, "min_us": min(secs), "bandwidth_GBps": n / (p50 * 1e-6) / 1e9})
    return rows


# ---- the environment ---------------------------------------------------------------------------------

def inspect_endpoint(endpoint: str) -> dict:
    """The socket file (exists, owner, mode) and whether a server answers an `info` within ~1 s."""
    rep: dict = {"endpoint": endpoint, "problems": []}
    try:
        rep["transport"] = transport_of(endpoint)
    except TransportError as e:
        rep["status"] = "invalid"
        rep["problems"].append(str(e))
        return rep
    path = ipc_path(endpoint)
    if path is not None:
        rep["socket_file"] = str(path)
        try:
            st = path.lstat()
        except FileNotFoundError:
            rep["exists"], rep["status"] = False, "missing"
            rep["problems"].append(f"{path} does not exist: no server is bound there (start `tsqp serve`)")
            return rep
        mode = stat.S_IMODE(st.st_mode)
        rep.update(exists=True, owner_uid=st.st_uid, mode=oct(mode), is_socket=stat.S_ISSOCK(st.st_mode))
        if not rep["is_socket"]:
            rep["problems"].append(f"{path} is not a unix socket")
        if st.st_uid != os.getuid():
            rep["problems"].append(f"{path} belongs to uid {st.st_uid}, this process runs as uid {os.getuid()}")
        if mode & 0o077:
            rep["problems"].append(f"{path} has mode {oct(mode)}: other users may connect (tsqp serve makes it 0600)")
        elif mode & 0o600 != 0o600:
            rep["problems"].append(f"{path} has mode {oct(mode)}: its owner cannot connect")
    client = Client(endpoint, timeout_s=PROBE_TIMEOUT_S)
    try:
        client.send([P.encode({"type": "info"})])
        head = P.decode(client.recv("info")[0])
        rep["status"] = "live"
        rep["server"] = {k: head.get(k) for k in ("model", "dtype", "device", "sessions", "pid")}
    except ServerTimeout:
        rep["status"] = "stale" if path is not None else "no answer"
        rep["problems"].append(f"no server answers an info on {endpoint} within {PROBE_TIMEOUT_S:g} s" +
                               (" (stale socket file: a new `tsqp serve` removes it)" if path is not None else ""))
    except P.ProtocolError as e:
        rep["status"] = "not tsqp"
        rep["problems"].append(f"{endpoint} answered, but not as a tsqp server: {e}")
    finally:
        client.close()
    return rep


def versions() -> dict:
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": cuda, "libzmq": zmq.zmq_version(), "pyzmq": zmq.pyzmq_version(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None, "platform": platform.platform(),
            "cpus": os.cpu_count(), "load_average": list(os.getloadavg())}


# ---- verdicts ------------------------------------------------------------------------------------------

def verdicts(lat: dict[str, Row], rows: list[Row], shm_info: dict, shm_error: str | None) -> list[dict]:
    out = []

    def say(name, status, detail):
        out.append({"check": name, "status": status, "detail": detail})

    by = {(r.transport, r.size_bytes): r for r in rows}
    load = os.getloadavg()[0]
    if "ipc" in lat:
        ipc = lat["ipc"]
        slow = [r for r in rows if r.transport == "ipc" and r.p50_us > SLOW_RTT_US]
        if ipc.p50_us > SLOW_RTT_US:
            say("ipc round trip", "problem", f"a header-only IPC round trip takes {ipc.p50_us / 1e3:.1f} ms (over "
                f"10 ms): the system is loaded (load average {load:.1f} on {os.cpu_count()} CPUs)")
        elif ipc.p99_us > SLOW_RTT_US:
            say("ipc round trip", "warn", f"header-only p50 {ipc.p50_us:.0f} us, but p99 {ipc.p99_us / 1e3:.1f} ms "
                f"(over 10 ms): the system is loaded (load average {load:.1f} on {os.cpu_count()} CPUs)")
        else:
            say("ipc round trip", "ok", f"header-only p50 {ipc.p50_us:.0f} us, p99 {ipc.p99_us:.0f} us")
        if slow:
            say("ipc payload size", "problem", f"IPC round trips exceed 10 ms from {fmt_size(slow[0].size_bytes)} "
                f"payloads up ({slow[0].p50_us / 1e3:.1f} ms): payload size dominates; use --transport shm")
        if "tcp" in lat:
            tcp = lat["tcp"]
            big = [(by[("ipc", n)], by[("tcp", n)]) for n in (RATIO_SIZE,) if ("ipc", n) in by and ("tcp", n) in by]
            worse = ipc.p50_us > 1.1 * tcp.p50_us or any(i.bandwidth_GBps < 0.9 * t.bandwidth_GBps for i, t in big)
            detail = f"header-only p50 ipc {ipc.p50_us:.0f} us vs tcp {tcp.p50_us:.0f} us" + \
                "".join(f"; {fmt_size(i.size_bytes)}: ipc {i.bandwidth_GBps:.2f} GB/s vs tcp "
                        f"{t.bandwidth_GBps:.2f} GB/s" for i, t in big)
            say("ipc vs tcp", "warn" if worse else "ok",
                ("IPC is slower than TCP: " if worse else "") + detail)
    if shm_error:
        say("shm", "problem", f"shared memory unavailable: {shm_error}")
    elif shm_info.get("free_bytes") is not None and shm_info["free_bytes"] < 2 * (2 * RATIO_SIZE):
        say("shm", "problem", f"only {shm_info['free_bytes'] / MiB:.0f} MiB of memory available: too small for "
            f"the arenas (sealed memfds) of large prefills")
    else:
        say("shm", "ok", f"arenas are sealed memfds; {shm_info.get('free_bytes', 0) / MiB:.0f} MiB of memory available")
    if shm_info.get("leftover_pipes"):
        say("shm leftovers", "warn", f"{len(shm_info['leftover_pipes'])} control pipe(s) of dead runners in "
            f"{shm_info['pipes_dir']} (the next runner removes them)")
    s, i = by.get(("shm", RATIO_SIZE)), by.get(("ipc", RATIO_SIZE))
    if s and i:
        r = s.bandwidth_GBps / i.bandwidth_GBps
        say("shm vs ipc at 16 MiB", "ok" if r >= 3 else "warn",
            f"shm {s.bandwidth_GBps:.2f} GB/s vs ipc frames {i.bandwidth_GBps:.2f} GB/s: {r:.1f}x (want >= 3x)")
    return out


# ---- the report ----------------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    """'4K', '16M', '16MiB', '65536' -> bytes; a multiple of 8 (the arena's alignment for a copy)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": 2**30}.get(t[-1:], 1)
    try:
        n = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError(f"--sizes: cannot read {text!r}; write e.g. 4K, 16M or 65536") from None
    if n <= 0 or n % 8:
        raise ValueError(f"--sizes: {text!r} must be a positive multiple of 8 bytes")
    return n


def fmt_size(n: int) -> str:
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def table(lat: dict[str, Row], rows: list[Row]) -> Table:
    names = [t for t in TRANSPORTS if t in lat or any(r.transport == t for r in rows)]
    both = "shm" in names and "ipc" in names
    t = Table(title="tsqp diagnose: echo round trips, bandwidth = 2 x payload / p50 "
                    "(shm+copy: the runner also copies the payload in and the result out)")
    t.add_column("payload", justify="right")
    for n in names:
        t.add_column(f"{n} p50 us", justify="right")
        t.add_column(f"{n} p99 us", justify="right")
        t.add_column(f"{n} GB/s", justify="right")
    if "shm" in names:
        t.add_column("shm+copy GB/s", justify="right")
    if both:
        t.add_column("shm / ipc", justify="right")
    by = {(r.transport, r.size_bytes): r for r in rows} | {(n, 0): r for n, r in lat.items()}
    for size in [0] + sorted({r.size_bytes for r in rows}):
        cells = ["header only" if size == 0 else fmt_size(size)]
        for n in names:
            r = by.get((n, size))
            cells += [f"{r.p50_us:,.0f}", f"{r.p99_us:,.0f}"] if r else ["-", "-"]
            cells.append(f"{r.bandwidth_GBps:.2f}" if r and size else "-")
        if "shm" in names:
            r = by.get(("shm", size))
            cells.append(f"{r.copy_bandwidth_GBps:.2f}" if r and r.copy_bandwidth_GBps else "-")
        if both:
            s, i = by.get(("shm", size)), by.get(("ipc", size))
            cells.append(f"{s.bandwidth_GBps / i.bandwidth_GBps:.1f}x" if s and i and size else "-")
        t.add_row(*cells)
    return t


def print_env(env: dict) -> None:
    v, ep = env["versions"], env["endpoint"]
    console.print(f"Python {v['python']}, torch {v['torch']} (CUDA {v['cuda'] or 'none'}), libzmq {v['libzmq']}, "
                  f"pyzmq {v['pyzmq']}; GPU: {v['gpu'] or 'none'}; {v['cpus']} CPUs, load {v['load_average'][0]:.2f}")
    sel, why = env["selected_endpoint"]
    console.print(f"The environment selects {sel} ({why}); inspected: {ep['endpoint']} -> {ep['status']}")
    if "server" in ep:
        s = ep["server"]
        console.print(f"  server answers: model {s['model']}, dtype {s['dtype']}, device {s['device']}, "
                      f"pid {s['pid']}, {s['sessions']} session(s)")
    for p in ep["problems"]:
        console.print(f"  [yellow]! {p}[/yellow]")


def diagnose(args) -> dict:

    sizes = tuple(sorted({parse_size(x) for x in args.sizes})) if args.sizes else (QUICK_SIZES if args.quick else SIZES)
    repeat = args.repeat or (5 if args.quick else 30)
    budget = 0.15 if args.quick else 0.5
    lat_samples = 50 if args.quick else 300
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="tsqp-diag-", dir="/tmp")
    endpoints = {"ipc": f"ipc://{tmp}/echo.ipc", "tcp": f"tcp://127.0.0.1:{free_tcp_port()}"}
    procs = [start_server(e, extra=("--max-sessions", "4")) for e in endpoints.values()]      # they start while the environment is probed
    lat: dict[str, Row] = {}
    rows: list[Row] = []
    try:
        env = {"selected_endpoint": list(env_endpoint()), "endpoint": inspect_endpoint(args.endpoint),
               "versions": versions()}
        print_env(env)
        shm_sizes, shm_info = shm_room(sizes)
        shm_error = shm_info.get("error")
        wait_ready(procs)
        for name in ("ipc", "tcp"):
            lat[name], r = measure_frames(name, endpoints[name], sizes, repeat, budget, lat_samples)
            rows += r
        if shm_sizes:
            try:
                lat["shm"], r = measure_shm(endpoints["ipc"], shm_sizes, repeat, budget, lat_samples)
                rows += r
            except (shm.ArenaError, RemoteError) as e:
                shm_error = str(e)
        elif not shm_error:
            shm_error = f"{shm_info['free_bytes'] / MiB:.0f} MiB of memory available, too little for any arena"
    finally:
        stop_servers(procs)
        shutil.rmtree(tmp, ignore_errors=True)

    console.print(table(lat, rows))
    copies = cuda_copies() if torch.cuda.is_available() else None
    if copies:
        ct = Table(title="host <-> device copies (cuda:0)")
        for c in ("direction", "host", "size", "p50 us", "GB/s"):
            ct.add_column(c, justify="right")
        for c in copies:
            ct.add_row(c["direction"], c["host"], fmt_size(c["size_bytes"]), f"{c['p50_us']:,.0f}",
                       f"{c['bandwidth_GBps']:.2f}")
        console.print(ct)
    checks = verdicts(lat, rows, shm_info, shm_error)
    colour = {"ok": "green", "warn": "yellow", "problem": "red"}
    for c in checks:
        console.print(f"[{colour[c['status']]}]{c['status']:>7}[/]  {c['check']}: {c['detail']}")
    result = {"settings": {"sizes": list(sizes), "repeat": repeat, "budget_s_per_size": budget,
                           "quick": bool(args.quick), "servers": endpoints,
                           "elapsed_s": time.perf_counter() - t0},
              "rows": [asdict(r) for r in rows], "latency": [asdict(r) for r in lat.values()],
              "cuda_copies": copies, "verdicts": checks, "env": {**env, "shm": shm_info}}
    if args.json:
        write_json(args.json, result)
        console.print(f"wrote {args.json}")
    return result
