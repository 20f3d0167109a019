"""Directory squatting (issue 29, item 6): the default directories prefer the per-user runtime directory
($XDG_RUNTIME_DIR, when it is this user's and 0700), where no one else can create anything; otherwise
/tmp/tsqp-<uid> and /dev/shm/tsqp-<uid>, which another user may create first: then the error says whose they
are and how to choose another. The victim is a real uid of its own (4242, started as root, which imports what it
needs, then drops to it for good), the squatter's directories are really owned by uid 65534, and a real
`tsqp serve` and `tsqp run` meet in a runtime directory over shared memory and control pipes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import RUN_ENV, run_cli
from tsqp.commands import launch

VICTIM, SQUATTER = 4242, 65534

VICTIM_SCRIPT = textwrap.dedent("""
    import os, sys
    from tsqp.config import default_endpoint
    from tsqp.wire.shm import arena_dir
    from tsqp.wire.transport import claim_ipc_path, ipc_path
    os.setgroups([]); os.setgid(int(sys.argv[1])); os.setuid(int(sys.argv[1]))
    endpoint = default_endpoint()
    print("endpoint", endpoint)
    for what, attempt in (("bind", lambda: claim_ipc_path(ipc_path(endpoint)).release()), ("shm", arena_dir)):
        try:
            print(what, "ok", attempt())
        except Exception as e:
            print(what, "refused", e)
""")

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="squatting needs root to make directories of other uids")


def as_victim(env: dict) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", VICTIM_SCRIPT, str(VICTIM)], capture_output=True, text=True,
                         timeout=60, env={**RUN_ENV, **env}, cwd="/")
    assert out.returncode == 0, out.stderr
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines()}


@pytest.fixture
def squatted():
    made = [Path(f"/tmp/tsqp-{VICTIM}"), Path(f"/dev/shm/tsqp-{VICTIM}")]
    for d in made:
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(mode=0o755)
        os.chown(d, SQUATTER, SQUATTER)
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def test_squatted_defaults_are_refused_naming_the_owner_and_the_way_out(squatted):
    seen = as_victim({"XDG_RUNTIME_DIR": ""})
    assert seen["endpoint"] == f"ipc:///tmp/tsqp-{VICTIM}/gpu_server.ipc"
    for what, d in (("bind", squatted[0]), ("shm", squatted[1])):
        assert seen[what].startswith("refused"), seen
        assert f"{d} belongs to uid {SQUATTER} (nobody), not to this user (uid {VICTIM}): another user created " \
               f"it first" in seen[what], seen[what]
        assert "XDG_RUNTIME_DIR" in seen[what]
    assert "--endpoint" in seen["bind"] and "LLAMA_IPC_PATH" in seen["bind"]


def test_a_runtime_directory_of_ones_own_is_preferred_and_beats_the_squatter(squatted):
    runtime = Path(tempfile.mkdtemp(prefix="tsqp-xdg-", dir="/tmp"))     # a path the victim can reach
    os.chown(runtime, VICTIM, VICTIM)
    try:
        check_runtime_preferred(runtime)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def check_runtime_preferred(runtime: Path) -> None:
    seen = as_victim({"XDG_RUNTIME_DIR": str(runtime)})
    assert seen["endpoint"] == f"ipc://{runtime}/tsqp/gpu_server.ipc"
    assert seen["bind"].startswith("ok") and seen["shm"] == f"ok {runtime}/tsqp", seen
    runtime.chmod(0o755)                                # not 0700: not taken for a private runtime directory
    assert as_victim({"XDG_RUNTIME_DIR": str(runtime)})["endpoint"] == f"ipc:///tmp/tsqp-{VICTIM}/gpu_server.ipc"


def test_serve_and_run_meet_in_the_runtime_directory_over_pipes(tmp_path):
    """This user, a real server and runner: the default endpoint and the control pipes live in the runtime
    directory, and the server finds the pipes there because the attach names their directory."""
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    proc = launch.start_server(None, None, extra=("--model", "random:tiny", "--device", "cpu", "--threads", "1"),
                               env={**RUN_ENV, **env})
    try:
        banner = launch.wait_ready([proc], 60)[0]
        assert f"{runtime}/tsqp/gpu_server.ipc" in banner, banner
        out = run_cli("run", "--model", "random:tiny", "--tokens", "8", "--no-warmup", env=env, timeout_s=120)
        assert out.returncode == 0 and "next token" in out.stdout, out.stderr
        # a runner whose runtime directory is another (its own environment): its pipes are found all the same
        other = tmp_path / "xdg-runner"
        other.mkdir(mode=0o700)
        out = run_cli("run", "--model", "random:tiny", "--tokens", "8", "--no-warmup", "--endpoint",
                      f"ipc://{runtime}/tsqp/gpu_server.ipc", env={"XDG_RUNTIME_DIR": str(other)}, timeout_s=120)
        assert out.returncode == 0 and "next token" in out.stdout, out.stderr
    finally:
        launch.stop_servers([proc])
