"""DCAP collateral: from a file, or fetched from Intel's PCS or a PCCS and cached on disk with its validity.

The verifier (verify.py) never touches the network; this module is the network and the cache around it.
The PCS/PCCS v4 API (the same calls dcap-qvl's own fetcher makes):

    GET {base}/sgx/certification/v4/pckcrl?ca={processor|platform}&encoding=der   body: CRL DER,
        header SGX-PCK-CRL-Issuer-Chain (URL-encoded PEM)
    GET {base}/{sgx|tdx}/certification/v4/tcb?fmspc={hex}      body {"tcbInfo": {...}, "signature": hex},
        header TCB-Info-Issuer-Chain (or SGX-TCB-Info-Issuer-Chain)
    GET {base}/{sgx|tdx}/certification/v4/qe/identity?update=standard   body {"enclaveIdentity": {...}, ...},
        header SGX-Enclave-Identity-Issuer-Chain
    GET {base}/sgx/certification/v4/rootcacrl   (a PCCS: hex of the DER); from Intel's PCS, the root CA
        certificate's CRL distribution point instead

The signatures cover the exact bytes of tcbInfo and enclaveIdentity as served, so those are cut out of the
response text unchanged rather than parsed and re-serialised.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import urllib.parse
from pathlib import Path

import dcap_qvl
import httpx
from cryptography import x509

INTEL_PCS_URL = "https://api.trustedservices.intel.com"
DEFAULT_CACHE = Path("~/.cache/tsqp/collateral")
MAX_RESPONSE_BYTES = 1 << 20
MAX_COLLATERAL_BYTES = 1 << 20


class CollateralError(ValueError):
    pass


def load_collateral_file(path: str | Path) -> str:
    """dcap-qvl's collateral JSON from a file, checked to parse."""
    p = Path(path)
    if p.stat().st_size > MAX_COLLATERAL_BYTES:
        raise CollateralError(f"--collateral {p}: over the {MAX_COLLATERAL_BYTES}-byte cap")
    text = p.read_text()
    try:
        dcap_qvl.QuoteCollateralV3.from_json(text)
    except ValueError as e:
        raise CollateralError(f"--collateral {p}: not dcap-qvl collateral JSON: {e}") from None
    return text


def _parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def next_update(collateral_json: str) -> dt.datetime:
    """When this collateral stops being valid: the earliest nextUpdate of TCB info, QE identity and CRLs."""
    doc = json.loads(collateral_json)
    times = [_parse_time(json.loads(doc[k])["nextUpdate"]) for k in ("tcb_info", "qe_identity")]
    for k in ("root_ca_crl", "pck_crl"):
        crl = x509.load_der_x509_crl(bytes.fromhex(doc[k]))
        if crl.next_update_utc is not None:
            times.append(crl.next_update_utc)
    return min(times)


def _raw_member(text: str, key: str) -> str:
    """The exact text of a top-level JSON object member (what Intel's signature covers)."""
    decoder = json.JSONDecoder()
    i = text.index("{") + 1
    while True:
        while text[i] in " \t\r\n,":
            i += 1
        name, i = decoder.raw_decode(text, i)
        i = text.index(":", i) + 1
        while text[i] in " \t\r\n":
            i += 1
        _, end = decoder.raw_decode(text, i)
        if name == key:
            return text[i:end]
        i = end


def _chain(response: httpx.Response, *names: str) -> str:
    for name in names:
        if name in response.headers:
            return urllib.parse.unquote(response.headers[name])
    raise CollateralError(f"{response.request.url}: no {' or '.join(names)} header")


def _signed(response: httpx.Response, key: str) -> tuple[str, bytes]:
    text = response.text
    try:
        json.loads(text)
        return _raw_member(text, key), bytes.fromhex(json.loads(text)["signature"])
    except (ValueError, KeyError, IndexError) as e:
        raise CollateralError(f"{response.request.url}: not a signed {key} document: {e}") from None


def _get(client: httpx.Client, url: str) -> httpx.Response:
    """One GET, its body read up to a cap (a PCCS is a server like any other)."""
    try:
        return _read_capped(client, url)
    except httpx.HTTPError as e:
        raise CollateralError(f"{url}: {type(e).__name__}: {e}") from None


def _read_capped(client: httpx.Client, url: str) -> httpx.Response:
    with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise CollateralError(f"{url}: HTTP {response.status_code}")
        body = b""
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise CollateralError(f"{url}: a reply over {MAX_RESPONSE_BYTES} bytes")
    return httpx.Response(200, headers=response.headers, content=body, request=response.request)


def _root_ca_crl(client: httpx.Client, base: str, qe_chain: str) -> bytes:
    if not base.startswith(INTEL_PCS_URL):
        return bytes.fromhex(_get(client, f"{base}/sgx/certification/v4/rootcacrl").text.strip())
    root = x509.load_pem_x509_certificates(qe_chain.encode())[-1]
    points = root.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return _get(client, points[0].full_name[0].value).content


def fetch_collateral(quote: bytes, base_url: str = INTEL_PCS_URL, timeout: float = 20.0) -> str:
    """Collateral for this quote from a PCS or PCCS, as dcap-qvl's JSON."""
    parsed = dcap_qvl.parse_quote(quote)
    tee, ca, fmspc = ("sgx" if parsed.is_sgx() else "tdx"), parsed.ca(), parsed.fmspc()
    base = base_url.rstrip("/")
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        crl = _get(client, f"{base}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der")
        tcb = _get(client, f"{base}/{tee}/certification/v4/tcb?fmspc={fmspc}")
        qe = _get(client, f"{base}/{tee}/certification/v4/qe/identity?update=standard")
        tcb_info, tcb_signature = _signed(tcb, "tcbInfo")
        qe_identity, qe_signature = _signed(qe, "enclaveIdentity")
        qe_chain = _chain(qe, "SGX-Enclave-Identity-Issuer-Chain")
        collateral = dcap_qvl.QuoteCollateralV3(
            pck_crl_issuer_chain=_chain(crl, "SGX-PCK-CRL-Issuer-Chain"),
            root_ca_crl=_root_ca_crl(client, base, qe_chain), pck_crl=crl.content,
            tcb_info_issuer_chain=_chain(tcb, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"),
            tcb_info=tcb_info, tcb_info_signature=tcb_signature, qe_identity_issuer_chain=qe_chain,
            qe_identity=qe_identity, qe_identity_signature=qe_signature)
    return collateral.to_json()


def cache_path(cache_dir: Path, quote: bytes, base_url: str) -> Path:
    parsed = dcap_qvl.parse_quote(quote)
    source = hashlib.sha256(base_url.rstrip("/").encode()).hexdigest()[:16]
    tee = "sgx" if parsed.is_sgx() else "tdx"
    return cache_dir / f"{tee}-{parsed.fmspc().lower()}-{parsed.ca()}-{source}.json"


def _still_valid(path: Path, at: dt.datetime) -> str | None:
    try:
        text = path.read_text()
        return text if at < next_update(text) else None
    except (ValueError, KeyError, OSError):
        return None   # a damaged or foreign cache entry: fetched again and replaced


def cached_collateral(quote: bytes, base_url: str, at: dt.datetime, cache_dir: Path | None = None,
                      fetch=fetch_collateral) -> tuple[str, bool]:
    """(collateral JSON, whether it came from the cache): the cached copy while valid at `at`, else fetched.

    The cache directory and files are owner-only; a write goes through a temporary file and a rename, so a
    reader never sees half a file.
    """
    directory = (cache_dir or DEFAULT_CACHE).expanduser()
    path = cache_path(directory, quote, base_url)
    text = _still_valid(path, at) if path.is_file() else None
    if text is not None:
        return text, True
    text = fetch(quote, base_url)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return text, False
