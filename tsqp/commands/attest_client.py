"""The `tsqp attest` verbs of the attested client: `proxy` (a local plain-HTTP door to an attested runner,
for curl and other SDKs) and `check-answer` (a signed answer against the runner's saved evidence).
Registered by cli.py's add_attest_parser after commands/attest.py's verbs; exit codes as there (0 accepted, 1 refused, 2 error)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

MAX_FILE_BYTES = 16 * 2**20


def add_trust_flags(p) -> None:
    p.add_argument("--policy", required=True, help="the policy file the runner must satisfy (tsqp attest policy)")
    p.add_argument("--allow-simulated", action="store_true",
                   help="accept simulated evidence (no hardware TEE: for development only)")
    p.add_argument("--collateral", default=None, help="dcap-qvl collateral JSON for the quote (offline)")
    p.add_argument("--pccs", default=None, help="fetch collateral from this PCCS (default: Intel's PCS), cached")
    p.add_argument("--at", default=None, help="verify at this ISO time (default: now)")


def add_proxy_parser(verbs) -> None:
    p = verbs.add_parser("proxy", help="forward plain HTTP from this host to an attested runner, verifying it "
                                       "on every new connection")
    p.add_argument("target", help="the runner, https://HOST:PORT")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT on this host's loopback (default "
                                                              "127.0.0.1:8080; port 0: any free one, printed)")
    add_trust_flags(p)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for each forwarded request (default 600)")
    p.set_defaults(attest_handler=proxy_command)


def add_check_answer_parser(verbs) -> None:
    p = verbs.add_parser("check-answer", help="check a signed answer against the request and the runner's evidence")
    p.add_argument("answer", help="the completion's JSON, or a stream's chunks as a JSON list")
    p.add_argument("--request", required=True, help="the request body exactly as sent (bytes)")
    p.add_argument("--evidence", required=True, help="the runner's evidence (GET /v1/attestation's answer)")
    add_trust_flags(p)
    p.set_defaults(attest_handler=check_answer_command)


def read_file(path: str) -> bytes:
    p = Path(path)
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: over {MAX_FILE_BYTES} bytes")
    return p.read_bytes()


def attestation_of(args):
    from ..client.attested import Attestation
    from ..client.policy import parse_policy
    from .attest import load_collateral, parse_time
    at = parse_time(args.at) if args.at else None
    collateral = None if not (args.collateral or args.pccs) else \
        (lambda quote: load_collateral(args, quote, at or parse_time(None)))
    return Attestation(parse_policy(read_file(args.policy)), args.allow_simulated, collateral, at)


def listen_address(text: str) -> tuple[str, int]:
    from .api.command import is_loopback
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]")
    if not is_loopback(host):
        raise ValueError(f"--listen {text}: the proxy forwards in the clear, so it listens on this host's loopback "
                         f"only (127.0.0.1 or ::1)")
    return host, int(port)


def proxy_command(args) -> None:
    import httpx
    import uvicorn

    from ..client.attested import AttestationRefused, attested_httpx
    from ..client.proxy import forwarding_app
    from .api.app import bind
    from .attest import print_verdict
    if not args.target.startswith("https://"):
        raise ValueError(f"{args.target}: an attested runner is reached over https://")
    t0 = time.perf_counter()
    host, port = listen_address(args.listen)
    attestation = attestation_of(args)
    client = attested_httpx(attestation, timeout=args.timeout)
    try:            # the first connection is attested now, so that a wrong runner is refused at start
        client.get(args.target.rstrip("/") + "/v1/attestation", params={"nonce": os.urandom(32).hex()})
    except AttestationRefused as e:
        print(e.verdict.line())
        raise SystemExit(1) from None
    except httpx.HTTPError as e:
        raise ValueError(f"{args.target}: {type(e).__name__}: {e}") from None
    (verdict,) = [v for v, _ in attestation.verdicts.values()]
    print_verdict(verdict, args.policy)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"Listening: http://{shown}:{sock.getsockname()[1]} -> {args.target} (each connection attested first)",
          flush=True)
    print(f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
    config = uvicorn.Config(forwarding_app(client, args.target.rstrip("/")), log_level="warning", access_log=False,
                            lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        client.close()
        sock.close()


def check_answer_command(args) -> None:
    from ..attestation import answer as A
    from ..attestation import format as fmt
    from ..client.answers import check_answer
    from ..client.verify import printable, verify
    attestation = attestation_of(args)
    try:
        evidence = fmt.parse_evidence(read_file(args.evidence))
        answer = json.loads(read_file(args.answer), object_pairs_hook=fmt.unique_keys)   # one reading only
    except (fmt.FormatError, json.JSONDecodeError) as e:
        print(printable(f"refused: {getattr(e, 'field', 'answer')}: {e}"))
        raise SystemExit(1) from None
    verdict = verify(evidence, attestation.policy, attestation.collateral_for(evidence.quote), attestation.now(),
                     allow_simulated=attestation.allow_simulated)
    if not verdict.accepted:
        print(verdict.line())
        raise SystemExit(1)
    try:
        stmt = check_answer(answer, read_file(args.request), evidence)
    except A.AnswerError as e:
        print(printable(f"refused: {e}"))
        raise SystemExit(1) from None
    label = " (SIMULATED evidence: no hardware TEE)" if verdict.simulated else ""
    print(f"answer verified{label}: signed by the attested runner's answer key")
    for key in ("request_sha256", "response_sha256", "weights_fingerprint", "checkpoint_sha256", "checked_rows"):
        print(f"  {key}: {stmt[key]}")
    print(f"  settings: {json.dumps(stmt['settings'], sort_keys=True)}")
    print(f"  evidence: {verdict.line()}", file=sys.stdout)
