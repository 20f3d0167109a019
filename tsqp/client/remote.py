"""Fetch a runner's evidence over HTTPS and the key its TLS connection actually presented.

TLS certificate verification is off on purpose: the runner's certificate is self-signed and made at its
start, so no CA vouches for it. What makes the connection trustworthy instead is the binding: the verifier
requires the served certificate's key (returned here) to be the key the quote's REPORTDATA names.
"""
from __future__ import annotations

import os
import ssl
import time

import httpx

from tsqp.attestation import format as fmt

ATTESTATION_PATH = "/v1/attestation"


def fresh_nonce() -> bytes:
    return os.urandom(32)


def _unverified_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE   # the key is pinned by the attestation binding, not by a CA
    return context


def attestation_url(target: str) -> str:
    url = httpx.URL(target)
    if url.scheme != "https":
        raise ValueError(f"{target}: a runner is reached over https:// (its TLS key is what the quote binds)")
    path = url.path.rstrip("/")
    return str(url.copy_with(path=path if path.endswith(ATTESTATION_PATH) else path + ATTESTATION_PATH, query=None))


def fetch_evidence(target: str, nonce: bytes, timeout: float = 10.0) -> tuple[fmt.Evidence, bytes]:
    """(the runner's evidence over `nonce`, SHA-256 of the SPKI its TLS connection presented)."""
    url = attestation_url(target)
    try:
        return _fetch(url, nonce, timeout)
    except httpx.HTTPError as e:
        raise ConnectionError(f"{url}: {type(e).__name__}: {e}") from None


def _fetch(url: str, nonce: bytes, timeout: float) -> tuple[fmt.Evidence, bytes]:
    deadline = time.monotonic() + 2 * timeout     # the whole body: httpx's timeout is per read
    with httpx.Client(verify=_unverified_tls(), timeout=timeout, follow_redirects=False) as client:
        with client.stream("GET", url, params={"nonce": nonce.hex()}) as response:
            ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
            served = ssl_object.getpeercert(True)   # positional: httpcore hands the _ssl object, which takes no keyword
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > fmt.MAX_EVIDENCE_BYTES:
                    raise ValueError(f"{url}: evidence over {fmt.MAX_EVIDENCE_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise ValueError(f"{url}: the evidence took over {2 * timeout:g} s to arrive")
    if served is None:
        raise ValueError(f"{url}: the server presented no certificate")
    if response.status_code != 200:
        raise ValueError(f"{url}: HTTP {response.status_code}: {body[:200]!r}")
    return fmt.parse_evidence(body), fmt.spki_sha256(served)
