"""The verifier: a pure function of (evidence, policy, collateral, time) that returns a verdict.

No network and no clock inside: the caller brings the collateral (tsqp/client/collateral.py) and the time,
so a test pins both. Checks run in this order and the verdict names the first that fails:

    provider (simulated refused unless allowed)  ->  quote signature chain (dcap-qvl; Ed25519 if simulated)
    ->  TCB status  ->  debug  ->  measurements  ->  nonce, key (SPKI), REPORTDATA  ->  RTMR3 == replay(log)
    ->  the event log's code, model and settings
"""
from __future__ import annotations

import datetime as dt
import json
import dataclasses
from dataclasses import dataclass

import dcap_qvl

from tsqp.attestation import format as fmt
from tsqp.attestation.quote import QuoteBody, QuoteError, check_simulated_quote, parse_quote
from tsqp.client.policy import Policy

SIMULATED_STATUS = "Simulated"
VERIFIED_PROVIDERS = ("tdx", "sgx", "simulated")   # an SEV-SNP report needs AMD's chain, which dcap-qvl is not


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    field: str | None = None          # the first field that failed
    expected: str | None = None
    found: str | None = None
    measurements: dict = dataclasses.field(default_factory=dict)
    tcb_status: str | None = None
    advisories: tuple[str, ...] = ()
    simulated: bool = False
    bound: bool = False               # REPORTDATA checked against a key, the event log and a nonce
    claims: dict = dataclasses.field(default_factory=dict)   # the event log's data, by event type

    def line(self) -> str:
        """One line for a terminal: the verdict, labelled simulated where it is."""
        label = " (SIMULATED evidence: no hardware TEE)" if self.simulated else ""
        if self.accepted:
            return f"accepted{label}: {self.tcb_status}" + (f", advisories {', '.join(self.advisories)}"
                                                            if self.advisories else "")
        return printable(f"refused{label}: {self.field}: expected {self.expected}, found {self.found}")

    def to_dict(self) -> dict:
        return {"accepted": self.accepted, "field": self.field, "expected": self.expected, "found": self.found,
                "simulated": self.simulated, "tcb_status": self.tcb_status, "advisories": list(self.advisories),
                "bound": self.bound, "measurements": self.measurements, "claims": self.claims}


def printable(text: str) -> str:
    """Control characters (a terminal's escape sequences) shown as escapes: a refusal names what the peer sent,
    and a peer could otherwise rewrite the terminal's line to read 'accepted'."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class Refused(Exception):
    def __init__(self, field: str, expected, found):
        super().__init__(field)
        # one line each, whatever a library's message holds (the CLI prints exactly one line)
        self.field, self.expected, self.found = field, " ".join(str(expected).split()), " ".join(str(found).split())


def _seconds(at: dt.datetime | int | float) -> int:
    if isinstance(at, dt.datetime):
        if at.tzinfo is None:
            raise ValueError("at: a verification time needs a time zone (UTC)")
        return int(at.timestamp())
    return int(at)


def _collateral(collateral):
    if collateral is None:
        raise Refused("collateral", "DCAP collateral (--collateral FILE or --pccs URL)", "none")
    if isinstance(collateral, (str, bytes)):
        try:
            return dcap_qvl.QuoteCollateralV3.from_json(collateral if isinstance(collateral, str)
                                                        else collateral.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused("collateral", "dcap-qvl QuoteCollateralV3 JSON", e) from None
    return collateral


def _dcap(raw: bytes, body: QuoteBody, collateral, now: int) -> tuple[str, tuple[str, ...]]:
    """The quote's signature chain and TCB status, by dcap-qvl; a refusal names what its message says."""
    try:
        report = dcap_qvl.verify(raw, _collateral(collateral), now)
    except ValueError as e:
        message = str(e)
        when = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat()
        if any(s in message.lower() for s in ("expired", "in the future", "not yet valid")):   # TCBInfo, CRLs, certs
            raise Refused("collateral", f"collateral valid at {when}", message) from None
        if "No matching TCB level" in message:
            raise Refused("tcb_status", "a TCB level the collateral knows", message) from None
        raise Refused("quote.signature", "a quote signed through Intel's DCAP chain", message) from None
    _same_layout(report, body)
    return report.status, tuple(report.advisory_ids)


def _same_layout(report, body: QuoteBody) -> None:
    """What dcap-qvl verified is what tsqp's parser read (a guard against a layout slip on either side)."""
    (verified,) = json.loads(report.to_json())["report"].values()
    pairs = {"report_data": "report_data", "mr_td": "mrtd", "rt_mr3": "rtmr3", "mr_enclave": "mrenclave",
             "mr_signer": "mrsigner"}
    for theirs, ours in pairs.items():
        if theirs in verified and bytes.fromhex(verified[theirs]) != getattr(body, ours):
            raise Refused("quote", f"dcap-qvl's {theirs} {verified[theirs]}", getattr(body, ours).hex())


def _check_measurements(body: QuoteBody, policy: Policy) -> None:
    if body.tee == "sgx":
        pinned = {"mrenclave": body.mrenclave.hex(), "mrsigner": body.mrsigner.hex(), "isv_prod_id": body.isv_prod_id}
    else:
        pinned = {"mrtd": body.mrtd.hex(), "rtmr0": body.rtmr0.hex(), "rtmr1": body.rtmr1.hex(),
                  "rtmr2": body.rtmr2.hex()}
    for name, found in pinned.items():
        expected = getattr(policy, name)
        if expected is not None and expected != found:
            raise Refused(name, expected, found)
    if body.tee == "sgx" and policy.min_isv_svn is not None and body.isv_svn < policy.min_isv_svn:
        raise Refused("isv_svn", f">= {policy.min_isv_svn}", body.isv_svn)


def _check_binding(ev: fmt.Evidence, body: QuoteBody, expect_spki: bytes | None, expect_nonce: bytes | None):
    if expect_nonce is not None and ev.nonce != expect_nonce:
        raise Refused("nonce", expect_nonce.hex(), ev.nonce.hex())
    cert_spki = fmt.spki_sha256(ev.certificate) if ev.certificate is not None else None
    if expect_spki is not None and cert_spki is not None and cert_spki != expect_spki:
        raise Refused("spki", expect_spki.hex(), cert_spki.hex())
    spki = expect_spki if expect_spki is not None else cert_spki
    if spki is None:
        raise Refused("certificate", "a certificate or a pinned key to bind", "neither")
    log_digest = fmt.replay(ev.event_log)
    expected = fmt.report_data(spki, log_digest, ev.nonce)
    if body.report_data != expected:
        raise Refused("report_data", f"{expected.hex()} (this key, event log and nonce)", body.report_data.hex())
    if ev.rtmr3_extended and body.rtmr3 != log_digest:
        raise Refused("rtmr3", f"{log_digest.hex()} (the event log replayed)", body.rtmr3.hex())


CLAIM_KEYS = {"code_sha256": fmt.EVENT_CODE, "tsqp_version": fmt.EVENT_CODE, "weights_fingerprint": fmt.EVENT_MODEL,
              "checkpoint_sha256": fmt.EVENT_MODEL, "server_fingerprint": fmt.EVENT_COMPUTE}


def _check_claims(claims: dict, policy: Policy) -> None:
    for key, event in CLAIM_KEYS.items():
        expected = getattr(policy, key)
        found = claims.get(event, {}).get(key)
        if expected is not None and (not isinstance(found, str) or found.lower() != expected.lower()):
            raise Refused(key, expected, "absent" if found is None else found)
    settings = claims.get(fmt.EVENT_SETTINGS, {})
    for key, expected in sorted(policy.settings.items()):
        # compared as JSON, not with Python's ==, for which True == 1 == 1.0 (length_bucket: true is not 1)
        if key not in settings or fmt.canonical_json(settings[key]) != fmt.canonical_json(expected):
            raise Refused(f"settings.{key}", expected, settings.get(key, "absent"))


def _wants_claims(policy: Policy) -> bool:
    return bool(policy.settings) or any(getattr(policy, k) is not None for k in CLAIM_KEYS)


def verify(evidence_or_quote: fmt.Evidence | bytes, policy: Policy, collateral, at: dt.datetime | int,
           allow_simulated: bool = False, expect_spki: bytes | None = None,
           expect_nonce: bytes | None = None) -> Verdict:
    """Check evidence (or a bare quote) against a policy at a time; the verdict names the first failure."""
    ev = evidence_or_quote if isinstance(evidence_or_quote, fmt.Evidence) else None
    raw = ev.quote if ev is not None else bytes(evidence_or_quote)
    state: dict = {}
    try:
        if ev is not None and ev.provider not in VERIFIED_PROVIDERS:
            raise Refused("provider", " or ".join(VERIFIED_PROVIDERS), f"{ev.provider} (not verified by this client)")
        body = parse_quote(raw)
        simulated = body.tee == "simulated" or (ev is not None and ev.provider == "simulated")
        state = {"simulated": simulated, "measurements": body.measurements()}
        _run_checks(ev, raw, body, policy, state, collateral=collateral, now=_seconds(at),
                    allow_simulated=allow_simulated, expect_spki=expect_spki, expect_nonce=expect_nonce)
    except QuoteError as e:
        r = Refused(e.field, "a TDX v4/v5, SGX v3 or simulated quote", e)
    except fmt.FormatError as e:
        r = Refused(e.field, "evidence in the tsqp-evidence/1 format", e)
    except Refused as e:
        r = e
    else:
        return Verdict(True, **state)
    return Verdict(False, r.field, r.expected, r.found, **state)


def _run_checks(ev: fmt.Evidence | None, raw: bytes, body: QuoteBody, policy: Policy, state: dict, *, collateral,
                now: int, allow_simulated: bool, expect_spki: bytes | None, expect_nonce: bytes | None) -> None:
    """Each check in order; raises Refused at the first failure, fills `state` for the verdict as it goes."""
    if state["simulated"]:
        if not allow_simulated:
            raise Refused("provider", "a hardware TEE (tdx or sgx)", "simulated (allow it explicitly to test)")
        if body.tee != "simulated" or (ev is not None and ev.provider != "simulated"):
            raise Refused("provider", "a simulated quote for simulated evidence", body.tee)
        check_simulated_quote(raw)
        state.update(tcb_status=SIMULATED_STATUS)
    else:
        if ev is not None and ev.provider != body.tee:
            raise Refused("provider", body.tee, ev.provider)
        status, advisories = _dcap(raw, body, collateral, now)
        state.update(tcb_status=status, advisories=advisories)
    if policy.tee != body.tee:
        raise Refused("tee", policy.tee, body.tee)
    if not state["simulated"] and state["tcb_status"] not in policy.allowed_tcb_statuses:
        advisories = state.get("advisories")
        raise Refused("tcb_status", " or ".join(policy.allowed_tcb_statuses), state["tcb_status"] +
                      (f" (advisories {', '.join(advisories)})" if advisories else ""))
    check_policy_on_body(body, policy)
    if ev is None:
        if expect_spki is not None or expect_nonce is not None or _wants_claims(policy):
            raise Refused("event_log", "evidence with an event log and its binding", "a bare quote")
        return
    _check_binding(ev, body, expect_spki, expect_nonce)
    state.update(bound=True, claims=fmt.log_claims(ev.event_log))
    _check_claims(state["claims"], policy)


def check_policy_on_body(body: QuoteBody, policy: Policy) -> None:
    """The debug attribute and the measurements (raises Refused): apart so a test can reach them directly,
    since a real quote with its debug bit flipped no longer verifies."""
    if body.debug and not policy.allow_debug:
        raise Refused("debug", "a production enclave (debug off)", "the debug attribute set")
    _check_measurements(body, policy)
