"""Owner-only files, refusing to bind over another user's or a live server's socket, CurveZMQ on tcp://
(an unauthenticated client gets nothing), the tcp bind policy, and no pickle or eval on the wire."""
from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_here, serving, short_endpoint
from tsqp.wire import keys as K
from tsqp.wire import protocol as P
from tsqp.wire.client import RemoteOffload
from tsqp.wire.shm import Arena, arena_dir
from tsqp.wire.transport import Client, ServerTimeout, TransportError, bind_server

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
NOBODY = 65534


def tsqp(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tsqp.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def serve_here(capsys, *args: str) -> tuple[int, str]:
    """`tsqp serve` in this process, for start-ups that must be refused: (exit status, stderr)."""
    from tsqp.cli import main
    rc = main(["serve", "--model", "random:tiny", "--device", "cpu", *args])
    return rc, capsys.readouterr().err


# ---- files -----------------------------------------------------------------------------------------------

def test_socket_file_and_arena_are_owner_only(tmp_path):
    import zmq
    base = Path(short_endpoint().removeprefix("ipc://")).parent
    try:
        path = base / "made" / "by" / "tsqp" / "s.ipc"          # missing parents: tsqp creates them 0700
        sock, lock = bind_server(f"ipc://{path}", zmq.Context.instance())
        try:
            assert stat.S_ISSOCK(os.lstat(path).st_mode) and mode(path) == 0o600
            assert mode(lock.path) == 0o600
            for d in (base / "made", base / "made" / "by", base / "made" / "by" / "tsqp"):
                assert mode(d) == 0o700, d
        finally:
            sock.close(linger=0)
            lock.release()
        assert not path.exists() and not lock.path.exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    arena = Arena.create(1 << 16)          # a memfd: no file at all; its control pipes' directory is 0700
    try:
        assert not arena.path.exists()
        assert arena.path.parent == arena_dir() and mode(arena_dir()) == 0o700
    finally:
        arena.close()


def test_served_socket_is_owner_only_and_arena_unlinked_at_attach():
    with serving("random:tiny") as (endpoint, _):
        path = Path(endpoint.removeprefix("ipc://"))
        assert mode(path) == 0o600 and path.stat().st_uid == os.getuid()
        r = RemoteOffload(endpoint, "shm", timeout_s=5)
        try:
            assert not list(arena_dir().glob(f"{os.getpid()}-*")), "the server unlinked the control pipes"
        finally:
            r.close()


def test_refuses_a_socket_file_of_another_user(capsys):
    if os.getuid() != 0:
        pytest.skip("needs root to chown a file to another user")
    base = Path(short_endpoint().removeprefix("ipc://")).parent
    try:
        theirs = base / "theirs.ipc"
        theirs.write_bytes(b"")
        os.chown(theirs, NOBODY, NOBODY)
        rc, err = serve_here(capsys, "--endpoint", f"ipc://{theirs}")
        assert rc == 2 and f"belongs to uid {NOBODY}" in err, err
        assert theirs.exists() and theirs.stat().st_uid == NOBODY          # left alone
        with pytest.raises(TransportError, match=f"belongs to uid {NOBODY}"):
            RemoteOffload(f"ipc://{theirs}", "frames", timeout_s=1)       # the runner sends it nothing
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_refuses_to_take_over_a_live_server(capsys):
    with serving("random:tiny") as (endpoint, first):
        rc, err = serve_here(capsys, "--endpoint", endpoint)
        assert rc == 2 and "live server already answers" in err, err
        c = Client(endpoint, timeout_s=5)
        try:
            c.send([P.encode({"type": "info"})])
            assert P.decode(c.recv("info")[0])["pid"] == first.pid       # still the first one
        finally:
            c.close()


# ---- tcp -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("k") / "keys"
    r = tsqp("keys", "--dir", str(d))
    assert r.returncode == 0, r.stderr
    return d


def test_keys_are_owner_only(keys):
    assert mode(keys) == 0o700 and mode(keys / "allowed") == 0o700
    for f in ("server.key", "server.key_secret", "client.key", "client.key_secret", "allowed/client.key"):
        assert mode(keys / f) == 0o600, f
    pub, sec = K.load_pair(keys / "client.key_secret")
    assert K.load_allowed(keys / "allowed") == {pub} and len(sec) == 40
    r = tsqp("keys", "--dir", str(keys))
    assert r.returncode == 2 and "exists" in r.stderr           # no silent overwrite


def test_tcp_policy(capsys):
    port = free_port()
    rc, err = serve_here(capsys, "--endpoint", f"tcp://127.0.0.1:{port}", "--keys", "/nonexistent")
    assert rc == 2 and "key pair" in err and "tsqp keys" in err, err
    rc, err = serve_here(capsys, "--endpoint", f"tcp://*:{port}", "--insecure")
    assert rc == 2 and "--public" in err, err
    with pytest.raises(K.SecurityError, match="--insecure"):
        K.check_bind(f"tcp://127.0.0.1:{port}", None, False, False)
    warning = K.check_bind(f"tcp://127.0.0.1:{port}", None, True, False)
    assert "no encryption" in warning[0] and "without authentication" in warning[0]
    assert K.check_bind("ipc:///x/y.ipc", None, False, False) == []
    with serving("random:tiny", endpoint=f"tcp://127.0.0.1:{port}", extra=("--insecure",)) as (_, proc):
        assert "WARNING: --insecure" in proc.banner


@pytest.fixture(scope="module")
def curve_server(keys):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with serving("random:tiny", endpoint=endpoint, extra=("--keys", str(keys))) as (_, proc):
        assert "CurveZMQ (1 allowed client key(s))" in proc.banner
        yield endpoint


def test_unauthenticated_clients_get_nothing_on_tcp(curve_server, keys, tmp_path, capsys):
    plain = Client(curve_server, timeout_s=1.5)
    try:
        plain.send([P.encode({"type": "info"})], block=False)
        with pytest.raises(ServerTimeout):
            plain.recv("info without keys")
    finally:
        plain.close()
    stranger = tmp_path / "stranger"
    K.generate(stranger, "client")                                  # a key pair the server never allowed
    curve = K.ClientCurve.load(keys / "server.key", stranger / "client.key_secret")
    with pytest.raises(ServerTimeout, match="allowed"):
        RemoteOffload(curve_server, "frames", timeout_s=2, connect_timeout_s=1.5, curve=curve)
    assert run_here("--endpoint", curve_server, "--insecure", "--tokens", "4", "--connect-timeout", "1.5") == 2
    assert "no reply" in capsys.readouterr().err


def test_keyed_client_gets_correct_logits_on_tcp(curve_server, keys, tmp_path):
    assert run_here("--endpoint", curve_server, "--keys", str(keys), "--no-warmup", "--tokens", "24",
                    "--dump-logits", str(tmp_path / "r.npy")) == 0
    assert run_here("--local", "--model", "random:tiny", "--device", "cpu", "--no-warmup", "--tokens", "24",
                    "--dump-logits", str(tmp_path / "l.npy")) == 0
    got, want = np.load(tmp_path / "r.npy"), np.load(tmp_path / "l.npy")
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# ---- nothing executable on the wire ---------------------------------------------------------------------

def test_no_pickle_or_eval_in_the_package():
    banned = re.compile(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bmarshal\b|\bdill\b|\bshelve\b|"
                        r"(?<![\w.])eval\(|(?<![\w.])exec\(|recv_pyobj|send_pyobj|recv_serialized|"
                        r"torch\.load\(|allow_pickle\s*=\s*True|\byaml\.load\(")
    pkg = Path(__file__).resolve().parent.parent / "tsqp"
    hits = [f"{f.name}:{i}: {line.strip()}" for f in sorted(pkg.glob("*.py"))
            for i, line in enumerate(f.read_text().splitlines(), 1) if banned.search(line)]
    assert not hits, hits
    assert P.decode(P.encode({"type": "info"}))["type"] == "info"    # the header is JSON
    with pytest.raises(P.ProtocolError):
        P.decode(b"\x80\x04\x95pickled")
