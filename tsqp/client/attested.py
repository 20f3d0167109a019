"""An attested client: an httpx transport that verifies the runner on each new TLS connection, over that
very connection, before any request byte goes out on it; and the openai client built on it.

    connect TCP -> TLS handshake (no CA: the runner's certificate is self-signed at its start)
      -> GET /v1/attestation?nonce=<32 fresh random bytes> on the same TLS stream (h11 parses the answer)
      -> verify(evidence, policy, collateral, now, expect_spki = SHA-256 of the SPKI this handshake presented,
                expect_nonce = ours)
      -> accepted: the stream is handed to httpcore, which sends the request on it; refused: closed, and
         AttestationRefused names the field
A key accepted once is not attested again on the next connection: only the attested process holds it (it
never leaves its memory), and the TLS handshake proves the peer holds it. Verdicts are cached per SPKI for
`verdict_ttl_s` (default 10 minutes).
"""
from __future__ import annotations

import datetime as dt
import os
import ssl
import threading
import time
from typing import Callable

import h11
import httpcore
import httpx

from tsqp.attestation import format as fmt
from tsqp.attestation.quote import parse_quote
from tsqp.client.policy import Policy, check_pinned
from tsqp.client.verify import Verdict, verify

ATTESTATION_PATH = "/v1/attestation"
READ_CHUNK = 65536
DEFAULT_TTL_S = 600.0
EVIDENCE_DEADLINE_S = 60.0    # the whole attestation exchange, at most (a quote takes well under a second)

Collateral = str | Callable[[bytes], str] | None


class AttestationRefused(httpx.TransportError):
    """The peer on this connection is not a runner the policy accepts; nothing was sent to it."""

    def __init__(self, verdict: Verdict, target: str):
        super().__init__(f"{target}: attestation {verdict.line()}")
        self.verdict = verdict


def unverified_tls() -> ssl.SSLContext:
    """No CA and no host name check: the key is pinned by the attestation binding instead. No key log either:
    create_default_context writes every session's secrets to $SSLKEYLOGFILE where that is set (a debugging
    aid often left on), and whoever reads that file reads the prompts."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.keylog_filename = None
    return ctx


def peer_spki_sha256(stream: httpcore.NetworkStream) -> bytes:
    der = stream.get_extra_info("ssl_object").getpeercert(True)      # positional: the _ssl object takes no keyword
    return fmt.spki_sha256(der)


def request_evidence(stream: httpcore.NetworkStream, host: str, nonce: bytes, timeout: float | None) -> bytes:
    """GET /v1/attestation on an open TLS stream; the body, size-capped, the whole exchange within one deadline
    (a per-read timeout alone lets a peer sending a byte at a time hold the client for ever). The stream stays
    usable (keep-alive)."""
    deadline = time.monotonic() + min(timeout or EVIDENCE_DEADLINE_S, EVIDENCE_DEADLINE_S)
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=f"{ATTESTATION_PATH}?nonce={nonce.hex()}",
                          headers=[("Host", host), ("Accept", "application/json")])
    stream.write(conn.send(request) + conn.send(h11.EndOfMessage()), timeout)
    status, body = None, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            left = deadline - time.monotonic()
            if left <= 0:
                raise fmt.FormatError("evidence", f"GET {ATTESTATION_PATH} not answered within "
                                                  f"{min(timeout or EVIDENCE_DEADLINE_S, EVIDENCE_DEADLINE_S)} s")
            data = stream.read(READ_CHUNK, left)
            conn.receive_data(data)          # b"": the peer closed; h11 then raises or reports the end
            continue
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > fmt.MAX_EVIDENCE_BYTES:
                raise fmt.FormatError("evidence", f"over {fmt.MAX_EVIDENCE_BYTES} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if status != 200:
        raise fmt.FormatError("evidence", f"GET {ATTESTATION_PATH} answered HTTP {status}: {bytes(body[:200])!r}")
    return bytes(body)


class Attestation:
    """What a client requires of a runner, and the verdicts it reached, by key."""

    def __init__(self, policy: Policy, allow_simulated: bool = False, collateral: Collateral = None,
                 at: dt.datetime | None = None, verdict_ttl_s: float = DEFAULT_TTL_S):
        """collateral: dcap-qvl's JSON, or a function of the quote returning it (e.g. a cached PCS fetch);
        at: verify at this time instead of now (tests pinning a collateral window)."""
        self.policy, self.allow_simulated = check_pinned(policy), allow_simulated
        self.collateral, self.at = collateral, at
        self.ttl_s, self.verdicts, self.lock = verdict_ttl_s, {}, threading.Lock()
        self.attested = 0            # connections attested (fetch + verify), for tests and reports

    def cached(self, spki: bytes) -> Verdict | None:
        with self.lock:
            hit = self.verdicts.get(spki)
            return hit[0] if hit and time.monotonic() - hit[1] < self.ttl_s else None

    def check(self, stream: httpcore.NetworkStream, host: str, timeout: float | None) -> Verdict:
        """Attest the peer of this TLS stream (unless its key's verdict is cached); raises AttestationRefused."""
        spki = peer_spki_sha256(stream)
        verdict = self.cached(spki)
        if verdict is not None:
            return verdict
        nonce = os.urandom(32)
        try:
            evidence = fmt.parse_evidence(request_evidence(stream, host, nonce, timeout))
            verdict = verify(evidence, self.policy, self.collateral_for(evidence.quote), self.now(),
                             allow_simulated=self.allow_simulated, expect_spki=spki, expect_nonce=nonce)
        except fmt.FormatError as e:
            verdict = Verdict(False, e.field, "tsqp-evidence/1 from GET /v1/attestation", str(e))
        except h11.ProtocolError as e:          # the peer does not speak HTTP/1.1 as a runner does
            verdict = Verdict(False, "evidence", "an HTTP/1.1 answer to GET /v1/attestation", str(e))
        with self.lock:
            self.attested += 1
        if not verdict.accepted:
            raise AttestationRefused(verdict, host)
        with self.lock:
            self.verdicts[spki] = (verdict, time.monotonic())
        return verdict

    def now(self) -> dt.datetime:
        return self.at or dt.datetime.now(dt.timezone.utc)

    def collateral_for(self, quote: bytes):
        if callable(self.collateral):
            return None if parse_quote(quote).tee == "simulated" else self.collateral(quote)
        return self.collateral


class AttestingStream(httpcore.NetworkStream):
    """A TCP stream whose start_tls attests the peer before returning the TLS stream to httpcore."""

    def __init__(self, inner: httpcore.NetworkStream, attestation: Attestation, host: str):
        self.inner, self.attestation, self.host = inner, attestation, host

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> httpcore.NetworkStream:
        tls = self.inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            self.attestation.check(tls, self.host, timeout)
        except BaseException:
            tls.close()
            raise
        return tls

    def read(self, max_bytes, timeout=None):
        return self.inner.read(max_bytes, timeout)

    def write(self, buffer, timeout=None):
        raise AttestationRefused(Verdict(False, "scheme", "https://", "a plain connection"), self.host)

    def close(self):
        self.inner.close()

    def get_extra_info(self, info):
        return self.inner.get_extra_info(info)


class AttestingBackend(httpcore.NetworkBackend):
    def __init__(self, attestation: Attestation, inner: httpcore.NetworkBackend | None = None):
        """inner: the network under the attestation (default: plain sockets; a test's recorder, a SOCKS one)."""
        self.attestation, self.inner = attestation, inner or httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        stream = self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return AttestingStream(stream, self.attestation, f"{host}:{port}")

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise AttestationRefused(Verdict(False, "scheme", "https:// over TCP", "a unix socket"), path)

    def sleep(self, seconds):
        self.inner.sleep(seconds)


class AttestedTransport(httpx.HTTPTransport):
    """httpx's own transport, its connection pool on the attesting backend (HTTP/1.1, no proxies)."""

    def __init__(self, attestation: Attestation, limits: httpx.Limits = httpx.Limits(),
                 inner: httpcore.NetworkBackend | None = None):
        super().__init__(verify=unverified_tls(), limits=limits, trust_env=False)
        self.attestation = attestation
        self._pool = httpcore.ConnectionPool(ssl_context=unverified_tls(), max_connections=limits.max_connections,
                                             max_keepalive_connections=limits.max_keepalive_connections,
                                             keepalive_expiry=limits.keepalive_expiry,
                                             network_backend=AttestingBackend(attestation, inner))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "https":
            raise AttestationRefused(Verdict(False, "scheme", "https://", request.url.scheme + "://"),
                                     str(request.url))
        return super().handle_request(request)


# httpx.Client arguments that would put another transport in front of the attested one (a proxy or a mount
# takes precedence over `transport`), or that the attested transport cannot apply: refused, never ignored.
BYPASSING_ARGS = ("transport", "mounts", "proxy", "verify", "cert", "trust_env", "http1", "http2")


def attested_httpx(attestation: Attestation, inner: httpcore.NetworkBackend | None = None, **kw) -> httpx.Client:
    bypass = [k for k in BYPASSING_ARGS if k in kw]
    if bypass:
        raise TypeError(f"attested_httpx: {', '.join(bypass)}: every request goes through the attested transport "
                        f"(TLS checked by the attestation binding, HTTP/1.1, no proxy); a network under it is "
                        f"`inner`, an httpcore NetworkBackend")
    limits = kw.pop("limits", httpx.Limits())     # httpx.Client ignores limits given beside a transport
    return httpx.Client(transport=AttestedTransport(attestation, limits, inner), trust_env=False, **kw)


def attested_openai(base_url: str, policy: Policy, allow_simulated: bool = False, collateral: Collateral = None,
                    at: dt.datetime | None = None, inner: httpcore.NetworkBackend | None = None, **kw):
    """An openai.OpenAI client whose every connection to `base_url` is attested first (see the module doc).
    The Attestation is on the client as `client.attestation`."""
    import openai

    attestation = Attestation(policy, allow_simulated, collateral, at)
    kw.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or "unused")
    client = openai.OpenAI(base_url=base_url, http_client=attested_httpx(attestation, inner, timeout=kw.pop("timeout", 600)),
                           **kw)
    client.attestation = attestation
    return client
