"""Other local users and `tsqp api` (issue 29, item 5): the key never needs the command line (a 0600 file or
TSQP_API_KEY; a key file others can read is refused; --api-key warns that /proc/PID/cmdline shows it), and
`--unix PATH` serves this user only (0600 socket in a 0700 directory), while tcp loopback reaches every local
user. The other user is real: uid 65534 (nobody), the client a subprocess running as it."""
from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import subprocess
import sys

import pytest

from conftest import run_cli
from test_api_hostile import MODEL_ID, ApiProcess

OTHER_UID = 65534
ASK = json.dumps({"model": MODEL_ID, "prompt": "Hello", "max_tokens": 1, "temperature": 0})


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.path)


def ask(conn: http.client.HTTPConnection, key: str | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", "/v1/completions", ASK, headers)
    status = conn.getresponse()
    status.read()
    return status.status


# a client as another user (started as root, which can exec this interpreter, then uid 65534 for good):
# prints the status it got, or the error that kept it out
AS_OTHER = """
import encodings.idna, http.client, os, socket, sys
os.setgroups([]); os.setgid(int(sys.argv[5])); os.setuid(int(sys.argv[5]))
kind, where, key = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX); s.settimeout(30); s.connect(where)
        conn = http.client.HTTPConnection("localhost"); conn.sock = s
    else:
        conn = http.client.HTTPConnection("127.0.0.1", int(where), timeout=60)
    conn.request("POST", "/v1/completions", sys.argv[4], {"Content-Type": "application/json",
                 **({"Authorization": "Bearer " + key} if key != "-" else {})})
    print(conn.getresponse().status)
except OSError as e:
    print(type(e).__name__)
"""


def as_other(kind: str, where, key: str | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", AS_OTHER, kind, str(where), key or "-", ASK, str(OTHER_UID)],
                         capture_output=True, text=True, timeout=90, cwd="/")
    return out.stdout.strip() or out.stderr.strip()[-300:]


def key_file(tmp_path, mode: int, key: str = "s3cret-key") -> str:
    path = tmp_path / f"key-{mode:o}"
    path.write_text(key + "\n")
    path.chmod(mode)
    return str(path)


def test_a_key_file_others_can_read_is_refused(tmp_path, smollm2_gguf):
    out = run_cli("api", "--local", "--model", smollm2_gguf, "--api-key-file", key_file(tmp_path, 0o644),
                  "--port", "0", timeout_s=120)
    assert out.returncode != 0 and "readable or writable by other users (mode 0o644): chmod 600" in out.stderr, out
    out = run_cli("api", "--local", "--model", smollm2_gguf, "--api-key-file", key_file(tmp_path, 0o600),
                  "--api-key", "x", timeout_s=120)
    assert out.returncode != 0 and "--api-key-file and --api-key: give one of them" in out.stderr, out


@pytest.mark.skipif(os.getuid() != 0, reason="another user's client needs root to start as uid 65534")
def test_a_unix_socket_serves_its_owner_only(tmp_path, smollm2_gguf):
    path = tmp_path / "sock" / "api.sock"
    api = ApiProcess(tmp_path / "api.log", "--local", "--model", str(smollm2_gguf), "--threads", "1",
                     "--unix", str(path), "--api-key-file", key_file(tmp_path, 0o600), port=None)
    try:
        api.wait_ready()
        assert f"http+unix://{path}" in api.output()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert ask(UnixHTTPConnection(str(path))) == 401                        # the key is still asked for
        assert ask(UnixHTTPConnection(str(path)), "s3cret-key") == 200
        assert as_other("unix", path, "s3cret-key") == "PermissionError"        # never reaches the socket
        assert "s3cret-key" not in open(f"/proc/{api.proc.pid}/cmdline").read()
    finally:
        api.stop()
    assert not path.exists()                                                    # removed at exit


@pytest.mark.slow
@pytest.mark.skipif(os.getuid() != 0, reason="another user's client needs root to start as uid 65534")
def test_tcp_loopback_reaches_every_local_user_so_the_key_guards_it(tmp_path, smollm2_gguf):
    api = ApiProcess(tmp_path / "api.log", "--local", "--model", str(smollm2_gguf), "--threads", "1",
                     "--api-key", "on-the-command-line", env={"TSQP_API_KEY": "ignored-when-a-flag-is-given"})
    try:
        api.wait_ready()
        assert f"--api-key on the command line is readable by every local user in /proc/{api.proc.pid}/cmdline" \
            in api.output()
        assert "on-the-command-line" in open(f"/proc/{api.proc.pid}/cmdline").read()   # as warned
        assert as_other("tcp", api.port) == "401"                                     # reached, refused
        assert as_other("tcp", api.port, "on-the-command-line") == "200"              # reached, served
    finally:
        api.stop()
    api = ApiProcess(tmp_path / "api2.log", "--local", "--model", str(smollm2_gguf), "--threads", "1",
                     env={"TSQP_API_KEY": "from-the-environment"})
    try:
        api.wait_ready()
        assert "readable by every local user" not in api.output()
        conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60)
        assert ask(conn) == 401 and ask(http.client.HTTPConnection("127.0.0.1", api.port, timeout=60),
                                        "from-the-environment") == 200
        assert "from-the-environment" not in open(f"/proc/{api.proc.pid}/cmdline").read()
    finally:
        api.stop()
