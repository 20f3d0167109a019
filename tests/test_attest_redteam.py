"""Issue 26, red team: the attestation's claims attacked as an attacker would. Each test carries out one attack
and asserts it fails (or, where the attack worked before a fix on this branch, that it now fails and why).

The fast cases run on tsqp's own format, policy and client code with real keys, real TLS sockets on loopback
and the real Intel quotes in ../shared/attestation. The slow cases attack a real `tsqp api --attest simulated
--local` process serving the real SmolLM2 GGUF: a man in the middle that relays the first connection and
swaps in its own key on the next, proxies from the environment, the TLS key looked for on disk and in the
process's open files, and /v1/attestation fed huge, malformed and flooding requests."""
from __future__ import annotations

import base64
import concurrent.futures as futures
import datetime as dt
import hashlib
import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from attest_helpers import EVENTS, SHARED, SimulatedRunner, self_signed
from attest_net import TlsServer, client_tls
from conftest import clean_env, run_cli_many, wait_line
from tsqp.attestation import answer as A
from tsqp.attestation import format as fmt
from tsqp.client.answers import check_answer
from tsqp.client.attested import Attestation, AttestationRefused, AttestedTransport, attested_httpx, attested_openai
from tsqp.client.policy import Policy, PolicyError, parse_policy
from tsqp.client.verify import verify
from tsqp.commands.api.attestation import AnswerSigner, parse_nonce
from tsqp.commands.api.schema import APIError
from tsqp.trusted.attest import providers
from tsqp.trusted.attest.attestor import Attestor, new_answer_key
from tsqp.trusted.attest.tls import TlsIdentity

IN_WINDOW = dt.datetime(2025, 7, 1, tzinfo=dt.timezone.utc)
SECRET = "Zk9Quokka"                  # in every prompt: no attacker may ever see it
NOW = dt.datetime.now(dt.timezone.utc)


def real(name: str) -> tuple[bytes, str]:
    return (SHARED / name).read_bytes(), (SHARED / f"{name}_collateral.json").read_text()


# ---- claim 2: the verifier accepts only what the policy pins ------------------------------------------------

def test_a_policy_pinning_only_what_the_software_chooses_is_refused():
    """Attack: publish a policy that looks pinned but names only values the enclave's author or its firmware
    chooses. SGX ISVPRODID/ISVSVN are set by whoever signs an enclave; TDX RTMR0-2 are extended by the firmware
    that MRTD measures. Before the fix parse_policy took both, and the real quotes (any enclave) passed."""
    sgx, sgx_coll = real("sgx_quote")
    tdx, tdx_coll = real("tdx_quote")
    weak_sgx = Policy(tee="sgx", isv_prod_id=0, allowed_tcb_statuses=("ConfigurationAndSWHardeningNeeded",))
    weak_tdx = Policy(tee="tdx", rtmr2=verify(tdx, Policy(tee="tdx"), tdx_coll, IN_WINDOW).measurements["rtmr2"])
    assert verify(sgx, weak_sgx, sgx_coll, IN_WINDOW).accepted       # what such a policy lets through
    assert verify(tdx, weak_tdx, tdx_coll, IN_WINDOW).accepted
    for doc, root in (({"tee": "sgx", "isv_prod_id": 0}, "mrenclave or mrsigner"),
                      ({"tee": "sgx", "min_isv_svn": 3}, "mrenclave or mrsigner"),
                      ({"tee": "tdx", "rtmr0": "00" * 48, "rtmr1": "11" * 48, "rtmr2": "22" * 48}, "mrtd")):
        with pytest.raises(PolicyError, match=f"pins no {root}") as e:
            parse_policy(json.dumps(doc))
        assert e.value.field == "tee"
    assert parse_policy({"tee": "sgx", "mrsigner": "ab" * 32, "isv_prod_id": 0}).mrsigner == "ab" * 32
    for weak in (weak_sgx, weak_tdx, Policy(tee="tdx")):        # built in code, not parsed: the client refuses too
        with pytest.raises(PolicyError, match="pins no"):
            attested_openai("https://127.0.0.1:9/v1", weak)


@pytest.mark.parametrize("pinned,served", [
    ({"length_bucket": True}, {"length_bucket": 1}),      # "bucketing on" must not match a bucket of 1 (off)
    ({"verify": 1}, {"verify": True}),
    ({"length_bucket": 16.0}, {"length_bucket": 16}),
    ({"deferred_checks": 0}, {"deferred_checks": False}),
    ({"protect": ["otp"]}, {"protect": "otp"})])
def test_settings_are_compared_as_json_types_not_with_python_equality(pinned, served):
    """Attack: a runner whose settings equal the policy's only under Python's == (True == 1 == 1.0)."""
    runner = SimulatedRunner(events=[{"type": fmt.EVENT_SETTINGS, "data": served}])
    nonce = os.urandom(32)
    (key,) = pinned
    refused = verify(runner.evidence(nonce), parse_policy({"tee": "simulated", "settings": pinned}), None, NOW,
                     allow_simulated=True, expect_nonce=nonce)
    assert (refused.accepted, refused.field) == (False, f"settings.{key}")
    same = verify(runner.evidence(nonce), parse_policy({"tee": "simulated", "settings": served}), None, NOW,
                  allow_simulated=True, expect_nonce=nonce)
    assert same.accepted, same.line()


def test_a_key_given_twice_is_refused_in_a_policy_and_in_evidence():
    """Attack: JSON with a key twice reads one way to a person or another parser (first) and another to
    Python (last): a published policy whose first "mrtd" is the reviewed one."""
    with pytest.raises(PolicyError) as e:
        parse_policy('{"tee": "tdx", "mrtd": "%s", "mrtd": "%s"}' % ("00" * 48, "11" * 48))
    assert e.value.field == "mrtd" and "twice" in str(e.value)
    doc = SimulatedRunner().evidence(os.urandom(32)).to_json()
    for key, dup in (("nonce", '"nonce":"%s",' % ("00" * 32)), ("event_log", '"event_log":[],')):
        with pytest.raises(fmt.FormatError) as e:
            fmt.parse_evidence("{" + dup + doc[1:])
        assert e.value.field == key
    nested = doc.replace('"protect":"otp"', '"protect":"otp","protect":null')
    assert nested != doc
    with pytest.raises(fmt.FormatError, match="protect: is given twice"):
        fmt.parse_evidence(nested)
    cert, _ = self_signed(extension=("{" + '"provider":"tdx",' + doc[1:]).encode())
    with pytest.raises(fmt.FormatError, match="provider: is given twice"):
        fmt.evidence_from_certificate(cert)


@pytest.mark.parametrize("text", [" " + "00" * 32, "00 " * 32, "0x" + "00" * 31, "00" * 31 + "0\n0", "g" * 64,
                                  "0" * 10**5], ids=["leading-space", "spaced", "0x", "newline", "not-hex", "100k"])
def test_hex_with_spaces_or_junk_is_refused_where_bytes_fromhex_would_take_it(text):
    """bytes.fromhex skips spaces; the nonce on the runner and in evidence, and a policy's measurements, are
    exactly 0-9a-f digits."""
    with pytest.raises(APIError) as e:
        parse_nonce(text)
    assert e.value.status == 400 and "nonce" in str(e.value.body())
    doc = json.loads(SimulatedRunner().evidence(os.urandom(32)).to_json())
    with pytest.raises(fmt.FormatError) as fe:
        fmt.parse_evidence({**doc, "nonce": text})
    assert fe.value.field == "nonce"
    with pytest.raises(PolicyError) as pe:
        parse_policy({"tee": "tdx", "mrtd": text if len(text) < 200 else "00 " * 48})
    assert pe.value.field == "mrtd"


def test_a_refusal_line_cannot_carry_terminal_escapes_from_the_peer(tmp_path):
    """Attack: evidence whose unknown field name (or a settings value) holds ESC sequences that erase the
    refusal on the user's terminal and print 'accepted' over it; the exit status alone would tell."""
    fake = "\x1b[1A\x1b[2Kattestation accepted\r"
    doc = json.loads(SimulatedRunner().evidence(os.urandom(32)).to_json())
    (tmp_path / "unknown.json").write_text(json.dumps({**doc, fake: 1}))
    runner = SimulatedRunner(events=[{"type": fmt.EVENT_SETTINGS, "data": {"protect": fake}}])
    (tmp_path / "settings.json").write_text(runner.evidence(os.urandom(32)).to_json())
    (tmp_path / "policy.json").write_text(json.dumps({"tee": "simulated", "settings": {"protect": "otp"}}))
    policy = tmp_path / "policy.json"
    runs = run_cli_many([("attest", "verify", tmp_path / name, "--allow-simulated", "--policy", policy)
                         for name in ("unknown.json", "settings.json")], timeout_s=120)
    for run in runs:
        assert run.returncode == 1 and run.stdout.startswith("refused"), run.stdout + run.stderr
        assert "\x1b" not in run.stdout and "\r" not in run.stdout and "\\x1b[1A" in run.stdout, repr(run.stdout)


def test_a_tdx_policy_refuses_the_real_sgx_quote_and_simulated_evidence_named_tdx():
    """Tee mismatch: an SGX quote (genuine, verifying) against a TDX policy; simulated evidence labelled tdx."""
    sgx, coll = real("sgx_quote")
    tdx_policy = parse_policy({"tee": "tdx", "mrtd": "00" * 48,
                               "allowed_tcb_statuses": ["UpToDate", "ConfigurationAndSWHardeningNeeded"]})
    verdict = verify(sgx, tdx_policy, coll, IN_WINDOW)
    assert (verdict.accepted, verdict.field, verdict.expected, verdict.found) == (False, "tee", "tdx", "sgx")
    ev = SimulatedRunner().evidence(os.urandom(32))
    relabelled = fmt.Evidence(**{**ev.__dict__, "provider": "tdx"})
    for allow in (False, True):
        v = verify(relabelled, tdx_policy, coll, IN_WINDOW, allow_simulated=allow)
        assert (v.accepted, v.field) == (False, "provider")


# ---- claim 1: the attested client sends nothing to a peer it did not verify ---------------------------------

class Listener(threading.Thread):
    """A plain TCP server counting every connection and byte it gets (a proxy from the environment)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port, self.connections, self.received, self.stop = self.sock.getsockname()[1], 0, bytearray(), False

    def run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            conn.settimeout(2)
            try:
                while data := conn.recv(65536):
                    self.received += data
            except OSError:
                pass
            conn.close()

    def close(self):
        self.stop = True
        self.join(5)
        self.sock.close()


class Reader(TlsServer):
    """The attacker's TLS server: records whatever the client sends and answers nothing useful."""

    def handle(self, tls):
        while True:
            head = bytearray()
            while b"\r\n\r\n" not in head:
                if not (data := tls.recv(65536)):
                    return
                head += data
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            while length and len(head.partition(b"\r\n\r\n")[2]) < int(length.group(1)):
                head += tls.recv(65536)
            self.record(bytes(head))          # the whole request is recorded before it is answered
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")


def test_a_proxy_or_mount_passed_to_the_client_cannot_take_the_place_of_the_attested_transport(tmp_path):
    """Attack: httpx gives a proxy or a mount precedence over `transport`, so a caller's proxy= (with verify
    off, natural for a self-signed runner) or mounts= routes the prompt around the attestation. The attack
    shown on httpx itself, then refused by attested_httpx."""
    attacker = Reader(tmp_path)
    attacker.start()
    try:
        attestation = Attestation(Policy(tee="simulated"), allow_simulated=True)
        bypass = httpx.Client(transport=AttestedTransport(attestation), trust_env=False,
                              mounts={"all://": httpx.HTTPTransport(verify=False)})
        assert bypass.post(attacker.url + "/v1/chat/completions", content=SECRET).status_code == 200
        assert SECRET.encode() in attacker.received and attestation.attested == 0     # the hole, in httpx
        for kw in ({"mounts": {"all://": httpx.HTTPTransport(verify=False)}}, {"proxy": "http://127.0.0.1:9"},
                   {"verify": False}, {"http2": True}, {"trust_env": True}, {"transport": httpx.HTTPTransport()}):
            with pytest.raises(TypeError, match=f"attested_httpx: {next(iter(kw))}"):
                attested_httpx(attestation, **kw)
        attacker.received.clear()
        with pytest.raises(AttestationRefused):
            attested_httpx(attestation).post(attacker.url + "/v1/chat/completions", content=SECRET)
        assert SECRET.encode() not in attacker.received and attacker.received.startswith(b"GET /v1/attestation?")
    finally:
        attacker.close()


def test_the_attested_client_writes_no_tls_key_log_even_with_sslkeylogfile_set(tmp_path, monkeypatch):
    """Attack: SSLKEYLOGFILE (a debugging variable often left set) makes ssl.create_default_context log each
    session's secrets; with the file, a recording of the traffic decrypts. The attested client logs none."""
    log = tmp_path / "keys.log"
    monkeypatch.setenv("SSLKEYLOGFILE", str(log))
    assert ssl.create_default_context().keylog_filename == str(log)          # what Python does by default
    attacker = Reader(tmp_path)
    attacker.start()
    try:
        with pytest.raises(AttestationRefused):
            attested_httpx(Attestation(Policy(tee="simulated"), allow_simulated=True)).get(attacker.url)
        assert attacker.received.startswith(b"GET /v1/attestation?")      # the handshake did happen
    finally:
        attacker.close()
    logged = [line for line in log.read_text().splitlines() if not line.startswith("#")]   # the header: ours, above
    assert logged == [], logged[:2]


class Trickler(TlsServer):
    """Answers the attestation GET with a header promising 100 kB, then a byte every 0.2 s: never silent
    for as long as a read timeout, never done."""

    def handle(self, tls):
        head = bytearray()
        while b"\r\n\r\n" not in head and (data := tls.recv(65536)):
            head += data
        self.record(bytes(head))
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        while not self.closing.is_set():
            tls.sendall(b" ")
            time.sleep(0.2)


def finishes_within(seconds: float, call) -> tuple[float, BaseException | None]:
    """(how long `call` took, what it raised), or a test failure when it is still waiting after `seconds`."""
    outcome = {}

    def run():
        t0 = time.monotonic()
        try:
            call()
        except BaseException as e:        # noqa: BLE001 (handed back to the test to assert on)
            outcome["error"] = e
        outcome["s"] = time.monotonic() - t0
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return outcome["s"], outcome.get("error")


def test_a_peer_trickling_its_evidence_cannot_hold_the_client(tmp_path):
    """Attack: a peer that sends the evidence a byte at a time, each within the read timeout, held the attested
    client (and `tsqp attest verify https://`) for as long as it liked. Every wait has a deadline."""
    from tsqp.client import remote
    attacker = Trickler(tmp_path)
    attacker.start()
    try:
        client = attested_httpx(Attestation(Policy(tee="simulated"), allow_simulated=True), timeout=1.0)
        took, error = finishes_within(10, lambda: client.post(attacker.url + "/v1/chat/completions", content=SECRET))
        # the last read's timeout is what is left of the deadline: a read timeout or a refusal, either way closed
        assert isinstance(error, (AttestationRefused, httpx.ReadTimeout)) and took < 3, (took, error)
        took, error = finishes_within(10, lambda: remote.fetch_evidence(attacker.url, os.urandom(32), timeout=1.0))
        assert isinstance(error, ValueError) and "took over 2 s" in str(error) and took < 4, (took, error)
        assert SECRET.encode() not in attacker.received
    finally:
        attacker.close()


# ---- claim 4: signed answers ----------------------------------------------------------------------------------

def signed_stream(attestor: Attestor, body: bytes, texts: list[str]) -> list[dict]:
    """A stream as the runner signs it (commands/api/attestation.AnswerSigner), then its usage chunk."""
    signer = AnswerSigner(attestor, body)
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [signer.chunk({**base, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]})
              for t in texts]
    chunks.append(signer.chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, 7))
    return chunks + [{**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(texts)}}]


def test_a_signed_stream_with_text_appended_after_the_signed_chunk_is_refused():
    """Attack: append chunks with text after the signed one (the signature covers the chunks up to the finish
    reason; before the fix check_answer ignored everything after it and said 'verified')."""
    key, public = new_answer_key()
    events = [*EVENTS, {"type": A.EVENT_ANSWER_KEY, "data": {"ed25519": public}}]
    attestor = Attestor(providers.Simulated(), events, key, TlsIdentity())
    attestor.certify(["127.0.0.1"])
    evidence = attestor.evidence(os.urandom(32))
    body = json.dumps({"messages": [{"role": "user", "content": SECRET}], "stream": True}).encode()
    chunks = signed_stream(attestor, body, ["Paris", "."])
    assert check_answer(chunks, body, evidence)["checked_rows"] == 7       # as sent, with the usage after it
    forged = {**chunks[0], "choices": [{"index": 0, "delta": {"content": " Send your key."}, "finish_reason": None}]}
    for name, tampered, field in (
            ("text after the signature", chunks + [forged], "answer[4]"),
            ("text before the usage", chunks[:-1] + [forged, chunks[-1]], "answer[3]"),
            ("a second signed stream after", chunks + signed_stream(attestor, body, ["Rome"]), "answer[4]"),
            ("a middle chunk dropped", chunks[:1] + chunks[2:], "statement.response_sha256"),
            ("truncated before the signature", chunks[:2], A.FIELD),
            ("another request's body", chunks, "statement.request_sha256")):
        other = body.replace(SECRET.encode(), b"hello") if name == "another request's body" else body
        with pytest.raises(A.AnswerError) as e:
            check_answer(tampered, other, evidence)
        assert e.value.field == field, name
    another_runner = Attestor(providers.Simulated(), [*EVENTS, {"type": A.EVENT_ANSWER_KEY,
                                                                "data": {"ed25519": new_answer_key()[1]}}],
                              key, TlsIdentity())
    with pytest.raises(A.AnswerError) as e:       # the same answer against another runner's evidence
        check_answer(chunks, body, another_runner.evidence(os.urandom(32), with_certificate=False))
    assert e.value.field == "signature"


def answering_attestor() -> Attestor:
    key, public = new_answer_key()
    attestor = Attestor(providers.Simulated(), [*EVENTS, {"type": A.EVENT_ANSWER_KEY, "data": {"ed25519": public}}],
                        key, TlsIdentity())
    attestor.certify(["127.0.0.1"])
    return attestor


def test_check_answer_refuses_simulated_evidence_unless_allowed_and_an_answer_with_a_key_twice(tmp_path):
    """`tsqp attest check-answer` as a user runs it: simulated evidence needs --allow-simulated; a completion
    whose "choices" is given twice (the genuine one last, which Python reads, a forged one first, which a
    first-wins reader shows) and a stream with a forged tail are refused; the genuine answer verifies."""
    attestor = answering_attestor()
    body = json.dumps({"messages": [{"role": "user", "content": SECRET}]}).encode()
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                               "finish_reason": "stop"}]}
    signed = AnswerSigner(attestor, body).completion(completion, 5)
    forged = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Send your key."},
                                      "finish_reason": "stop"}]})[1:-1]
    files = {"request": body, "evidence": attestor.evidence(os.urandom(32)).to_json().encode(),
             "policy": json.dumps({"tee": "simulated", "settings": EVENTS[2]["data"]}).encode(),
             "good": json.dumps(signed).encode(), "twice": ("{" + forged + "," + json.dumps(signed)[1:]).encode(),
             "tail": json.dumps(signed_stream(attestor, body, ["Paris"]) + [
                 {"choices": [{"index": 0, "delta": {"content": "!"}}]}]).encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert json.loads(files["twice"])["choices"] == signed["choices"]        # Python reads the genuine one
    common = ("--request", tmp_path / "request", "--evidence", tmp_path / "evidence", "--policy", tmp_path / "policy")
    runs = run_cli_many([("attest", "check-answer", tmp_path / name, *common, *extra) for name, extra in
                         (("good", ("--allow-simulated",)), ("good", ()), ("twice", ("--allow-simulated",)),
                          ("tail", ("--allow-simulated",)))], timeout_s=120)
    good, unallowed, twice, tail = runs
    assert good.returncode == 0 and "answer verified (SIMULATED" in good.stdout, good.stdout + good.stderr
    assert unallowed.returncode == 1 and "provider: expected a hardware TEE" in unallowed.stdout
    assert twice.returncode == 1 and twice.stdout.startswith("refused: choices:"), twice.stdout + twice.stderr
    assert tail.returncode == 1 and "refused: answer[" in tail.stdout, tail.stdout + tail.stderr


def test_a_certificate_carrying_another_runners_extension_is_refused():
    """Claim 3: runner B serves a certificate of its own key carrying runner A's boot evidence (copied
    extension). The evidence binds A's key; the certificate presented is B's."""
    a = answering_attestor()
    boot = fmt.evidence_from_certificate(a.tls.pem())
    copied, _ = self_signed(extension=boot.extension_value())
    verdict = verify(fmt.evidence_from_certificate(copied), Policy(tee="simulated"), None, NOW, allow_simulated=True)
    assert (verdict.accepted, verdict.field) == (False, "report_data")
    served = fmt.spki_sha256(copied)
    verdict = verify(boot, Policy(tee="simulated"), None, NOW, allow_simulated=True, expect_spki=served)
    assert (verdict.accepted, verdict.field) == (False, "spki")
    assert verify(boot, Policy(tee="simulated"), None, NOW, allow_simulated=True).accepted    # A's, as A serves it


# ---- the real runner process: claims 1, 3 and 5 ---------------------------------------------------------------

@pytest.fixture(scope="module")
def runner(smollm2_gguf, tmp_path_factory):
    """A real `tsqp api --attest simulated` (in-process compute: what is attacked is the runner's door), started
    with $SSLKEYLOGFILE set, as a careless or hostile environment would."""
    started = time.time()
    keylog = tmp_path_factory.mktemp("runner") / "keys.log"
    proc = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "api", "--local", "--model", str(smollm2_gguf),
                             "--attest", "simulated", "--port", "0", "--workers", "1", "--threads", "1",
                             "--device", "cpu", "--max-tokens", "16"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**clean_env(), "PYTHONUNBUFFERED": "1", "SSLKEYLOGFILE": str(keylog)})
    try:
        line = wait_line(proc, "Listening:", 180)
        wait_line(proc, "ready in", 60)
        url = re.search(r"(https://127\.0\.0\.1:\d+)/v1", line).group(1)
        policy = parse_policy(json.dumps({"tee": "simulated", "settings": {"attest": "simulated"}}))
        yield {"url": url, "port": int(url.rsplit(":", 1)[1]), "proc": proc, "started": started, "policy": policy,
               "keylog": keylog}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


CHAT = {"model": "SmolLM2-135M-Instruct.Q4_1", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": f"My name is {SECRET}. Say hi."}]}


def tcp_relay(client: socket.socket, upstream: socket.socket, seen: bytearray) -> None:
    """Raw bytes both ways (TLS records the relay cannot read) until a side closes or 30 s of silence."""
    while ready := select.select([client, upstream], [], [], 30)[0]:
        for src in ready:
            data = src.recv(65536)
            if not data:
                return
            if src is client:
                seen += data
            (upstream if src is client else client).sendall(data)


class SwitchingMiddle(TlsServer):
    """Connection 1: relays raw TCP to the runner (the client attests the real runner through it). Every later
    connection: ends the client's TLS with the attacker's own key, relays the attestation GET to the real
    runner over its own TLS, and hands back the runner's genuine, fresh evidence for the client's nonce."""

    def __init__(self, directory, upstream_port: int, strip_certificate: bool):
        super().__init__(directory)
        self.upstream_port, self.strip, self.accepted = upstream_port, strip_certificate, 0
        self.raw = bytearray()

    def _one(self, conn):
        self.accepted += 1
        if self.accepted == 1:
            with conn, socket.create_connection(("127.0.0.1", self.upstream_port)) as up:
                tcp_relay(conn, up, self.raw)
            return
        super()._one(conn)

    def handle(self, tls):
        head = bytearray()
        while b"\r\n\r\n" not in head and (data := tls.recv(65536)):
            head += data
        self.record(bytes(head))
        target = head.split(b" ")[1].decode()
        with httpx.Client(verify=client_tls(), trust_env=False) as up:
            doc = up.get(f"https://127.0.0.1:{self.upstream_port}{target}").json()
        if self.strip:
            doc.pop("certificate")
        body = json.dumps(doc).encode()
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body)
        while data := tls.recv(65536):
            self.record(data)


@pytest.mark.slow
@pytest.mark.parametrize("strip", [False, True], ids=["runner-evidence", "certificate-stripped"])
def test_a_middle_that_relays_the_first_connection_then_swaps_its_key_gets_no_prompt_byte(runner, tmp_path,
                                                                                           strip):
    """Attack (claims 1 and 3): let the client attest and cache the real runner through a raw relay, then, on
    the next pooled connection, present the attacker's key and relay the attestation GET to the real runner.
    The cached verdict is for the runner's key only; the fresh evidence binds the runner's key, not the one
    this handshake presented."""
    middle = SwitchingMiddle(tmp_path, runner["port"], strip)
    middle.start()
    try:
        client = attested_httpx(Attestation(runner["policy"], allow_simulated=True), timeout=120,
                                limits=httpx.Limits(max_keepalive_connections=0))     # a new connection each time
        first = client.post(middle.url + "/v1/chat/completions", json=CHAT)
        assert first.status_code == 200 and A.FIELD in first.json()
        assert SECRET.encode() not in middle.raw and len(middle.raw) > len(json.dumps(CHAT))   # ciphertext only
        with pytest.raises(AttestationRefused) as e:
            client.post(middle.url + "/v1/chat/completions", json=CHAT)
        assert e.value.verdict.field == ("report_data" if strip else "spki")
        assert middle.accepted == 2 and client._transport.attestation.attested == 2
        assert SECRET.encode() not in middle.received and middle.received.startswith(b"GET /v1/attestation?nonce=")
    finally:
        middle.close()


@pytest.mark.slow
def test_proxies_from_the_environment_see_nothing_and_the_answer_checks_only_for_its_own_request(runner,
                                                                                                 monkeypatch):
    """Attack: HTTPS_PROXY / ALL_PROXY / HTTP_PROXY pointing at the attacker. The attested client must not
    route through them (trust_env off); its signed answer then holds for its request and no other."""
    spy = Listener()
    spy.start()
    try:
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{spy.port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = attested_openai(runner["url"] + "/v1", runner["policy"], allow_simulated=True, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(**CHAT)
        answer = json.loads(raw.http_response.content)
        assert answer["choices"][0]["message"]["content"] and client.attestation.attested == 1
        assert (spy.connections, bytes(spy.received)) == (0, b"")
        evidence = fmt.parse_evidence(httpx.get(runner["url"] + "/v1/attestation", verify=client_tls(),
                                                params={"nonce": "ab" * 32}, trust_env=False).content)
        sent = raw.http_request.content
        assert check_answer(answer, sent, evidence)["request_sha256"] == hashlib.sha256(sent).hexdigest()
        with pytest.raises(A.AnswerError) as e:
            check_answer(answer, sent.replace(SECRET.encode(), b"Someone"), evidence)
        assert e.value.field == "statement.request_sha256"
    finally:
        spy.close()


def private_keys_in(path: Path) -> list:
    text = path.read_bytes()[:1 << 20]
    found = []
    for block in re.findall(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", text, re.S):
        try:
            found.append(serialization.load_pem_private_key(block, password=None))
        except (ValueError, TypeError):
            continue
    return found


@pytest.mark.slow
def test_the_tls_key_is_on_no_disk_and_in_no_open_file_of_the_runner(runner):
    """Look for the runner's private key (the one matching the certificate it serves) where a host could read
    it: every file the process has open or mapped, and every file written since it started under /tmp,
    /dev/shm, its cwd and $HOME/.cache."""
    pid = runner["proc"].pid
    with socket.create_connection(("127.0.0.1", runner["port"])) as s, \
            client_tls().wrap_socket(s) as tls:
        served = fmt.load_certificate(tls.getpeercert(True)).public_key().public_numbers()
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "memfd:tsqp-tls" not in maps
    open_files = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert not [f for f in open_files if "memfd:" in f or f.endswith((".pem", ".key"))], open_files
    candidates = {Path(f) for f in open_files if f.startswith("/") and Path(f).is_file()}
    for root in ("/tmp", "/dev/shm", os.readlink(f"/proc/{pid}/cwd"), str(Path.home() / ".cache")):
        for folder, _, names in os.walk(root, onerror=lambda e: None):     # others' files come and go
            for path in (Path(folder) / n for n in names):
                try:
                    st = path.stat()
                except OSError:
                    continue
                if path.is_file() and st.st_mtime >= runner["started"] - 1 and st.st_size < 1 << 20:
                    candidates.add(path)
    searched = 0
    for path in candidates:
        try:
            keys = private_keys_in(path)
        except OSError:
            continue
        searched += 1
        assert not [k for k in keys if getattr(k.public_key(), "public_numbers", lambda: None)() == served], path
    assert searched > 0
    secrets = [line for line in runner["keylog"].read_text().splitlines() if "SECRET" in line or "RANDOM" in line] \
        if runner["keylog"].exists() else []
    assert secrets == [], "the runner logged TLS session secrets to $SSLKEYLOGFILE"


def raw_http(port: int, request: bytes) -> bytes:
    """One hand-written plain HTTP/1.1 request to the local proxy; the whole answer (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(request)
        answer = bytearray()
        while data := s.recv(65536):
            answer += data
    return bytes(answer)


@pytest.mark.slow
def test_the_proxy_refuses_a_rebound_host_and_never_forwards_elsewhere(runner, tmp_path):
    """`tsqp attest proxy` as a real process. Attacks: a web page whose name was rebound to 127.0.0.1 (its
    Host header is its own name; before the fix the proxy forwarded it); an absolute-form request target
    naming another server (the proxy must still only talk to the attested runner)."""
    policy = tmp_path / "policy.json"
    policy.write_text(runner["policy"].to_json())
    proxy = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "attest", "proxy", runner["url"], "--listen",
                              "127.0.0.1:0", "--policy", str(policy), "--allow-simulated"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**clean_env(), "PYTHONUNBUFFERED": "1"})
    spy = Listener()
    spy.start()
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", wait_line(proxy, "Listening:", 120)).group(1))
        wait_line(proxy, "ready in", 30)
        body = json.dumps(CHAT).encode()
        post = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (b"%s", len(body))) + body
        rebound = raw_http(port, post.replace(b"%s", b"attacker.example:%d" % port, 1))
        assert rebound.startswith(b"HTTP/1.1 403") and b"loopback" in rebound, rebound[:300]
        elsewhere = raw_http(port, b"GET http://127.0.0.1:%d/v1/models HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                   b"Connection: close\r\n\r\n" % (spy.port, port))
        assert elsewhere.startswith(b"HTTP/1.1 "), elsewhere[:200]
        good = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, timeout=120, trust_env=False)
        assert good.status_code == 200 and A.FIELD in good.json(), good.text[:300]
        assert (spy.connections, bytes(spy.received)) == (0, b"")
    finally:
        spy.close()
        proxy.terminate()
        proxy.wait(20)


def raw_status(port: int, request: bytes) -> int:
    """The status code of one hand-written HTTP/1.1 request over TLS; 0 when the server hung up without one
    (uvicorn may close on an oversized request line while it is still being sent)."""
    head = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s, client_tls().wrap_socket(s) as tls:
        try:
            tls.sendall(request)
            while b"\r\n" not in head and (data := tls.recv(65536)):
                head += data
        except (ssl.SSLError, ConnectionError):
            pass
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


@pytest.mark.slow
def test_the_attestation_endpoint_survives_huge_malformed_and_flooding_requests(runner):
    """Attack (claim 5): nonces of 100 kB, bad hex, spaces; 40 requests at once. Each bad one is a 4xx naming
    the nonce (none takes a quote), the flood is cut by the token bucket with Retry-After, and the runner then
    still attests and answers."""
    url = runner["url"] + "/v1/attestation"
    with httpx.Client(verify=client_tls(), trust_env=False, timeout=60) as client:
        status = raw_status(runner["port"], b"GET /v1/attestation?nonce=" + b"00" * 50_000 + b" HTTP/1.1\r\n"
                            b"Host: x\r\n\r\n")      # 100 kB: past httpx's own URL limit, so by hand
        assert status == 0 or (400 <= status < 500 and status != 429), status      # refused, or hung up on
        for nonce in ("00" * 5_000, "zz" * 32, " " + "00" * 32, "00" * 31, None):
            r = client.get(url, params={"nonce": nonce} if nonce is not None else None)
            assert r.status_code == 400 and r.json()["error"]["param"] == "nonce", (nonce and nonce[:8], r.text)
        t0 = time.monotonic()
        with futures.ThreadPoolExecutor(16) as pool:
            flood = list(pool.map(lambda i: client.get(url, params={"nonce": os.urandom(32).hex()}), range(40)))
        elapsed = time.monotonic() - t0
        codes = [r.status_code for r in flood]
        assert set(codes) == {200, 429} and codes.count(200) <= 8 + 4 * elapsed + 1, (codes, elapsed)
        assert all(int(r.headers["retry-after"]) >= 1 for r in flood if r.status_code == 429)
        time.sleep(2.5)
        nonce = os.urandom(32)
        fresh = client.get(url, params={"nonce": nonce.hex()})
        assert fresh.status_code == 200 and fmt.parse_evidence(fresh.content).nonce == nonce
        assert base64.b64decode(fresh.json()["quote"])
    assert runner["proc"].poll() is None


@pytest.mark.slow
def test_one_peer_flooding_the_attestation_endpoint_leaves_quotes_for_another(runner):
    """Attack (claim 5): one client address floods GET /v1/attestation so that no new client can attest (each
    needs a fresh quote on its first connection). Before the per-peer bucket, the flood took every token of the
    shared bucket and the other client got 429. Two loopback source addresses stand for two hosts."""
    url = runner["url"] + "/v1/attestation"

    def from_address(address: str) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(verify=client_tls(), local_address=address),
                            trust_env=False, timeout=30)
    flooder, victim, stop, codes = from_address("127.0.0.2"), from_address("127.0.0.3"), threading.Event(), []

    def flood():
        with from_address("127.0.0.2") as own:
            while not stop.is_set():
                codes.append(own.get(url, params={"nonce": os.urandom(32).hex()}).status_code)
    threads = [threading.Thread(target=flood, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        got = []
        for _ in range(3):
            got.append(victim.get(url, params={"nonce": os.urandom(32).hex()}).status_code)
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        flooder.close()
        victim.close()
    assert codes.count(429) > codes.count(200) > 0, (codes.count(200), codes.count(429))
    assert got == [200, 200, 200], got
