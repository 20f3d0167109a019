"""The runner's half of attestation, without a compute server: the providers' file protocols (configfs-tsm and
Gramine's /dev/attestation driven through directory trees this test writes, with FIFOs standing in for the
kernel's report files: our file protocol, honestly labelled, not a real TEE), the event log's code digest
against coreutils' sha256sum, the TLS key that never touches the disk, the token bucket, answer signatures
checked by the client's code, and `tsqp api`'s refusals (a real process each)."""
from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import clean_env, run_cli
from tsqp.attestation import answer as A
from tsqp.attestation import format as F
from tsqp.attestation.quote import check_simulated_quote, parse_quote
from tsqp.client.answers import check_answer
from tsqp.client.policy import parse_policy
from tsqp.client.verify import verify
from tsqp.commands.api.attestation import AnswerSigner, TokenBucket, parse_nonce
from tsqp.commands.api.schema import APIError
from tsqp.trusted.attest import identity, providers
from tsqp.trusted.attest.attestor import Attestor, new_answer_key
from tsqp.trusted.attest.tls import TlsIdentity

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"protect": "otp", "verify": True, "deferred_checks": False, "policy": "linear", "length_bucket": 16,
            "attest": "simulated"}


def events_for(answer_hex: str, settings: dict = SETTINGS) -> list[dict]:
    return identity.event_log(model="m", checkpoint="ab" * 32, weights_fingerprint="cd" * 32, settings=settings,
                              server_fingerprint="cd" * 32, server_model="m.gguf", answer_key_hex=answer_hex)


def simulated_attestor() -> Attestor:
    key, public = new_answer_key()
    attestor = Attestor(providers.Simulated(), events_for(public), key, TlsIdentity())
    attestor.certify(["127.0.0.1"])
    return attestor


# ---- configfs-tsm and Gramine: the file protocols -------------------------------------------------------------
class FakeTsmKernel(threading.Thread):
    """Plays the kernel's side of one configfs-tsm report entry: inblob and outblob are FIFOs, so our write
    blocks until this 'kernel' reads it, and our read sees exactly the outblob this thread writes afterwards,
    with the generation counter bumped in between (as configfs-tsm does)."""

    def __init__(self, entry: Path, make_quote, concurrent_writer: bool = False):
        super().__init__(daemon=True)
        self.entry, self.make_quote, self.concurrent = entry, make_quote, concurrent_writer
        entry.mkdir(parents=True)
        (entry / "provider").write_text("tdx_guest\n")
        (entry / "generation").write_text("0\n")
        os.mkfifo(entry / "inblob")
        os.mkfifo(entry / "outblob")
        self.seen: list[bytes] = []

    def run(self):
        with open(self.entry / "inblob", "rb") as f:
            report_data = f.read()
        self.seen.append(report_data)
        (self.entry / "generation").write_text("2\n" if self.concurrent else "1\n")
        with open(self.entry / "outblob", "wb") as f:
            f.write(self.make_quote(report_data))


def test_configfs_tsm_protocol_writes_reportdata_and_reads_the_quote(tmp_path):
    reports, measurements = tmp_path / "tsm" / "report", tmp_path / "measurements"
    measurements.mkdir(parents=True)
    (measurements / "rtmr3:sha384").write_bytes(bytes(48))
    kernel = FakeTsmKernel(reports / "e", lambda rd: b"QUOTE" + rd)
    kernel.start()
    tsm = providers.open_provider("tdx", providers.Roots(reports=reports, measurements=measurements, entry="e"))
    assert tsm.name == "tdx" and tsm.rtmr3_extended
    rd = hashlib.sha512(b"x").digest()
    assert tsm.quote(rd) == b"QUOTE" + rd and kernel.seen == [rd]
    kernel.join(5)
    digest = hashlib.sha384(b"event").digest()
    assert tsm.extend_rtmr3(digest) and (measurements / "rtmr3:sha384").read_bytes() == digest
    with pytest.raises(ValueError, match="48 bytes"):
        tsm.extend_rtmr3(b"short")


def test_configfs_tsm_detects_a_concurrent_writer_and_a_foreign_provider(tmp_path):
    reports = tmp_path / "report"
    kernel = FakeTsmKernel(reports / "e", lambda rd: b"Q", concurrent_writer=True)
    kernel.start()
    tsm = providers.ConfigfsTsm(reports, tmp_path / "none", entry="e")
    assert not tsm.rtmr3_extended          # no measurements file: the log is bound through REPORTDATA only
    with pytest.raises(providers.AttestationError, match="another writer"):
        tsm.quote(bytes(64))
    (reports / "f").mkdir()
    (reports / "f" / "provider").write_text("sev_guest\n")
    with pytest.raises(providers.AttestationError, match="provider is sev-snp"):
        providers.open_provider("tdx", providers.Roots(reports=reports, entry="f"))
    (reports / "g").mkdir()
    (reports / "g" / "provider").write_text("mystery\n")
    with pytest.raises(providers.AttestationError, match="mystery"):
        providers.ConfigfsTsm(reports, entry="g")


def test_rtmr3_already_extended_by_someone_else_is_left_alone(tmp_path):
    reports, measurements = tmp_path / "report", tmp_path / "m"
    measurements.mkdir()
    (measurements / "rtmr3:sha384").write_bytes(b"\x01" * 48)
    (reports / "e").mkdir(parents=True)
    (reports / "e" / "provider").write_text("tdx_guest\n")
    tsm = providers.ConfigfsTsm(reports, measurements, entry="e")
    assert not tsm.rtmr3_extended and not tsm.extend_rtmr3(bytes(48))
    assert (measurements / "rtmr3:sha384").read_bytes() == b"\x01" * 48


def test_gramine_protocol(tmp_path):
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text("dcap")
    (root / "quote").write_bytes(b"SGXQUOTE")
    sgx = providers.open_provider("sgx", providers.Roots(gramine=root))
    rd = bytes(range(64))
    assert sgx.name == "sgx" and sgx.quote(rd) == b"SGXQUOTE"
    assert (root / "user_report_data").read_bytes() == rd
    (root / "attestation_type").write_text("none")
    with pytest.raises(providers.AttestationError, match='remote_attestation = "dcap"'):
        providers.Gramine(root)


def test_auto_finds_nothing_here_and_named_tees_say_what_is_missing(tmp_path):
    nothing = providers.Roots(reports=tmp_path / "no", gramine=tmp_path / "no", measurements=tmp_path / "no")
    assert providers.open_provider("auto", nothing) is None
    assert providers.open_provider("off") is None
    with pytest.raises(providers.AttestationError, match="configfs"):
        providers.open_provider("tdx", nothing)
    with pytest.raises(providers.AttestationError, match="Gramine"):
        providers.open_provider("sgx", nothing)


# ---- the event log and the evidence -------------------------------------------------------------------------
def test_code_digest_is_coreutils_sha256sum_of_the_package():
    listing = subprocess.run("find tsqp -name '*.py' | LC_ALL=C sort | xargs sha256sum | sha256sum", shell=True,
                             cwd=REPO, capture_output=True, text=True, check=True).stdout.split()[0]
    assert identity.code_sha256(REPO / "tsqp") == listing


def test_simulated_evidence_binds_key_log_and_nonce_and_replays_rtmr3():
    attestor = simulated_attestor()
    nonce = os.urandom(32)
    ev = F.parse_evidence(attestor.evidence(nonce).to_json())
    body = check_simulated_quote(ev.quote)
    assert body.report_data == F.report_data(attestor.tls.spki_sha256, F.replay(ev.event_log), nonce)
    assert body.rtmr3 == F.replay(ev.event_log) and ev.rtmr3_extended
    assert F.spki_sha256(ev.certificate) == attestor.tls.spki_sha256
    boot = F.evidence_from_certificate(attestor.tls.pem())     # the certificate carries the boot evidence
    assert boot.nonce == F.BOOT_NONCE and parse_quote(boot.quote).report_data == \
        F.report_data(attestor.tls.spki_sha256, F.replay(boot.event_log), F.BOOT_NONCE)
    policy = parse_policy({"tee": "simulated", "settings": SETTINGS, "checkpoint_sha256": "ab" * 32})
    assert verify(ev, policy, None, int(time.time()), allow_simulated=True, expect_nonce=nonce).accepted


def test_tls_context_serves_the_attested_key_loaded_through_a_closed_memfd(monkeypatch):
    attestor = simulated_attestor()
    made = []
    real = os.memfd_create
    monkeypatch.setattr(os, "memfd_create", lambda *a: made.append(real(*a)) or made[-1])
    before = set(os.listdir("/proc/self/fd"))
    ctx = attestor.tls.ssl_context()
    assert len(made) == 1 and set(os.listdir("/proc/self/fd")) == before     # the key went through a memfd, closed
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    server.check_hostname, server.verify_mode = False, ssl.CERT_NONE
    a, b = __import__("socket").socketpair()
    out = {}

    def serve():
        with ctx.wrap_socket(a, server_side=True) as s:
            s.recv(1)

    t = threading.Thread(target=serve)
    t.start()
    with server.wrap_socket(b) as c:
        out["spki"] = F.spki_sha256(c.getpeercert(True))
        c.send(b"x")
    t.join(5)
    assert out["spki"] == attestor.tls.spki_sha256


# ---- rate limit, nonce, signatures -----------------------------------------------------------------------------
def test_token_bucket_refuses_past_its_burst_then_refills():
    bucket = TokenBucket(rate=20.0, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take()
    assert 0 < wait <= 0.05 + 1e-6
    time.sleep(wait + 0.01)
    assert bucket.take() == 0.0


def test_nonce_parsing_names_what_is_wrong():
    assert parse_nonce("00" * 32) == bytes(32)
    for bad, words in ((None, r"needs \?nonce"), ("zz", "hex"), ("00" * 31, "32 bytes")):
        with pytest.raises(APIError, match=words):
            parse_nonce(bad)


def test_signed_answers_check_and_any_change_is_named():
    attestor = simulated_attestor()
    evidence = F.parse_evidence(attestor.evidence(os.urandom(32)).to_json())
    request = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
    completion = {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "Hello \u00e9"}, "finish_reason": "stop"}]}
    signed = AnswerSigner(attestor, request).completion(completion, checked_rows=96)
    stmt = check_answer(signed, request, evidence)
    assert stmt["checked_rows"] == 96 and stmt["settings"] == SETTINGS and stmt["weights_fingerprint"] == "cd" * 32
    tampered = {**signed, "choices": [{**signed["choices"][0], "message": {"role": "assistant", "content": "Bye"}}]}
    for answer, req, field in ((tampered, request, "statement.response_sha256"),
                               (signed, request + b" ", "statement.request_sha256")):
        with pytest.raises(A.AnswerError) as e:
            check_answer(answer, req, evidence)
        assert e.value.field == field
    other = simulated_attestor()           # another runner's evidence: another answer key
    with pytest.raises(A.AnswerError, match="signature"):
        check_answer(signed, request, F.parse_evidence(other.evidence(os.urandom(32)).to_json()))
    chunks = [{"id": "c2", "choices": [{"delta": {"content": t}, "finish_reason": None}]} for t in ("a", "b")]
    signer = AnswerSigner(attestor, request)
    sent = [signer.chunk(c) for c in chunks] + [signer.chunk({"id": "c2", "choices": [{"finish_reason": "stop"}]}, 5)]
    assert check_answer(sent, request, evidence)["checked_rows"] == 5
    with pytest.raises(A.AnswerError, match="response_sha256"):
        check_answer(sent[1:], request, evidence)          # a chunk dropped


# ---- tsqp api's rules, as real processes -----------------------------------------------------------------------
def test_api_refusals_name_the_flag(smollm2_gguf, tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    protect_wide = run_cli("api", "--model", smollm2_gguf, "--protect", "otp", "--host", "0.0.0.0", "--port", "0",
                           "--endpoint", f"ipc://{tmp_path}/none.ipc")
    tls_with_attest = run_cli("api", "--model", smollm2_gguf, "--attest", "simulated", "--tls-cert", cert,
                              "--tls-key", cert, "--port", "0", "--endpoint", f"ipc://{tmp_path}/none.ipc")
    no_tee = run_cli("api", "--model", smollm2_gguf, "--attest", "tdx", "--port", "0")
    assert protect_wide.returncode == 2, protect_wide.stderr
    assert "--protect on --host 0.0.0.0 without attestation" in protect_wide.stderr
    assert "--attest off to serve anyway" in protect_wide.stderr
    assert tls_with_attest.returncode == 2 and "--tls-cert with attestation (simulated)" in tls_with_attest.stderr
    assert no_tee.returncode == 2 and "--attest tdx" in no_tee.stderr and "configfs" in no_tee.stderr


@pytest.mark.slow
def test_api_protect_beyond_loopback_with_attest_off_starts_and_warns(smollm2_gguf):
    from tsqp.commands import launch
    proc = subprocess.Popen([__import__("sys").executable, "-m", "tsqp.cli", "api", "--local", "--model",
                             str(smollm2_gguf), "--protect", "otp", "--host", "0.0.0.0", "--port", "0", "--attest",
                             "off", "--workers", "1", "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**clean_env(), "PYTHONUNBUFFERED": "1"})
    proc.endpoint = None
    try:
        launch.wait_ready([proc], 240)
        assert "WARNING: --attest off on --host 0.0.0.0" in proc.banner
        assert "Attestation: off (--attest off)" in proc.banner
        assert "Listening: http://0.0.0.0:" in proc.banner
    finally:
        launch.stop_servers([proc])


def test_settings_event_lists_what_a_policy_pins():
    args = SimpleNamespace(protect="otp", verify=True, deferred_checks=True, policy="linear", length_bucket=8)
    assert identity.settings_of(args, "tdx") == {"protect": "otp", "verify": True, "deferred_checks": True,
                                                 "policy": "linear", "length_bucket": 8, "attest": "tdx"}


def test_run_json_carries_evidence_over_its_own_output(tmp_path):
    out = tmp_path / "run.json"
    done = run_cli("run", "--local", "--model", "random:tiny", "--attest", "simulated", "--tokens", "8",
                   "--max-new-tokens", "3", "--json", out, timeout_s=120)
    assert done.returncode == 0, done.stderr
    assert "Attestation: SIMULATED" in done.stdout
    result = json.loads(out.read_text())
    output = {"prompt_ids": result["prompt_ids"], "generated_ids": result["generated_ids"]}
    nonce = hashlib.sha256(F.canonical_json(output)).digest()       # recomputed here from the run's own fields
    ev = F.parse_evidence(result["attestation"]["evidence"])
    policy = parse_policy({"tee": "simulated", "settings": {"protect": None, "attest": "simulated"}})
    assert verify(ev, policy, None, int(time.time()), allow_simulated=True, expect_nonce=nonce).accepted
    other = verify(ev, policy, None, int(time.time()), allow_simulated=True, expect_nonce=bytes(32))
    assert not other.accepted and other.field == "nonce"


def test_without_memfd_the_key_goes_only_to_a_named_tmpfs_and_is_unlinked(monkeypatch, tmp_path):
    attestor = simulated_attestor()

    def no_memfd(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    monkeypatch.delenv("TSQP_KEY_TMPFS", raising=False)
    with pytest.raises(RuntimeError, match="TSQP_KEY_TMPFS"):
        attestor.tls.ssl_context()
    monkeypatch.setenv("TSQP_KEY_TMPFS", str(tmp_path))
    assert isinstance(attestor.tls.ssl_context(), ssl.SSLContext) and list(tmp_path.iterdir()) == []


def test_the_gramine_manifest_template_renders_to_the_settings_docs_promise():
    import tomllib

    import jinja2

    gramine = SimpleNamespace(libos="/usr/lib/gramine/libsysdb.so", runtimedir=lambda: "/usr/lib/gramine/runtime")
    text = jinja2.Template((REPO / "deploy" / "gramine" / "tsqp-api.manifest.template").read_text()).render(
        gramine=gramine, python=SimpleNamespace(stdlib="/usr/lib/python3.11", distlib="/usr/lib/python3/dist-packages"),
        log_level="error", arch_libdir="/lib/x86_64-linux-gnu", entrypoint="/usr/bin/python3.11", tsqp_dir="/opt/tsqp",
        model="/models/m.gguf", env={})
    manifest = tomllib.loads(text)
    sgx = manifest["sgx"]
    assert sgx["remote_attestation"] == "dcap" and sgx["debug"] is False
    assert {"file:/opt/tsqp/tsqp/", "file:/models/m.gguf"} <= set(sgx["trusted_files"])
    argv = manifest["loader"]["argv"]
    assert argv[argv.index("--attest") + 1] == "sgx" and "--protect" in argv and "--verify" in argv
