"""`tsqp attest`: verify a runner's attestation (`verify`) and write the policy its evidence implies (`policy`).

Adding a verb (e.g. `proxy`, `check-answer`): write `add_NAME_parser(verbs)` that calls
`verbs.add_parser(...)`, adds its flags and ends with `p.set_defaults(attest_handler=NAME_command)`, where
NAME_command(args) runs it (import what it needs inside the function: cli.py builds every parser at start);
then append the builder to VERB_BUILDERS below (or, for a verb in another module that imports this one,
register it in cli.py's add_attest_parser, so the two modules do not import each other). `main` dispatches on args.attest_handler. Flags several
verbs share are in add_target_args / add_trust_args.

Exit codes: 0 accepted, 1 refused (one line: `refused: FIELD: expected X, found Y`), 2 an error (a file
that cannot be read, a flag that cannot apply, a runner that cannot be reached).
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

MAX_TARGET_BYTES = 1 << 20
DEFAULT_TIMEOUT = 10.0


def add_target_args(p) -> None:
    p.add_argument("target", help="an https:// runner, a saved evidence file (JSON) or a raw quote file")
    p.add_argument("--collateral", default=None, help="dcap-qvl collateral JSON for the quote (offline)")
    p.add_argument("--pccs", default=None, help="fetch collateral from this PCCS (default: Intel's PCS), "
                                                "cached in ~/.cache/tsqp/collateral while valid")
    p.add_argument("--at", default=None, help="verify at this ISO time, e.g. 2025-07-01T00:00:00Z (default: now)")
    p.add_argument("--allow-simulated", action="store_true",
                   help="accept simulated evidence (no hardware TEE: for development only)")
    p.add_argument("--nonce", default=None, help="64 hex digits: the nonce the evidence must answer (default for "
                                                 "an https:// runner: 32 fresh random bytes)")
    p.add_argument("--timeout", type=float, default=None, help="seconds for each network request (default 10)")


def add_verify_parser(verbs) -> None:
    p = verbs.add_parser("verify", help="verify a runner's evidence against a policy; exit 0 when accepted")
    add_target_args(p)
    p.add_argument("--policy", default=None, help="the policy file to check against (default: only the quote's "
                                                  "chain, TCB status, debug and binding; measurements unpinned)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(attest_handler=verify_command)


def add_policy_parser(verbs) -> None:
    p = verbs.add_parser("policy", help="write the policy a runner's evidence implies, for clients to pin")
    add_target_args(p)
    p.add_argument("-o", "--output", default=None, help="write it here (default: stdout)")
    p.set_defaults(attest_handler=policy_command)


VERB_BUILDERS = [add_verify_parser, add_policy_parser]    # cli.py adds attest_client's verbs after these


def add_parser(sub):
    """The `attest` command and its verbs; returns the verbs' subparsers object."""
    a = sub.add_parser("attest", help="verify a runner's hardware attestation (TDX, SGX) before trusting it")
    verbs = a.add_subparsers(dest="attest_verb", required=True)
    for build in VERB_BUILDERS:
        build(verbs)
    return verbs


def main(args) -> None:
    args.attest_handler(args)


def parse_time(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.timezone.utc)
    try:
        at = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--at {text!r}: not an ISO time such as 2025-07-01T00:00:00Z") from None
    return at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)


def parse_nonce(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"--nonce: not hex: {text!r}") from None
    if len(nonce) != 32:
        raise ValueError(f"--nonce: 32 bytes (64 hex digits), got {len(nonce)}")
    return nonce


def load_target(args):
    """(evidence or raw quote bytes, the served key's SPKI hash or None, the nonce to expect or None)."""
    from ..attestation import format as fmt
    from ..client import remote
    nonce = parse_nonce(args.nonce)
    if args.timeout is not None and not args.target.startswith("https://") and args.collateral:
        raise ValueError("--timeout: nothing here goes over the network (a file target and --collateral)")
    if args.target.startswith("https://"):
        nonce = nonce or remote.fresh_nonce()
        evidence, served_spki = remote.fetch_evidence(args.target, nonce, args.timeout or DEFAULT_TIMEOUT)
        return evidence, served_spki, nonce
    if "://" in args.target:
        raise ValueError(f"{args.target}: a runner is reached over https:// only")
    path = Path(args.target)
    if path.stat().st_size > MAX_TARGET_BYTES:
        raise ValueError(f"{path}: over the {MAX_TARGET_BYTES}-byte cap for evidence or a quote")
    data = path.read_bytes()
    if data.lstrip()[:1] == b"{":
        return fmt.parse_evidence(data), None, nonce
    if nonce is not None:
        raise ValueError("--nonce: a raw quote carries no nonce to check (give an evidence file)")
    return data, None, None


def load_collateral(args, quote: bytes, at: dt.datetime) -> str | None:
    from ..attestation.quote import parse_quote
    from ..client import collateral
    if args.collateral and args.pccs:
        raise ValueError("--collateral and --pccs: give one (a file, or a PCCS to fetch from)")
    if parse_quote(quote).tee == "simulated":
        if args.collateral or args.pccs:
            raise ValueError("--collateral/--pccs: a simulated quote has no DCAP collateral")
        return None
    if args.collateral:
        return collateral.load_collateral_file(args.collateral)
    timeout = args.timeout or DEFAULT_TIMEOUT

    def fetch(quote: bytes, base_url: str) -> str:
        return collateral.fetch_collateral(quote, base_url, timeout)
    text, _ = collateral.cached_collateral(quote, args.pccs or collateral.INTEL_PCS_URL, at, fetch=fetch)
    return text


def _check(args, policy_for):
    """Load the target and its collateral and verify it against policy_for(quote): (Verdict, target).

    A malformed document or quote is a refusal naming its field, like any other failed check."""
    from ..attestation import format as fmt
    from ..attestation.quote import QuoteError
    from ..client.verify import Verdict, verify
    at = parse_time(args.at)
    try:
        target, served_spki, nonce = load_target(args)
        quote = target.quote if isinstance(target, fmt.Evidence) else target
        policy = policy_for(quote)
        collateral = load_collateral(args, quote, at)
    except (fmt.FormatError, QuoteError) as e:
        return Verdict(False, e.field, "a well-formed tsqp-evidence/1 document or quote", str(e)), None
    return verify(target, policy, collateral, at, allow_simulated=args.allow_simulated, expect_spki=served_spki,
                  expect_nonce=nonce), target


def _quote_tee(quote: bytes) -> str:
    from ..attestation.quote import parse_quote
    return parse_quote(quote).tee


def unpinned_policy(quote: bytes):
    """No --policy: the chain, TCB status (UpToDate), debug and binding are checked, no measurement pinned."""
    from ..client.policy import Policy
    return Policy(tee=_quote_tee(quote))


def observing_policy(quote: bytes):
    """For `attest policy`: everything but the TCB status and debug checked; those go into what it writes."""
    from ..client.policy import TCB_STATUSES, Policy
    return Policy(tee=_quote_tee(quote), allowed_tcb_statuses=TCB_STATUSES, allow_debug=True)


def verify_command(args) -> None:
    from ..client.policy import parse_policy
    if args.policy:
        policy = parse_policy(Path(args.policy).read_bytes())
        verdict, _ = _check(args, lambda quote: policy)
    else:
        verdict, _ = _check(args, unpinned_policy)
    if args.json:
        print(json.dumps({**verdict.to_dict(), "policy": args.policy}, separators=(",", ":")))
    elif verdict.accepted:
        print_verdict(verdict, args.policy)
    else:
        print(verdict.line())
    if not verdict.accepted:
        raise SystemExit(1)


def print_verdict(verdict, policy_path: str | None) -> None:
    from rich.console import Console
    from rich.table import Table
    title = "SIMULATED evidence (no hardware TEE): accepted" if verdict.simulated else "attestation accepted"
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("tcb status", verdict.tcb_status)
    table.add_row("advisories", ", ".join(verdict.advisories) or "none")
    for name, value in verdict.measurements.items():
        table.add_row(name, value)
    table.add_row("policy", policy_path or "none: measurements shown, not pinned")
    table.add_row("binding", "key, event log and nonce bound in REPORTDATA" if verdict.bound
                  else "not checked (a bare quote has no key or event log)")
    for event, data in verdict.claims.items():
        table.add_row(event, json.dumps(data, sort_keys=True))
    Console(width=140).print(table)
    print(verdict.line())


def implied_policy(verdict, target):
    """The policy pinning what this accepted evidence shows: measurements, code, model and settings."""
    from ..attestation import format as fmt
    from ..attestation.quote import parse_quote
    from ..client.policy import MEASUREMENTS, parse_policy
    quote = target.quote if isinstance(target, fmt.Evidence) else target
    body = parse_quote(quote)
    tee = "simulated" if verdict.simulated else body.tee
    values = {k: v for k, v in verdict.measurements.items() if k in MEASUREMENTS[tee]}
    if tee == "sgx":
        values = {**values, "isv_prod_id": body.isv_prod_id, "min_isv_svn": body.isv_svn}
        values.pop("isv_svn", None)
    claims = verdict.claims
    code, model = claims.get(fmt.EVENT_CODE, {}), claims.get(fmt.EVENT_MODEL, {})
    for key, source in (("code_sha256", code), ("tsqp_version", code), ("weights_fingerprint", model),
                        ("checkpoint_sha256", model), ("server_fingerprint", claims.get(fmt.EVENT_COMPUTE, {}))):
        if source.get(key) is not None:    # a value the runner did not know is not pinned
            values[key] = source[key]
    if claims.get(fmt.EVENT_SETTINGS):
        values["settings"] = claims[fmt.EVENT_SETTINGS]
    statuses = ["UpToDate"] if verdict.tcb_status in (None, "UpToDate", "Simulated") \
        else ["UpToDate", verdict.tcb_status]
    doc = {"tee": tee, **values, "allowed_tcb_statuses": statuses, "allow_debug": body.debug}
    return parse_policy(doc)   # the same strict parse a client's copy will go through


def policy_command(args) -> None:
    verdict, target = _check(args, observing_policy)
    if not verdict.accepted:
        print(verdict.line())
        raise SystemExit(1)
    policy = implied_policy(verdict, target)
    if policy.allow_debug or len(policy.allowed_tcb_statuses) > 1:
        print(f"tsqp attest policy: note: the evidence shows TCB status {verdict.tcb_status}"
              f"{' and the DEBUG attribute' if policy.allow_debug else ''}; the policy allows that: review it "
              f"before publishing", file=sys.stderr)
    text = policy.to_json()
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output} ({verdict.line()})")
    else:
        sys.stdout.write(text)
