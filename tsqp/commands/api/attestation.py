"""`tsqp api`'s attestation: the flags' rules, GET /v1/attestation, and the signature on each answer.

  GET /v1/attestation?nonce=HEX (32 bytes)   fresh evidence over the client's nonce: the quote, the event log,
                                             the certificate (tsqp-evidence/1); no API key (a client checks
                                             the runner before it sends one); a token bucket per client
                                             address, then a shared one, 429 beyond either
  each completion carries "tsqp_signature": {"statement", "signature"} (tsqp/attestation/answer.py); a stream
  carries it on the chunk with the finish reason
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
import time

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...attestation import answer as A
from ...attestation.format import HEX
from ...trusted.attest.attestor import Attestor
from ...trusted.attest.providers import AttestationError, Provider
from .schema import APIError

EVIDENCE_PER_S = 4.0            # fresh quotes per second, sustained (a TDX quote takes the quoting enclave's time)
EVIDENCE_BURST = 8
PEER_PER_S = 2.0                # one client address's share: a flood from one peer leaves the rest to the others
MAX_PEERS = 4096                # buckets kept, the least recently seen dropped first


def check_attest_flags(args, provider: Provider | None, loopback: bool) -> None:
    """--tls-cert is the operator's certificate, which attestation replaces; --protect beyond this host without
    attestation leaves the client with the operator's word for it, so it takes an explicit --attest off."""
    if provider is not None and args.tls_cert is not None:
        raise ValueError(f"--tls-cert with attestation ({provider.name}): the runner makes its own key in memory "
                         f"and a certificate bound to its evidence; drop --tls-cert, or pass --attest off to serve "
                         f"yours without attestation")
    if provider is None and args.attest != "off" and getattr(args, "protect", None) and not loopback:
        raise ValueError(f"--protect on --host {args.host} without attestation (--attest {args.attest} found no "
                         f"TEE): clients could not check that this process runs in an enclave, which code and model "
                         f"it runs, or that protection is on. Run it in a TDX/SGX enclave, or pass --attest off to "
                         f"serve anyway")


def off_warnings(args, loopback: bool) -> list[str]:
    if args.attest == "off" and getattr(args, "protect", None) and not loopback:
        return [f"WARNING: --attest off on --host {args.host}: clients have only the operator's word that this "
                f"runner is in an enclave, runs this code and model, and protects their prompts"]
    return []


class TokenBucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.tokens, self.t = rate, burst, float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> float:
        """0 when a token was taken; else the seconds until one is there."""
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            return (1 - self.tokens) / self.rate


class PeerBuckets:
    """A token bucket per client address, taken before the shared one: a peer past its share is refused on its
    own bucket and leaves the shared tokens (a new client's first connection needs one) to the others."""

    def __init__(self, rate: float, burst: int, max_peers: int = MAX_PEERS):
        self.rate, self.burst, self.max_peers = rate, burst, max_peers
        self.buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.lock = threading.Lock()

    def take(self, peer: str) -> float:
        with self.lock:
            bucket = self.buckets.pop(peer, None) or TokenBucket(self.rate, self.burst)
            self.buckets[peer] = bucket
            while len(self.buckets) > self.max_peers:
                self.buckets.popitem(last=False)
        return bucket.take()


class AttestationRoutes:
    def __init__(self, attestor: Attestor, rate: float = EVIDENCE_PER_S, burst: int = EVIDENCE_BURST,
                 peer_rate: float = PEER_PER_S):
        self.attestor, self.bucket = attestor, TokenBucket(rate, burst)
        self.peers = PeerBuckets(peer_rate, burst)

    def routes(self) -> list[Route]:
        return [Route("/v1/attestation", self.evidence, methods=["GET"])]

    async def evidence(self, request: HTTPRequest) -> Response:
        try:
            nonce = parse_nonce(request.query_params.get("nonce"))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        wait = self.peers.take(request.client.host if request.client else "") or self.bucket.take()
        if wait:
            e = APIError(429, f"too many attestation requests; retry in {wait:.2f} s", "rate_limit_exceeded")
            return JSONResponse(e.body(), status_code=429, headers={"Retry-After": str(max(1, round(wait)))})
        try:
            evidence = await run_in_threadpool(self.attestor.evidence, nonce)
        except AttestationError as e:
            err = APIError(503, f"the TEE gave no quote: {e}", "service_unavailable")
            return JSONResponse(err.body(), status_code=503)
        return JSONResponse(evidence.to_dict(), headers={"Cache-Control": "no-store"})


def parse_nonce(text: str | None) -> bytes:
    if text is None:
        raise APIError(400, "GET /v1/attestation needs ?nonce=HEX: 32 random bytes of the client's", param="nonce")
    if not HEX.fullmatch(text):       # bytes.fromhex would also take spaces; checked before any conversion
        raise APIError(400, "'nonce' must be hex (64 digits: 32 bytes)", param="nonce")
    nonce = bytes.fromhex(text)
    if len(nonce) != 32:
        raise APIError(400, f"'nonce' must be 32 bytes (64 hex digits), got {len(nonce)}", param="nonce")
    return nonce


class Unsigned:
    """Without attestation: answers go out as they are."""

    def completion(self, completion: dict, checked_rows: int) -> dict:
        return completion

    def chunk(self, chunk: dict, checked_rows: int | None = None) -> dict:
        return chunk


def signer_for(attestor: Attestor | None, body: bytes):
    return AnswerSigner(attestor, body) if attestor is not None else Unsigned()


class AnswerSigner:
    """One request's signature: over its body's bytes and, at the end, the response as sent."""

    def __init__(self, attestor: Attestor, body: bytes):
        self.attestor, self.request_sha256 = attestor, hashlib.sha256(body).hexdigest()
        self.stream = A.StreamDigest()

    def completion(self, completion: dict, checked_rows: int) -> dict:
        signed = self.attestor.sign(self.request_sha256, A.completion_digest(completion), checked_rows)
        return {**completion, A.FIELD: signed}

    def chunk(self, chunk: dict, checked_rows: int | None = None) -> dict:
        """Every chunk of the stream goes through here; the one with the finish reason (checked_rows given)
        comes back signed over all of them."""
        self.stream.add(chunk)
        if checked_rows is None:
            return chunk
        return {**chunk, A.FIELD: self.attestor.sign(self.request_sha256, self.stream.hexdigest(), checked_rows)}
