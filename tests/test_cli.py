"""The two commands as a user runs them: `tsqp serve` and `tsqp run` as real processes, the JSON they write,
--dump-logits against --local, and the LLAMA_* environment (flags override it)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, run_cli_many, short_endpoint, start_server, stop_server, wait_ready
from tsqp import cli

STATS_KEYS = {"rpc_calls": int, "rpc_time_s": float, "serialize_s": float, "deserialize_s": float,
              "sent_bytes": int, "received_bytes": int, "total_s": float, "server_compute_s": float}
SETTINGS_KEYS = ("model", "dtype", "device", "endpoint", "transport", "policy", "tokens")
# the environment a developer's shell might hold; flags must win over every one of these
HOSTILE_ENV = {"LLAMA_MODEL_PATH": "/nonexistent/model", "LLAMA_DTYPE": "bfloat16", "LLAMA_GPU_DEVICE": "cuda:9",
               "LLAMA_IPC_PATH": "/nonexistent/dir/server.ipc"}


@pytest.fixture(scope="module")
def tiny_server():
    """The must-show, as typed: `tsqp serve --model random:tiny --device cpu --endpoint E` (no --dtype)."""
    endpoint = short_endpoint("cli")
    proc = start_server(None, extra=("--model", "random:tiny", "--device", "cpu", "--endpoint", endpoint,
                                     "--threads", "1"))
    proc.endpoint = endpoint
    try:
        wait_ready(proc)
        yield endpoint, proc
    finally:
        stop_server(proc, own_dir=True)


def test_serve_banner(tiny_server):
    endpoint, proc = tiny_server
    banner = proc.banner
    assert endpoint in banner
    assert "IPC" in banner
    assert "Device: cpu, Dtype: float32" in banner
    assert "random:tiny" in banner
    assert "ready" in banner.splitlines()[-1]


def test_run_prints_table_and_writes_json(tiny_server, tmp_path):
    endpoint, _ = tiny_server
    out = tmp_path / "out.json"
    r = run_cli("run", "--endpoint", endpoint, "--tokens", 128, "--json", out)
    assert r.returncode == 0, r.stderr
    assert endpoint in r.stdout and "IPC" in r.stdout and "shm" in r.stdout     # where it connected, and how
    for row in ("RPC calls", "RPC time", "serialize", "deserialize", "sent", "received", "server compute",
                "rmsnorm", "rope", "attention", "silu", "total"):
        assert row in r.stdout, f"table row {row!r} missing:\n{r.stdout}"

    result = json.loads(out.read_text())
    stats, settings = result["stats"], result["settings"]
    for key, kind in STATS_KEYS.items():
        assert isinstance(stats[key], kind) and not isinstance(stats[key], bool), (key, stats[key])
        assert stats[key] > 0, (key, stats[key])
    # random:tiny has 2 layers; `linear` sends embed, 4 requests per layer and the LM head, once each
    assert stats["rpc_calls"] == 1 + 4 * 2 + 1
    assert stats["total_s"] >= stats["server_compute_s"]
    assert {k: settings[k] for k in SETTINGS_KEYS} == {
        "model": "random:tiny", "dtype": "float32", "device": "cpu", "endpoint": endpoint,
        "transport": "shm", "policy": "linear", "tokens": 128}


def test_dump_logits_equals_local(tiny_server, tmp_path, monkeypatch, restore_sigterm):
    """Remote (shm and frames, both policies; real processes) against `tsqp run --local` (in-process here) on
    the same preset. LLAMA_* hold other values throughout, so any place the environment beat a flag shows."""
    endpoint, _ = tiny_server
    common = ("--tokens", 16, "--no-warmup")
    # --model given to the remote runs too: a runner's model (flag, or LLAMA_MODEL_PATH) is its own copy, which
    # the server must match; a random preset takes the server's (checked) config
    common_remote = ("--model", "random:tiny", *common)
    argvs = [
        ["run", "--endpoint", endpoint, *common_remote, "--dump-logits", tmp_path / "shm.npy"],
        ["run", "--endpoint", endpoint, "--transport", "frames", "--policy", "seed", "--chunks", 2, *common_remote,
         "--dump-logits", tmp_path / "frames.npy", "--json", tmp_path / "frames.json"],
    ]
    remote_runs = run_cli_many(argvs, env=HOSTILE_ENV)
    for k, v in HOSTILE_ENV.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["run", "--local", "--model", "random:tiny", "--dtype", "float32", "--device", "cpu",
                     *map(str, common), "--dump-logits", str(tmp_path / "local.npy"),
                     "--json", str(tmp_path / "local.json")]) == 0
    for r in remote_runs:
        assert r.returncode == 0, r.stderr
    local = np.load(tmp_path / "local.npy")
    assert local.dtype == np.float32 and local.shape == (512,)
    for name in ("shm", "frames"):
        remote = np.load(tmp_path / f"{name}.npy")
        assert remote.dtype == np.float32 and remote.shape == local.shape
        assert np.abs(remote - local).max() <= 1e-5, name
    local_settings = json.loads((tmp_path / "local.json").read_text())["settings"]
    assert (local_settings["model"], local_settings["dtype"], local_settings["device"],
            local_settings["transport"]) == ("random:tiny", "float32", "cpu", "local")
    frames_settings = json.loads((tmp_path / "frames.json").read_text())["settings"]
    assert (frames_settings["endpoint"], frames_settings["policy"], frames_settings["tokens"]) == (endpoint, "seed", 16)


def test_environment_configures_both_commands(tmp_path):
    """No flags at all: LLAMA_MODEL_PATH, LLAMA_DTYPE, LLAMA_GPU_DEVICE choose the server's model, dtype and
    device; LLAMA_IPC_PATH (a bare socket path) is where the server binds and the runner connects."""
    sock_dir = Path(tempfile.mkdtemp(prefix="tsqp-t-", dir="/tmp"))
    path = sock_dir / "env.ipc"
    env = {"LLAMA_MODEL_PATH": "random:tiny@7", "LLAMA_DTYPE": "bfloat16", "LLAMA_GPU_DEVICE": "cpu",
           "LLAMA_IPC_PATH": str(path)}
    proc = start_server(None, env=env, extra=("--threads", "1"))
    try:
        banner = wait_ready(proc)
        assert f"ipc://{path}" in banner
        assert "Device: cpu, Dtype: bfloat16" in banner
        assert "random:tiny@7" in banner
        out = tmp_path / "env.json"
        r = run_cli("run", "--tokens", 8, "--no-warmup", "--json", out, env={"LLAMA_IPC_PATH": str(path)})
        assert r.returncode == 0, r.stderr
        settings = json.loads(out.read_text())["settings"]
        assert (settings["endpoint"], settings["model"], settings["dtype"], settings["device"]) == \
            (f"ipc://{path}", "random:tiny@7", "bfloat16", "cpu")
    finally:
        stop_server(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.parametrize("command", ["serve", "run"])
def test_environment_mapping_and_flag_precedence(monkeypatch, command):
    """The one place the CLI maps LLAMA_* onto settings: env when no flag, the flag when given."""
    for k, v in {"LLAMA_MODEL_PATH": "/models/llama", "LLAMA_DTYPE": "float16", "LLAMA_GPU_DEVICE": "cuda:3",
                 "LLAMA_IPC_PATH": "/run/tsqp/gpu.ipc"}.items():
        monkeypatch.setenv(k, v)
    extra = ["--local"] if command == "run" else []      # --local: no key look-up for a remote endpoint
    args = cli.parser().parse_args([command, *extra])
    cli.resolve(args)
    assert (args.model, args.dtype, args.device, args.endpoint) == \
        ("/models/llama", "float16", "cuda:3", "ipc:///run/tsqp/gpu.ipc")

    args = cli.parser().parse_args([command, *extra, "--model", "random:tiny", "--dtype", "bfloat16",
                                    "--device", "cpu", "--endpoint", "tcp://127.0.0.1:5555"])
    cli.resolve(args)
    assert (args.model, args.dtype, args.device, args.endpoint) == \
        ("random:tiny", "bfloat16", "cpu", "tcp://127.0.0.1:5555")

    monkeypatch.setenv("LLAMA_IPC_PATH", "tcp://10.0.0.2:7000")     # a full endpoint is taken as is
    args = cli.parser().parse_args([command, *extra])
    cli.resolve(args)
    assert args.endpoint == "tcp://10.0.0.2:7000"


def test_defaults_without_environment(monkeypatch):
    for k in ("LLAMA_MODEL_PATH", "LLAMA_DTYPE", "LLAMA_GPU_DEVICE", "LLAMA_IPC_PATH"):
        monkeypatch.delenv(k, raising=False)
    args = cli.parser().parse_args(["serve"])
    cli.resolve(args)
    assert (args.model, args.dtype, args.endpoint) == \
        ("random:tiny", "float32", f"ipc:///tmp/tsqp-{os.getuid()}/gpu_server.ipc")     # a directory of our own
    assert args.device == cli.default_device()
