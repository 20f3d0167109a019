"""The verifier on real Intel quotes (../shared/attestation, dcap-qvl as the chain's checker) and on simulated
evidence built with tsqp.attestation.format: what it accepts, and the field it names when it refuses."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket

import dcap_qvl
import pytest

from attest_helpers import (EVENTS, SHARED, SimulatedRunner, attestation_handler, http_server, pccs_handler,
                            self_signed)
from conftest import run_cli, run_cli_many
from tsqp.attestation import format as fmt
from tsqp.attestation.quote import parse_quote
from tsqp.client.policy import PolicyError, parse_policy
from tsqp.client.verify import Refused, check_policy_on_body, verify

IN_WINDOW = dt.datetime(2025, 7, 1, tzinfo=dt.timezone.utc)
OUTDATED_WINDOW = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
TDX, SGX, OUTDATED = (SHARED / n for n in ("tdx_quote", "sgx_quote", "tdx_quote_outdated"))


def collateral(quote_path) -> str:
    return (quote_path.parent / f"{quote_path.name}_collateral.json").read_text()


def oracle_report(quote_path, at=IN_WINDOW) -> dict:
    """dcap-qvl's own verified report for the unmodified quote: the reference values a policy would pin."""
    report = dcap_qvl.verify(quote_path.read_bytes(), dcap_qvl.QuoteCollateralV3.from_json(collateral(quote_path)),
                             int(at.timestamp()))
    (body,) = json.loads(report.to_json())["report"].values()
    return body


def tdx_policy(**overrides):
    ref = oracle_report(TDX)
    doc = {"tee": "tdx", "mrtd": ref["mr_td"], "rtmr0": ref["rt_mr0"], "rtmr1": ref["rt_mr1"], "rtmr2": ref["rt_mr2"]}
    return parse_policy({**doc, **overrides})


def sgx_policy(**overrides):
    ref = oracle_report(SGX)
    return parse_policy({"tee": "sgx", "mrenclave": ref["mr_enclave"], "mrsigner": ref["mr_signer"], **overrides})


def test_the_tdx_quote_is_accepted_up_to_date_with_its_measurements():
    verdict = verify(TDX.read_bytes(), tdx_policy(), collateral(TDX), IN_WINDOW)
    ref = oracle_report(TDX)
    assert verdict.accepted, verdict.line()
    assert (verdict.tcb_status, verdict.advisories, verdict.simulated) == ("UpToDate", (), False)
    assert [verdict.measurements[k] for k in ("mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3")] == \
        [ref[k] for k in ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3")]


def test_the_sgx_quote_reports_its_status_and_advisories_and_is_accepted_only_when_the_policy_allows_it():
    refused = verify(SGX.read_bytes(), sgx_policy(), collateral(SGX), IN_WINDOW)
    assert (refused.accepted, refused.field, refused.expected) == (False, "tcb_status", "UpToDate")
    assert refused.found == "ConfigurationAndSWHardeningNeeded (advisories INTEL-SA-00289, INTEL-SA-00615)"
    allowed = sgx_policy(allowed_tcb_statuses=["UpToDate", "ConfigurationAndSWHardeningNeeded"])
    verdict = verify(SGX.read_bytes(), allowed, collateral(SGX), IN_WINDOW)
    assert verdict.accepted, verdict.line()
    assert (verdict.tcb_status, verdict.advisories) == ("ConfigurationAndSWHardeningNeeded",
                                                        ("INTEL-SA-00289", "INTEL-SA-00615"))
    ref = oracle_report(SGX)
    assert (verdict.measurements["mrenclave"], verdict.measurements["mrsigner"]) == (ref["mr_enclave"], ref["mr_signer"])


@pytest.mark.parametrize("at", [dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc),   # TCB info not yet issued
                                dt.datetime(2025, 8, 1, tzinfo=dt.timezone.utc),   # TCB info expired
                                dt.datetime(2026, 12, 7, tzinfo=dt.timezone.utc)])  # a CRL expired
def test_outside_the_collateral_window_the_quote_is_refused(at):
    verdict = verify(TDX.read_bytes(), tdx_policy(), collateral(TDX), at)
    assert (verdict.accepted, verdict.field) == (False, "collateral"), verdict.line()
    assert at.isoformat() in verdict.expected


def signed_offsets(raw: bytes, count: int = 40) -> list[int]:
    """`count` offsets spread over what a signature covers: header, body, the quote's ECDSA signature and
    attestation key, the QE report and its signature, the QE auth data and the PCK leaf and intermediate
    certificates (the chain's copy of Intel's root is not read: dcap-qvl pins its own root)."""
    regions = [(0, 48), (48, 632), (636, 700), (700, 764), (770, 1154), (1154, 1218), (1220, 1252)]
    chain_start = 1258
    chain_end = raw.index(b"-----BEGIN CERTIFICATE-----", raw.index(b"-----BEGIN CERTIFICATE-----", chain_start) + 1)
    chain_end = raw.index(b"-----END CERTIFICATE-----", chain_end)
    regions.append((chain_start, chain_end))
    per = count // len(regions)
    offsets = []
    for start, end in regions:
        for k in range(per):
            o = start + (end - start) * k // per + (end - start) // (2 * per)
            while raw[o:o + 1] in (b"\n", b"\r", b" "):   # PEM line breaks are not part of any certificate
                o += 1
            offsets.append(o)
    return offsets


FLIPS = [(o, k % 8) for k, o in enumerate(signed_offsets(TDX.read_bytes()))]


@pytest.mark.parametrize("offset,bit", FLIPS, ids=[f"byte{o}-bit{b}" for o, b in FLIPS])
def test_any_single_flipped_bit_is_refused(offset, bit):
    raw = bytearray(TDX.read_bytes())
    raw[offset] ^= 1 << bit
    verdict = verify(bytes(raw), tdx_policy(), collateral(TDX), IN_WINDOW)
    assert not verdict.accepted
    assert verdict.field in ("quote.signature", "quote.header", "quote.body_type", "quote"), verdict.line()


def test_a_policy_naming_another_mrtd_or_mrenclave_is_refused():
    other = "00" * 47 + "01"
    verdict = verify(TDX.read_bytes(), tdx_policy(mrtd=other), collateral(TDX), IN_WINDOW)
    assert (verdict.field, verdict.expected, verdict.found) == ("mrtd", other, oracle_report(TDX)["mr_td"])
    allowed = ["ConfigurationAndSWHardeningNeeded"]
    verdict = verify(SGX.read_bytes(), sgx_policy(mrenclave="11" * 32, allowed_tcb_statuses=allowed),
                     collateral(SGX), IN_WINDOW)
    assert (verdict.accepted, verdict.field, verdict.expected) == (False, "mrenclave", "11" * 32)
    verdict = verify(SGX.read_bytes(), sgx_policy(min_isv_svn=1, allowed_tcb_statuses=allowed), collateral(SGX),
                     IN_WINDOW)
    assert (verdict.field, verdict.expected, verdict.found) == ("isv_svn", ">= 1", "0")


def test_a_tcb_status_the_policy_does_not_allow_is_refused():
    verdict = verify(TDX.read_bytes(), tdx_policy(allowed_tcb_statuses=["SWHardeningNeeded"]), collateral(TDX),
                     IN_WINDOW)
    assert (verdict.accepted, verdict.field, verdict.found) == (False, "tcb_status", "UpToDate")


def test_the_debug_attribute_is_refused_unless_the_policy_allows_it():
    raw = bytearray(TDX.read_bytes())
    raw[168] |= 1                        # TDATTRIBUTES.DEBUG
    assert not verify(bytes(raw), tdx_policy(), collateral(TDX), IN_WINDOW).accepted   # the signature breaks
    body = parse_quote(bytes(raw))
    assert body.debug and not parse_quote(TDX.read_bytes()).debug
    with pytest.raises(Refused) as e:
        check_policy_on_body(body, tdx_policy())
    assert e.value.field == "debug"
    check_policy_on_body(body, tdx_policy(allow_debug=True))
    sgx = bytearray(SGX.read_bytes())
    sgx[96] |= 2                         # ATTRIBUTES.FLAGS.DEBUG
    with pytest.raises(Refused, match="debug"):
        check_policy_on_body(parse_quote(bytes(sgx)), sgx_policy())


def test_the_outdated_quote_is_refused_no_matching_tcb_level():
    policy = parse_policy({"tee": "tdx", "mrtd": parse_quote(OUTDATED.read_bytes()).mrtd.hex(),
                           "allowed_tcb_statuses": ["UpToDate", "OutOfDate"]})
    verdict = verify(OUTDATED.read_bytes(), policy, collateral(OUTDATED), OUTDATED_WINDOW)
    assert (verdict.accepted, verdict.field) == (False, "tcb_status")
    assert "No matching TCB level" in verdict.found


def test_a_bare_quote_cannot_satisfy_a_policy_on_the_event_log():
    verdict = verify(TDX.read_bytes(), tdx_policy(code_sha256="ab" * 32), collateral(TDX), IN_WINDOW)
    assert (verdict.field, verdict.found) == ("event_log", "a bare quote")


# --- simulated evidence ---------------------------------------------------------------------------------------

SIM_POLICY = parse_policy({"tee": "simulated", "code_sha256": "ab" * 32, "tsqp_version": "0.1.0",
                           "weights_fingerprint": "cd" * 16, "checkpoint_sha256": "ef" * 32,
                           "settings": {"protect": "otp", "verify": True}})


def test_simulated_evidence_is_refused_unless_allowed_and_then_accepted_labelled_simulated():
    runner, nonce = SimulatedRunner(), os.urandom(32)
    ev = runner.evidence(nonce)
    refused = verify(ev, SIM_POLICY, None, IN_WINDOW, expect_nonce=nonce)
    assert (refused.accepted, refused.field) == (False, "provider")
    assert "SIMULATED" in refused.line()
    verdict = verify(ev, SIM_POLICY, None, IN_WINDOW, allow_simulated=True, expect_nonce=nonce,
                     expect_spki=fmt.spki_sha256(runner.cert))
    assert verdict.accepted and verdict.simulated and verdict.bound, verdict.line()
    assert verdict.line().startswith("accepted (SIMULATED")
    assert verdict.claims[fmt.EVENT_SETTINGS]["protect"] == "otp"
    assert verdict.measurements["rtmr3"] == fmt.replay(EVENTS).hex()


def test_a_simulated_quote_passed_off_as_tdx_is_refused():
    runner, nonce = SimulatedRunner(), os.urandom(32)
    ev = dataclasses.replace(runner.evidence(nonce), provider="tdx")
    assert verify(ev, SIM_POLICY, None, IN_WINDOW).field == "provider"
    assert verify(ev, SIM_POLICY, None, IN_WINDOW, allow_simulated=True).field == "provider"


def test_sev_snp_evidence_is_refused_as_a_provider_this_client_does_not_verify():
    ev = dataclasses.replace(SimulatedRunner().evidence(os.urandom(32)), provider="sev-snp")
    verdict = verify(ev, SIM_POLICY, None, IN_WINDOW, allow_simulated=True)
    assert (verdict.field, verdict.found) == ("provider", "sev-snp (not verified by this client)")


def binding_attacks():
    """(name, evidence, expect_spki, expect_nonce, field): each breaks one part of the binding."""
    runner, nonce = SimulatedRunner(), os.urandom(32)
    good_spki = fmt.spki_sha256(runner.cert)
    mitm_cert, _ = self_signed()
    tampered = [dict(e) for e in EVENTS[:2]] + [{"type": fmt.EVENT_SETTINGS, "data": {"protect": "otp",
                                                                                         "verify": False}}]
    return [
        ("another key served", runner.evidence(nonce), fmt.spki_sha256(mitm_cert), nonce, "spki"),
        ("old evidence replayed", runner.evidence(os.urandom(32)), good_spki, nonce, "nonce"),
        ("quote binds another log", runner.evidence(nonce, events=tampered), good_spki, nonce, "report_data"),
        ("quote binds another key", runner.evidence(nonce, spki=fmt.spki_sha256(mitm_cert)), good_spki, nonce,
         "report_data"),
        ("rtmr3 is not the log", runner.evidence(nonce, rtmr3=os.urandom(48)), good_spki, nonce, "rtmr3"),
        ("no key to bind", dataclasses.replace(runner.evidence(nonce), certificate=None), None, nonce, "certificate"),
    ]


@pytest.mark.parametrize("name,ev,spki,nonce,field", binding_attacks(), ids=[a[0] for a in binding_attacks()])
def test_simulated_evidence_whose_binding_does_not_match_is_refused_naming_the_field(name, ev, spki, nonce, field):
    verdict = verify(ev, SIM_POLICY, None, IN_WINDOW, allow_simulated=True, expect_spki=spki, expect_nonce=nonce)
    assert (verdict.accepted, verdict.field) == (False, field), verdict.line()


def test_a_log_that_differs_from_the_policy_names_the_claim():
    runner, nonce = SimulatedRunner(), os.urandom(32)
    for key, value, field in (("code_sha256", "00" * 32, "code_sha256"), ("weights_fingerprint", "00" * 16,
                              "weights_fingerprint"), ("settings", {"protect": "none"}, "settings.protect"),
                              ("settings", {"policy": "linear"}, "settings.policy")):
        policy = dataclasses.replace(SIM_POLICY, **{key: value})
        verdict = verify(runner.evidence(nonce), policy, None, IN_WINDOW, allow_simulated=True)
        assert (verdict.accepted, verdict.field) == (False, field), verdict.line()


def test_a_flipped_bit_in_a_simulated_quote_breaks_its_signature():
    runner, nonce = SimulatedRunner(), os.urandom(32)
    ev = runner.evidence(nonce)
    for offset in (4 + 3, 200, 530, 600, 640, 700):
        raw = bytearray(ev.quote)
        raw[offset] ^= 4
        verdict = verify(dataclasses.replace(ev, quote=bytes(raw)), SIM_POLICY, None, IN_WINDOW, allow_simulated=True)
        assert not verdict.accepted and verdict.field.startswith("quote"), verdict.line()


# --- the policy file ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc,field", [
    ({"tee": "tdx", "mrtd": "00" * 48, "mrtdd": "x"}, "mrtdd"), ({"tee": "tdx"}, "tee"),
    ({"tee": "sgx", "isv_svn": 1}, "isv_svn"), ({"tee": "tdx", "mrtd": "00" * 47}, "mrtd"),
    ({"tee": "tdx", "mrtd": "zz" * 48}, "mrtd"), ({"tee": "tdx", "mrenclave": "00" * 32}, "mrenclave"),
    ({"tee": "tdx", "mrtd": "00" * 48, "allowed_tcb_statuses": ["Fine"]}, "allowed_tcb_statuses"),
    ({"tee": "tdx", "mrtd": "00" * 48, "allow_debug": "no"}, "allow_debug"), ({"tee": "tpm", "mrtd": "00"}, "mrtd"),
    ({"format": "tsqp-policy/9", "tee": "tdx"}, "format"), ({"mrtd": "00" * 48}, "tee")])
def test_a_bad_policy_is_refused_naming_the_key(doc, field):
    with pytest.raises(PolicyError) as e:
        parse_policy(doc)
    assert e.value.field == field


def test_a_policy_round_trips_through_its_json():
    policy = tdx_policy(settings={"protect": "otp"}, code_sha256="AB" * 32)
    assert parse_policy(policy.to_json()) == policy and policy.code_sha256 == "ab" * 32


# --- through the CLI, as real processes -----------------------------------------------------------------------

AT = ("--at", "2025-07-01T00:00:00Z")


def write_policy(tmp_path, name, policy) -> str:
    path = tmp_path / name
    path.write_text(policy.to_json())
    return str(path)


def test_the_cli_accepts_and_refuses_the_real_quotes_with_one_line_reasons(tmp_path):
    tdx = write_policy(tmp_path, "tdx.json", tdx_policy())
    other = write_policy(tmp_path, "other.json", tdx_policy(mrtd="00" * 48))
    sgx = write_policy(tmp_path, "sgx.json", sgx_policy())
    sgx_ok = write_policy(tmp_path, "sgx_ok.json", sgx_policy(allowed_tcb_statuses=["ConfigurationAndSWHardeningNeeded"]))
    flipped = tmp_path / "flipped_quote"
    flipped.write_bytes(bytes(b ^ (1 if i == 600 else 0) for i, b in enumerate(TDX.read_bytes())))
    outdated = write_policy(tmp_path, "outdated.json", parse_policy({"tee": "tdx", "mrtd": "00" * 48}))
    tdx_args = ("--collateral", SHARED / "tdx_quote_collateral.json")
    sgx_args = ("--collateral", SHARED / "sgx_quote_collateral.json")
    runs = run_cli_many([
        ("attest", "verify", TDX, *tdx_args, *AT, "--policy", tdx),
        ("attest", "verify", TDX, *tdx_args, "--at", "2025-08-01T00:00:00Z", "--policy", tdx),
        ("attest", "verify", TDX, *tdx_args, *AT, "--policy", other),
        ("attest", "verify", flipped, *tdx_args, *AT, "--policy", tdx),
        ("attest", "verify", SGX, *sgx_args, *AT, "--policy", sgx),
        ("attest", "verify", SGX, *sgx_args, *AT, "--policy", sgx_ok),
        ("attest", "verify", OUTDATED, "--collateral", SHARED / "tdx_quote_outdated_collateral.json",
         "--at", "2026-03-01T00:00:00Z", "--policy", outdated),
        ("attest", "verify", TDX, *tdx_args, *AT, "--policy", tdx, "--json"),
    ])
    ok, window, wrong_mrtd, flip, sgx_status, sgx_allowed, old, as_json = runs
    ref = oracle_report(TDX)
    assert ok.returncode == 0, ok.stderr
    assert all(ref[k] in ok.stdout for k in ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2")) and "UpToDate" in ok.stdout
    expected_lines = {window: "refused: collateral: expected collateral valid at 2025-08-01T00:00:00+00:00, found "
                              "Verification failed: TCBInfo expired",
                      wrong_mrtd: f"refused: mrtd: expected {'00' * 48}, found {ref['mr_td']}",
                      flip: "refused: quote.signature: expected a quote signed through Intel's DCAP chain, found "
                            "Verification failed: ISV enclave report signature is invalid",
                      sgx_status: "refused: tcb_status: expected UpToDate, found ConfigurationAndSWHardeningNeeded "
                                  "(advisories INTEL-SA-00289, INTEL-SA-00615)",
                      old: "refused: tcb_status: expected a TCB level the collateral knows, found Verification "
                           "failed: No matching TCB level found"}
    for run, line in expected_lines.items():
        assert (run.returncode, run.stdout.splitlines()) == (1, [line]), run.stderr
    assert sgx_allowed.returncode == 0 and oracle_report(SGX)["mr_enclave"] in sgx_allowed.stdout
    assert "INTEL-SA-00615" in sgx_allowed.stdout
    doc = json.loads(as_json.stdout)
    assert (doc["accepted"], doc["tcb_status"], doc["measurements"]["mrtd"]) == (True, "UpToDate", ref["mr_td"])


def test_attest_policy_on_the_real_quotes_writes_what_then_accepts_them(tmp_path):
    quotes = ((TDX, "tdx_quote_collateral.json"), (SGX, "sgx_quote_collateral.json"))
    written = run_cli_many([("attest", "policy", q, "--collateral", SHARED / c, *AT, "-o", tmp_path / f"{q.name}.json")
                            for q, c in quotes])
    assert [w.returncode for w in written] == [0, 0], [w.stderr for w in written]
    assert "ConfigurationAndSWHardeningNeeded" in written[1].stderr     # the note for the operator
    tdx, sgx = (parse_policy((tmp_path / f"{q.name}.json").read_text()) for q, _ in quotes)
    ref = oracle_report(TDX)
    assert (tdx.mrtd, tdx.rtmr2, tdx.allowed_tcb_statuses, tdx.allow_debug) == (ref["mr_td"], ref["rt_mr2"],
                                                                              ("UpToDate",), False)
    assert (sgx.mrenclave, sgx.allowed_tcb_statuses) == (oracle_report(SGX)["mr_enclave"],
                                                         ("UpToDate", "ConfigurationAndSWHardeningNeeded"))
    for (q, c), policy in zip(quotes, (tdx, sgx)):
        assert verify(q.read_bytes(), policy, collateral(q), IN_WINDOW).accepted


def test_the_cli_refuses_flags_that_cannot_apply_and_names_a_peer_it_cannot_reach(tmp_path):
    with socket.socket() as s:      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    runs = run_cli_many([
        ("attest", "verify", TDX, "--collateral", SHARED / "tdx_quote_collateral.json", "--pccs", "http://x", *AT),
        ("attest", "verify", TDX, "--collateral", SHARED / "tdx_quote_collateral.json", "--nonce", "00" * 32, *AT),
        ("attest", "verify", TDX, "--at", "yesterday"),
        ("attest", "verify", "http://127.0.0.1:1/"),
        ("attest", "verify", TDX, "--collateral", SHARED / "tdx_quote_collateral.json", "--timeout", "3", *AT),
        ("attest", "verify", f"https://127.0.0.1:{closed}", "--timeout", "5"),
        ("attest", "verify", TDX, "--pccs", f"http://127.0.0.1:{closed}", "--timeout", "5", *AT),
    ], env={"HOME": str(tmp_path)})
    for run, words in zip(runs, ("give one", "a raw quote carries no nonce", "not an ISO time", "https:// only",
                                 "nothing here goes over the network", "ConnectError", "ConnectError")):
        assert run.returncode == 2 and words in run.stderr, (run.stdout, run.stderr)


def test_the_cli_on_saved_simulated_evidence_and_the_policy_it_implies(tmp_path):
    runner, nonce = SimulatedRunner(), os.urandom(32)
    evidence = tmp_path / "evidence.json"
    evidence.write_text(runner.evidence(nonce).to_json())
    implied = tmp_path / "implied.json"
    refused, accepted, wrote = run_cli_many([
        ("attest", "verify", evidence), ("attest", "verify", evidence, "--allow-simulated", "--nonce", nonce.hex()),
        ("attest", "policy", evidence, "--allow-simulated", "-o", implied)])
    assert (refused.returncode, refused.stdout.splitlines()) == (1, [
        "refused (SIMULATED evidence: no hardware TEE): provider: expected a hardware TEE (tdx or sgx), found "
        "simulated (allow it explicitly to test)"])
    assert accepted.returncode == 0 and "SIMULATED" in accepted.stdout and "tsqp.settings" in accepted.stdout
    assert wrote.returncode == 0, wrote.stderr
    policy = parse_policy(implied.read_text())
    assert (policy.tee, policy.code_sha256, policy.settings) == ("simulated", "ab" * 32, EVENTS[2]["data"])
    other = SimulatedRunner(events=EVENTS[:2] + [{"type": fmt.EVENT_SETTINGS, "data": {**EVENTS[2]["data"],
                                                                                          "verify": False}}])
    evidence.write_text(other.evidence(nonce).to_json())
    stale = run_cli("attest", "verify", evidence, "--allow-simulated", "--policy", implied, "--nonce", "11" * 32)
    assert stale.stdout.splitlines() == [f"refused (SIMULATED evidence: no hardware TEE): nonce: expected {'11' * 32}, "
                                         f"found {nonce.hex()}"]
    changed = run_cli("attest", "verify", evidence, "--allow-simulated", "--policy", implied)
    assert changed.stdout.splitlines() == ["refused (SIMULATED evidence: no hardware TEE): settings.verify: expected "
                                           "True, found False"] and changed.returncode == 1


# --- an https:// runner: the served key must be the bound key -----------------------------------------------

def test_an_https_runner_is_verified_and_a_relaying_man_in_the_middle_or_a_replay_is_refused(tmp_path):
    from tsqp.client.remote import fetch_evidence
    runner = SimulatedRunner()
    runner_tls = runner.write_tls_files(tmp_path)
    mitm = SimulatedRunner()            # its own TLS key; it forwards the runner's evidence unchanged
    (tmp_path / "mitm").mkdir()
    mitm_tls = mitm.write_tls_files(tmp_path / "mitm")
    old = runner.evidence(os.urandom(32))
    with http_server(attestation_handler(runner.evidence), runner_tls) as (url, served), \
            http_server(attestation_handler(lambda nonce: fetch_evidence(url, nonce)[0]), mitm_tls) as (relay, _), \
            http_server(attestation_handler(lambda nonce: old), runner_tls) as (replay, _):
        nonce = os.urandom(32)
        ev, served_spki = fetch_evidence(url, nonce)
        assert served_spki == fmt.spki_sha256(runner.cert) and served[-1] == f"/v1/attestation?nonce={nonce.hex()}"
        assert verify(ev, SIM_POLICY, None, IN_WINDOW, allow_simulated=True, expect_spki=served_spki,
                      expect_nonce=nonce).accepted
        direct, relayed, replayed, refused = run_cli_many([
            ("attest", "verify", url, "--allow-simulated", "--policy", write_policy(tmp_path, "p.json", SIM_POLICY)),
            ("attest", "verify", relay, "--allow-simulated"), ("attest", "verify", replay, "--allow-simulated"),
            ("attest", "verify", url)])
    assert direct.returncode == 0 and "SIMULATED" in direct.stdout, direct.stdout + direct.stderr
    assert relayed.returncode == 1 and relayed.stdout.startswith("refused (SIMULATED evidence: no hardware TEE): spki:")
    assert replayed.returncode == 1 and ": nonce: expected" in replayed.stdout
    assert refused.returncode == 1 and ": provider:" in refused.stdout


# --- collateral from a PCCS, cached -----------------------------------------------------------------------------

def test_collateral_fetched_from_a_pccs_verifies_and_is_reused_from_the_owner_only_cache_while_valid(tmp_path):
    from tsqp.client.collateral import cached_collateral, next_update
    quote = TDX.read_bytes()
    with http_server(pccs_handler(collateral(TDX))) as (pccs, served):
        text, cached = cached_collateral(quote, pccs, IN_WINDOW, tmp_path / "cache")
        assert not cached and len(served) == 4
        report = dcap_qvl.verify(quote, dcap_qvl.QuoteCollateralV3.from_json(text), int(IN_WINDOW.timestamp()))
        assert report.status == "UpToDate"
        again, cached = cached_collateral(quote, pccs, IN_WINDOW, tmp_path / "cache")
        assert (again, cached, len(served)) == (text, True, 4)
        later = next_update(text) + dt.timedelta(seconds=1)
        _, cached = cached_collateral(quote, pccs, later, tmp_path / "cache")
        assert not cached and len(served) == 8
        (entry,) = (tmp_path / "cache").iterdir()
        assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700 and entry.stat().st_mode & 0o777 == 0o600
        entry.write_text("{not json")                  # a damaged entry is fetched again and replaced
        again, cached = cached_collateral(quote, pccs, IN_WINDOW, tmp_path / "cache")
        assert (again, cached, len(served)) == (text, False, 12) and entry.read_text() == text
        run = run_cli("attest", "verify", TDX, "--pccs", pccs, *AT, "--policy",
                      write_policy(tmp_path, "tdx.json", tdx_policy()), env={"HOME": str(tmp_path / "home")})
    assert run.returncode == 0 and "UpToDate" in run.stdout, run.stdout + run.stderr
    assert len(list((tmp_path / "home" / ".cache" / "tsqp" / "collateral").iterdir())) == 1
    assert next_update(text) == dt.datetime(2025, 7, 19, 10, 0, 35, tzinfo=dt.timezone.utc)   # the PCK CRL's, the earliest


# --- the trust boundary ------------------------------------------------------------------------------------------

def test_the_format_is_pure_and_the_client_never_imports_the_runner():
    from test_layout import modules_under, offending
    assert offending(modules_under("attestation"), ("tsqp.trusted", "tsqp.untrusted", "tsqp.wire", "tsqp.commands",
                                                    "tsqp.client", "torch", "httpx", "os", "pathlib", "socket",
                                                    "dcap_qvl")) == {}
    assert offending(modules_under("client"), ("tsqp.trusted", "tsqp.untrusted", "tsqp.wire", "tsqp.commands",
                                               "torch", "zmq")) == {}
    assert offending(modules_under("trusted"), ("tsqp.client",)) == {}
