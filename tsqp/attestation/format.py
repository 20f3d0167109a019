"""The evidence format shared by the runner (tsqp/trusted) and the verifier (tsqp/client).

Pure: no network, no file system, no torch. The runner builds an event log of what its process is,
binds the log and its TLS key into the quote's REPORTDATA, and serves the evidence document; the client
parses the same document and recomputes every digest here.

    REPORTDATA (64) = SHA-512(DOMAIN || 0x00 || SHA-256(cert SPKI DER) (32) || replay(log) (48) || nonce (32))
    replay(log) (48): r = 0^48; for each event r = SHA-384(r || SHA-384(canonical JSON of the event))
                      (a TDX RTMR extend, so RTMR3 == replay(log) when the runner extended it)
    boot evidence (in the certificate's extension): nonce = 0^32

Evidence document (JSON): {"format": "tsqp-evidence/1", "provider": "tdx"|"sgx"|"sev-snp"|"simulated",
"quote": base64, "nonce": hex (32 bytes), "event_log": [{"type": str, "data": {...}}, ...],
"rtmr3_extended": bool, "certificate": PEM (optional in a file; never inside the certificate's extension)}
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tsqp.attestation.quote import (QuoteBody, QuoteError, check_simulated_quote, make_simulated_quote,  # noqa: F401
                                    parse_quote)

DOMAIN = b"tsqp-attest-v1"
FORMAT = "tsqp-evidence/1"
PROVIDERS = ("tdx", "sgx", "sev-snp", "simulated")
# An X.667 UUID OID (2.25.<uuid as an integer>), drawn once from uuid4 for tsqp's evidence extension.
EVIDENCE_OID = "2.25.164134427257309036735613823570901658644"
BOOT_NONCE = bytes(32)
MAX_EVENTS = 64
MAX_LOG_BYTES = 64 * 1024
MAX_EVIDENCE_BYTES = 256 * 1024
MAX_CERTIFICATE_CHARS = 16 * 1024
HEX = re.compile(r"[0-9a-fA-F]*")

# Event types the runner logs and the verifier's policy reads (data keys in the comments).
EVENT_CODE = "tsqp.code"            # {"tsqp_version": str, "code_sha256": hex}
EVENT_MODEL = "tsqp.model"          # {"weights_fingerprint": hex, "checkpoint_sha256": hex}
EVENT_SETTINGS = "tsqp.settings"    # {"protect": ..., "verify": ..., ...}: compared key by key
EVENT_COMPUTE = "tsqp.compute"      # {"server_fingerprint": hex}


class FormatError(ValueError):
    """Evidence that does not have the documented shape; `field` names the first wrong field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def report_data(spki_sha256: bytes, log_digest: bytes, nonce: bytes) -> bytes:
    """The 64 bytes the quote's REPORTDATA must hold for this key, event log and nonce."""
    for name, value, size in (("spki_sha256", spki_sha256, 32), ("log_digest", log_digest, 48),
                              ("nonce", nonce, 32)):
        if not isinstance(value, (bytes, bytearray)) or len(value) != size:
            got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
            raise FormatError(name, f"must be {size} bytes, got {got}")
    return hashlib.sha512(DOMAIN + b"\0" + bytes(spki_sha256) + bytes(log_digest) + bytes(nonce)).digest()


def canonical_json(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def event_digest(event: dict) -> bytes:
    """SHA-384 of the event's canonical JSON (48 bytes)."""
    return hashlib.sha384(canonical_json(event)).digest()


def extend(register: bytes, event: dict) -> bytes:
    """One RTMR extend: SHA-384(register || event_digest(event))."""
    return hashlib.sha384(register + event_digest(event)).digest()


def replay(events: list[dict]) -> bytes:
    """The event log's digest: the value an RTMR starting at zero holds after extending every event."""
    register = bytes(48)
    for event in events:
        register = extend(register, event)
    return register


def check_event_log(obj) -> list[dict]:
    """Validate an event log's shape and size; return it. FormatError names the first wrong entry."""
    if not isinstance(obj, list):
        raise FormatError("event_log", f"must be a list, got {type(obj).__name__}")
    if len(obj) > MAX_EVENTS:
        raise FormatError("event_log", f"{len(obj)} events is over the {MAX_EVENTS}-event cap")
    for i, event in enumerate(obj):
        where = f"event_log[{i}]"
        if not isinstance(event, dict) or set(event) != {"type", "data"}:
            raise FormatError(where, "must be an object with exactly the keys 'type' and 'data'")
        if not isinstance(event["type"], str) or not 0 < len(event["type"]) <= 64:
            raise FormatError(f"{where}.type", "must be a string of 1 to 64 characters")
        if not isinstance(event["data"], dict):
            raise FormatError(f"{where}.data", f"must be a JSON object, got {type(event['data']).__name__}")
    try:
        size = len(canonical_json(obj))
    except (TypeError, ValueError) as e:
        raise FormatError("event_log", f"is not plain JSON: {e}") from None
    if size > MAX_LOG_BYTES:
        raise FormatError("event_log", f"{size} bytes of JSON is over the {MAX_LOG_BYTES}-byte cap")
    return obj


def log_claims(events: list[dict]) -> dict[str, dict]:
    """The data of each tsqp event type, by type; a type logged twice is refused (which would a policy read?)."""
    claims: dict[str, dict] = {}
    for i, event in enumerate(check_event_log(events)):
        if event["type"] in claims:
            raise FormatError(f"event_log[{i}].type", f"{event['type']!r} is logged twice")
        claims[event["type"]] = event["data"]
    return claims


def load_certificate(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    data = cert.encode("ascii") if isinstance(cert, str) else bytes(cert)
    try:
        return x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") \
            else x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise FormatError("certificate", f"is not a PEM or DER X.509 certificate: {e}") from None


def spki_sha256(cert: x509.Certificate | bytes | str) -> bytes:
    """SHA-256 of the certificate's SubjectPublicKeyInfo DER: the key REPORTDATA binds."""
    spki = load_certificate(cert).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


@dataclass(frozen=True)
class Evidence:
    provider: str
    quote: bytes
    nonce: bytes                      # 32
    event_log: list[dict] = field(default_factory=list)
    rtmr3_extended: bool = False
    certificate: str | None = None    # PEM

    def to_dict(self, include_certificate: bool = True) -> dict:
        doc = {"format": FORMAT, "provider": self.provider, "quote": base64.b64encode(self.quote).decode(),
               "nonce": self.nonce.hex(), "event_log": self.event_log, "rtmr3_extended": self.rtmr3_extended}
        if include_certificate and self.certificate is not None:
            doc["certificate"] = self.certificate
        return doc

    def to_json(self, include_certificate: bool = True) -> str:
        return json.dumps(self.to_dict(include_certificate), sort_keys=True, separators=(",", ":"))

    def extension_value(self) -> bytes:
        """The bytes of the certificate's EVIDENCE_OID extension: the document without the certificate."""
        return self.to_json(include_certificate=False).encode("ascii")


_KEYS = {"format", "provider", "quote", "nonce", "event_log", "rtmr3_extended", "certificate"}


def unique_keys(pairs: list[tuple[str, object]], error: type[Exception] = None) -> dict:
    """json.loads' object hook: a key given twice is refused (json keeps the last; another reader, the first).
    error(key, why): what to raise (FormatError unless a caller names its own, as the policy parser does)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise (error or FormatError)(key, "is given twice in one JSON object")
        obj[key] = value
    return obj


def _decode_document(doc: bytes | str | dict) -> dict:
    if isinstance(doc, dict):
        return doc
    if isinstance(doc, str):
        doc = doc.encode("utf-8")
    if not isinstance(doc, (bytes, bytearray)):
        raise FormatError("evidence", f"expected JSON bytes or a dict, got {type(doc).__name__}")
    if len(doc) > MAX_EVIDENCE_BYTES:
        raise FormatError("evidence", f"{len(doc)} bytes is over the {MAX_EVIDENCE_BYTES}-byte cap")
    try:
        value = json.loads(doc, object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError("evidence", f"is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise FormatError("evidence", f"must be a JSON object, got {type(value).__name__}")
    return value


def _field(doc: dict, key: str, kind: type, required: bool = True):
    if key not in doc:
        if required:
            raise FormatError(key, "is missing")
        return None
    if not isinstance(doc[key], kind) or (kind is not bool and isinstance(doc[key], bool)):
        raise FormatError(key, f"must be {kind.__name__}, got {type(doc[key]).__name__}")
    return doc[key]


def parse_evidence(doc: bytes | str | dict) -> Evidence:
    """Strictly parse an evidence document; FormatError names the first wrong field."""
    doc = _decode_document(doc)
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise FormatError(unknown[0], "is not a field of the evidence format")
    if _field(doc, "format", str) != FORMAT:
        raise FormatError("format", f"expected {FORMAT!r}, found {doc['format']!r}")
    provider = _field(doc, "provider", str)
    if provider not in PROVIDERS:
        raise FormatError("provider", f"expected one of {', '.join(PROVIDERS)}, found {provider!r}")
    try:
        quote = base64.b64decode(_field(doc, "quote", str), validate=True)
    except binascii.Error as e:
        raise FormatError("quote", f"is not base64: {e}") from None
    nonce_hex = _field(doc, "nonce", str)
    if not HEX.fullmatch(nonce_hex):           # bytes.fromhex would also take spaces
        raise FormatError("nonce", "is not hex (digits 0-9a-f only)")
    nonce = bytes.fromhex(nonce_hex)
    if len(nonce) != 32:
        raise FormatError("nonce", f"must be 32 bytes, got {len(nonce)}")
    certificate = _field(doc, "certificate", str, required=False)
    if certificate is not None and len(certificate) > MAX_CERTIFICATE_CHARS:
        raise FormatError("certificate", f"is over the {MAX_CERTIFICATE_CHARS}-character cap")
    return Evidence(provider=provider, quote=quote, nonce=nonce, event_log=check_event_log(doc.get("event_log")),
                    rtmr3_extended=_field(doc, "rtmr3_extended", bool), certificate=certificate)


def evidence_from_certificate(cert: x509.Certificate | bytes | str) -> Evidence:
    """The boot evidence a runner's self-signed certificate carries, with that certificate attached."""
    cert = load_certificate(cert)
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(EVIDENCE_OID))
    except x509.ExtensionNotFound:
        raise FormatError("certificate", f"carries no tsqp evidence extension ({EVIDENCE_OID})") from None
    evidence = parse_evidence(ext.value.value)
    if evidence.certificate is not None:
        raise FormatError("certificate", "the extension's evidence must not embed a certificate")
    pem = cert.public_bytes(Encoding.PEM).decode("ascii")
    return Evidence(**{**evidence.__dict__, "certificate": pem})
