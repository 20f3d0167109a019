"""The shared evidence format: digests, the event log, quote layouts (against dcap-qvl's parser) and documents."""
from __future__ import annotations

import hashlib
import os

import dcap_qvl
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attest_helpers import SHARED, self_signed
from tsqp.attestation import format as fmt
from tsqp.attestation.quote import QuoteError, check_simulated_quote


def test_report_data_is_sha512_over_the_domain_key_log_and_nonce():
    spki, log, nonce = os.urandom(32), os.urandom(48), os.urandom(32)
    expected = hashlib.sha512(b"tsqp-attest-v1\x00" + spki + log + nonce).digest()
    assert fmt.report_data(spki, log, nonce) == expected and len(expected) == 64
    for bad, name in (((spki[:31], log, nonce), "spki_sha256"), ((spki, log + b"x", nonce), "log_digest"),
                      ((spki, log, "00" * 32), "nonce")):
        with pytest.raises(fmt.FormatError) as e:
            fmt.report_data(*bad)
        assert e.value.field == name


def test_replay_is_an_rtmr_extend_over_canonical_json():
    events = [{"type": "tsqp.code", "data": {"b": 1, "a": "x"}}, {"type": "tsqp.model", "data": {}}]
    register = bytes(48)
    for text in ('{"data":{"a":"x","b":1},"type":"tsqp.code"}', '{"data":{},"type":"tsqp.model"}'):
        register = hashlib.sha384(register + hashlib.sha384(text.encode()).digest()).digest()
    assert fmt.replay(events) == register
    assert fmt.replay([]) == bytes(48)


@pytest.mark.parametrize("log,field", [
    ({}, "event_log"), ([{"type": "x"}], "event_log[0]"), ([{"type": "", "data": {}}], "event_log[0].type"),
    ([{"type": "x", "data": []}], "event_log[0].data"), ([{"type": "x", "data": {}}] * 65, "event_log"),
    ([{"type": "x", "data": {"v": "a" * 70000}}], "event_log"),
    ([{"type": "x", "data": {"v": float("nan")}}], "event_log")])
def test_a_malformed_event_log_names_what_is_wrong(log, field):
    with pytest.raises(fmt.FormatError) as e:
        fmt.check_event_log(log)
    assert e.value.field == field


@pytest.mark.parametrize("name", ["tdx_quote", "sgx_quote", "tdx_quote_outdated"])
def test_parse_quote_agrees_with_dcap_qvl_on_the_real_quotes(name):
    raw = (SHARED / name).read_bytes()
    body, oracle = fmt.parse_quote(raw), dcap_qvl.parse_quote(raw)
    assert body.version == oracle.header.version and not body.debug
    if oracle.is_sgx():  # dcap-qvl's own parse of the same bytes is the oracle
        report = oracle.report
        assert (body.tee, body.mrenclave, body.mrsigner) == ("sgx", bytes(report.mr_enclave), bytes(report.mr_signer))
        assert body.report_data.startswith(b"Hello, world!")
    else:
        report = oracle.report
        assert body.tee == "tdx"
        for ours, theirs in (("mrtd", "mr_td"), ("rtmr0", "rt_mr0"), ("rtmr1", "rt_mr1"), ("rtmr2", "rt_mr2"),
                             ("rtmr3", "rt_mr3"), ("report_data", "report_data"), ("td_attributes", "td_attributes")):
            assert getattr(body, ours) == bytes(getattr(report, theirs)), ours


def test_a_simulated_quote_round_trips_and_any_flipped_bit_breaks_its_signature():
    key, rd, rtmr3 = Ed25519PrivateKey.generate(), os.urandom(64), os.urandom(48)
    raw = fmt.make_simulated_quote(rd, rtmr3, key)
    body = check_simulated_quote(raw)
    assert (body.tee, body.report_data, body.rtmr3, raw[4:8]) == ("simulated", rd, rtmr3, b"SIM\0")
    with pytest.raises(ValueError, match="Invalid TEE type"):  # no DCAP verifier mistakes it for TDX
        dcap_qvl.parse_quote(raw)
    with pytest.raises(QuoteError, match="simulated quote is 728 bytes"):
        fmt.parse_quote(raw[:-1])
    for offset in (0, 5, 100, 520, 600, 631, 640, 700):
        flipped = bytearray(raw)
        flipped[offset] ^= 0x10
        with pytest.raises(QuoteError):
            check_simulated_quote(bytes(flipped))


def test_evidence_round_trips_and_a_wrong_field_is_named():
    cert, _ = self_signed()
    pem = cert.public_bytes(fmt.Encoding.PEM).decode()
    ev = fmt.Evidence(provider="simulated", quote=b"\x01\x02", nonce=os.urandom(32),
                      event_log=[{"type": fmt.EVENT_CODE, "data": {"tsqp_version": "0"}}], certificate=pem)
    assert fmt.parse_evidence(ev.to_json()) == ev
    assert fmt.parse_evidence(ev.extension_value()).certificate is None
    doc = ev.to_dict()
    for key, value, field in (("format", "tsqp-evidence/2", "format"), ("provider", "tpm", "provider"),
                              ("quote", "!!", "quote"), ("nonce", "00" * 31, "nonce"),
                              ("rtmr3_extended", 1, "rtmr3_extended"), ("event_log", [{}], "event_log[0]"),
                              ("extra", 1, "extra")):
        with pytest.raises(fmt.FormatError) as e:
            fmt.parse_evidence({**doc, key: value})
        assert e.value.field == field
    with pytest.raises(fmt.FormatError) as e:
        fmt.parse_evidence(b"x" * (fmt.MAX_EVIDENCE_BYTES + 1))
    assert e.value.field == "evidence"


def test_the_certificate_extension_carries_the_evidence_and_spki_hash_is_the_keys():
    ev = fmt.Evidence(provider="simulated", quote=b"q", nonce=fmt.BOOT_NONCE)
    cert, key = self_signed(ev.extension_value())
    spki = key.public_key().public_bytes(fmt.Encoding.DER, fmt.PublicFormat.SubjectPublicKeyInfo)
    assert fmt.spki_sha256(cert) == hashlib.sha256(spki).digest()
    assert fmt.spki_sha256(cert.public_bytes(fmt.Encoding.PEM).decode()) == hashlib.sha256(spki).digest()
    back = fmt.evidence_from_certificate(cert.public_bytes(fmt.Encoding.DER))
    assert (back.quote, back.nonce, back.certificate) == (b"q", bytes(32), cert.public_bytes(fmt.Encoding.PEM).decode())
    plain, _ = self_signed()
    with pytest.raises(fmt.FormatError, match="no tsqp evidence extension"):
        fmt.evidence_from_certificate(plain)
