"""Attestation end to end with the simulated provider: real processes (`tsqp serve` with the real SmolLM2-135M
GGUF; `tsqp api --attest simulated`, a plain `tsqp api` and one with other settings on that same server;
`tsqp attest ...` as the client runs it) and real attackers on loopback: a TLS-terminating man in the middle
with its own key and a server replaying captured evidence, each counting the plaintext it receives. The
oracle for the answer is the plain API's greedy answer (itself checked against transformers in test_api.py);
for "no prompt byte reached the peer", the bytes the attacker or the client's TLS layer actually saw."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from attest_net import ManInTheMiddle, RecordingBackend, Replayer
from conftest import clean_env, run_cli, start_server, stop_server
from tsqp.attestation import format as F
from tsqp.client.answers import check_answer
from tsqp.client.attested import Attestation, AttestationRefused, attested_httpx, attested_openai
from tsqp.client.policy import parse_policy
from tsqp.commands import launch

pytestmark = pytest.mark.slow

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
SECRET = "Xq7Zeta"                 # a marker in the prompt: no attacker may ever see it
MESSAGES = [{"role": "user", "content": f"My name is {SECRET}. What is the capital of France?"}]
MAX_TOKENS = 12


def start_api(*args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "api", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**clean_env(), "PYTHONUNBUFFERED": "1"})
    proc.endpoint = None
    return proc


def url_of(proc: subprocess.Popen) -> str:
    return re.search(r"Listening: (https?://127\.0\.0\.1:\d+)/v1", proc.banner).group(1)


@pytest.fixture(scope="module")
def runners(smollm2_gguf):
    """{"attested", "plain", "other"}: base URLs of three runners; "other" is attested too but runs other
    settings than the attested one's (--protect otp --verify, on a protected compute server of its own: tsqp
    api's engine needs --policy linear, so the split policy cannot be the setting that differs)."""
    server = start_server(str(smollm2_gguf), extra=("--max-sessions", "8", "--threads", "1"))
    masked = start_server(str(smollm2_gguf), extra=("--threads", "1", "--protect", "otp"))
    common = ("--endpoint", server.endpoint, "--model", str(smollm2_gguf), "--workers", "1", "--threads", "1",
              "--connect-timeout", "240", "--timeout", "60")
    procs = {"attested": start_api(*common, "--attest", "simulated"), "plain": start_api(*common),
             "other": start_api(common[0], masked.endpoint, *common[2:], "--attest", "simulated", "--protect", "otp",
                                "--verify")}
    try:
        launch.wait_ready([server, masked, *procs.values()], 300)
        assert "Attestation: SIMULATED" in procs["attested"].banner
        assert "Attestation: off (no TEE found (auto))" in procs["plain"].banner
        yield {name: url_of(p) for name, p in procs.items()}
    finally:
        launch.stop_servers(list(procs.values()))
        stop_server(server, own_dir=True)
        stop_server(masked, own_dir=True)


@pytest.fixture(scope="module")
def policy_file(runners, tmp_path_factory) -> Path:
    """The policy the attested runner's evidence implies, written by `tsqp attest policy` (the operator's step)."""
    path = tmp_path_factory.mktemp("policy") / "p.json"
    done = run_cli("attest", "policy", runners["attested"], "--allow-simulated", "-o", path, timeout_s=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return path


@pytest.fixture(scope="module")
def policy(policy_file):
    return parse_policy(policy_file.read_bytes())


@pytest.fixture(scope="module")
def plain_answer(runners) -> str:
    got = openai.OpenAI(base_url=runners["plain"] + "/v1", api_key="unused", max_retries=0, timeout=120) \
        .chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    return got.choices[0].message.content


def refusal(excinfo) -> AttestationRefused:
    """The AttestationRefused behind an openai connection error (or the error itself)."""
    e = excinfo.value
    while e is not None and not isinstance(e, AttestationRefused):
        e = e.__cause__ or e.__context__
    assert e is not None, f"not refused by attestation: {excinfo.value!r}"
    return e


# ---- the attested client ---------------------------------------------------------------------------------------
def test_attested_openai_client_gives_the_plain_answer_signed(runners, policy, plain_answer, policy_file, tmp_path):
    assert plain_answer.strip()
    client = attested_openai(runners["attested"] + "/v1", policy, allow_simulated=True, max_retries=0, timeout=120)
    got = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == plain_answer
    assert set(got.model_extra["tsqp_signature"]) == {"statement", "signature"}
    again = client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    assert again.choices[0].message.content == plain_answer
    assert client.attestation.attested == 1          # one key, attested once; its verdict is cached

    # the same request's exact bytes, its answer and the evidence, saved as a client would, then checked
    body = json.dumps({"model": MODEL_ID, "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS}).encode()
    with attested_httpx(Attestation(policy, allow_simulated=True), timeout=120) as http:
        answer = http.post(runners["attested"] + "/v1/chat/completions", content=body,
                           headers={"Content-Type": "application/json"})
        evidence = http.get(runners["attested"] + "/v1/attestation", params={"nonce": "ab" * 32})
    assert answer.json()["choices"][0]["message"]["content"] == plain_answer
    files = {name: tmp_path / f"{name}.json" for name in ("request", "answer", "evidence", "forged")}
    files["request"].write_bytes(body)
    files["answer"].write_bytes(answer.content)
    files["evidence"].write_bytes(evidence.content)
    forged = answer.json()
    forged["choices"][0]["message"]["content"] = "The capital of France is Rome."
    files["forged"].write_text(json.dumps(forged))
    check = ("--request", files["request"], "--evidence", files["evidence"], "--policy", policy_file,
             "--allow-simulated")
    ok, bad, unallowed = [run_cli("attest", "check-answer", files[name], *check[:len(check) - (name == "x")])
                          for name in ("answer", "forged")] + \
        [run_cli("attest", "check-answer", files["answer"], *check[:-1])]
    assert ok.returncode == 0 and "answer verified (SIMULATED evidence" in ok.stdout, ok.stdout + ok.stderr
    assert f"checkpoint_sha256: {policy.checkpoint_sha256}" in ok.stdout and "checked_rows: 0" in ok.stdout
    assert bad.returncode == 1 and "refused: statement.response_sha256" in bad.stdout
    assert unallowed.returncode == 1 and "refused (SIMULATED evidence: no hardware TEE): provider" in unallowed.stdout


def test_a_stream_ends_with_a_signature_over_its_chunks(runners, policy, plain_answer):
    body = json.dumps({"model": MODEL_ID, "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS,
                       "stream": True}).encode()
    with attested_httpx(Attestation(policy, allow_simulated=True), timeout=120) as http:
        with http.stream("POST", runners["attested"] + "/v1/chat/completions", content=body,
                         headers={"Content-Type": "application/json"}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        evidence = F.parse_evidence(http.get(runners["attested"] + "/v1/attestation",
                                             params={"nonce": "cd" * 32}).content)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == plain_answer
    stmt = check_answer(chunks, body, evidence)
    assert stmt["settings"]["attest"] == "simulated"


def test_simulated_evidence_is_refused_unless_allowed(runners, policy):
    sent = RecordingBackend()
    client = attested_openai(runners["attested"] + "/v1", policy, max_retries=0, inner=sent)
    with pytest.raises(openai.APIConnectionError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=4)
    assert refusal(e).verdict.field == "provider"
    assert sent.sent.startswith(b"GET /v1/attestation?nonce=") and SECRET.encode() not in sent.sent
    assert b"POST" not in sent.sent


# ---- what the client refuses, before any prompt byte reaches the peer -----------------------------------------
def test_a_tls_man_in_the_middle_with_its_own_key_sees_no_prompt_byte(runners, policy, plain_answer, tmp_path):
    mitm = ManInTheMiddle(tmp_path, int(runners["attested"].rsplit(":", 1)[1]))
    mitm.start()
    try:
        client = attested_openai(mitm.url + "/v1", policy, allow_simulated=True, max_retries=0, timeout=60)
        with pytest.raises(openai.APIConnectionError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
        assert refusal(e).verdict.field == "spki"          # the runner's evidence binds the runner's key, not its
        attested_only = bytes(mitm.received)
        assert attested_only.startswith(b"GET /v1/attestation?nonce=") and b"POST" not in attested_only
        assert SECRET.encode() not in attested_only
        # the attack is real: an unattested client (TLS without a pinned key) hands the middle its prompt
        naive = openai.OpenAI(base_url=mitm.url + "/v1", api_key="unused", max_retries=0, timeout=120,
                              http_client=httpx.Client(verify=False, timeout=120))
        got = naive.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
        assert got.choices[0].message.content == plain_answer
        assert SECRET.encode() in bytes(mitm.received)
    finally:
        mitm.close()


def test_a_runner_with_other_settings_or_another_model_is_refused(runners, policy):
    sent = RecordingBackend()
    other = attested_openai(runners["other"] + "/v1", policy, allow_simulated=True, max_retries=0, inner=sent)
    with pytest.raises(openai.APIConnectionError) as e:
        other.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=4)
    verdict = refusal(e).verdict
    assert (verdict.field, verdict.expected, verdict.found) == ("settings.protect", "None", "otp")
    another = parse_policy({**policy.to_dict(), "checkpoint_sha256": hashlib.sha256(b"another model").hexdigest()})
    other_model = attested_openai(runners["attested"] + "/v1", another, allow_simulated=True, max_retries=0,
                                  inner=sent)
    with pytest.raises(openai.APIConnectionError) as e:
        other_model.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=4)
    assert refusal(e).verdict.field == "checkpoint_sha256"
    assert sent.sent.count(b"GET /v1/attestation?nonce=") == 2 and SECRET.encode() not in sent.sent
    assert b"POST" not in sent.sent


@pytest.mark.parametrize("variant, field", [("verbatim", "nonce"), ("nonce rewritten", "spki"),
                                            ("nonce rewritten, certificate dropped", "report_data")])
def test_replayed_evidence_is_refused_against_a_fresh_nonce(runners, policy, tmp_path, variant, field):
    old = httpx.get(runners["attested"] + "/v1/attestation", params={"nonce": "11" * 32}, verify=False).json()

    def rewrite(doc: dict, nonce_hex: str) -> dict:
        if variant != "verbatim":
            doc["nonce"] = nonce_hex
        if "dropped" in variant:
            doc.pop("certificate")
        return doc

    replayer = Replayer(tmp_path, old, rewrite)
    replayer.start()
    try:
        client = attested_openai(replayer.url + "/v1", policy, allow_simulated=True, max_retries=0, timeout=60)
        with pytest.raises(openai.APIConnectionError) as e:
            client.chat.completions.create(model=MODEL_ID, messages=MESSAGES, temperature=0, max_tokens=4)
        assert refusal(e).verdict.field == field
        seen = bytes(replayer.received)
        assert seen.startswith(b"GET /v1/attestation?nonce=") and SECRET.encode() not in seen and b"POST" not in seen
    finally:
        replayer.close()


# ---- the commands a user types ---------------------------------------------------------------------------------
def test_attest_verify_an_https_runner(runners, policy_file):
    ok, unallowed, other = (run_cli("attest", "verify", runners["attested"], "--policy", policy_file,
                                    "--allow-simulated"),
                            run_cli("attest", "verify", runners["attested"], "--policy", policy_file),
                            run_cli("attest", "verify", runners["other"], "--policy", policy_file, "--allow-simulated"))
    assert ok.returncode == 0 and "accepted (SIMULATED evidence: no hardware TEE): Simulated" in ok.stdout, ok.stdout
    assert "key, event log and nonce bound in REPORTDATA" in ok.stdout
    assert unallowed.returncode == 1 and ": provider: expected a hardware TEE" in unallowed.stdout
    assert other.returncode == 1 and "settings.protect: expected None, found otp" in other.stdout, other.stdout


def test_attest_proxy_serves_curl_over_the_attested_channel(runners, policy_file, plain_answer, tmp_path):
    proxy = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "attest", "proxy", runners["attested"], "--listen",
                              "127.0.0.1:0", "--policy", str(policy_file), "--allow-simulated"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**clean_env(), "PYTHONUNBUFFERED": "1"})
    proxy.endpoint = None
    refused = run_cli("attest", "proxy", runners["other"], "--listen", "127.0.0.1:0", "--policy", policy_file,
                      "--allow-simulated")
    try:
        launch.wait_ready([proxy], 120)
        local = re.search(r"Listening: (http://127\.0\.0\.1:\d+)", proxy.banner).group(1)
        body = json.dumps({"model": MODEL_ID, "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS})
        curl = subprocess.run(["curl", "-sS", "--max-time", "120", local + "/v1/chat/completions", "-H",
                               "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=150)
        assert curl.returncode == 0, curl.stderr
        answer = json.loads(curl.stdout)
        assert answer["choices"][0]["message"]["content"] == plain_answer and "tsqp_signature" in answer
    finally:
        launch.stop_servers([proxy])
    assert refused.returncode == 1 and "settings.protect: expected None, found otp" in refused.stdout, refused.stdout
    wide = run_cli("attest", "proxy", runners["attested"], "--listen", "0.0.0.0:0", "--policy", policy_file)
    assert wide.returncode == 2 and "loopback only" in wide.stderr
