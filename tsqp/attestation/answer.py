"""Signed answers: what the runner's answer key signs for each completion, and its check (pure; shared by
the runner and the client).

    statement = canonical JSON of
      {"domain": "tsqp-answer-v1", "request_sha256": SHA-256 of the request body's bytes,
       "response_sha256": SHA-256 of the response (below), "weights_fingerprint", "checkpoint_sha256",
       "settings": the runner's security settings, "checked_rows": rows Freivalds-checked for this answer,
       "log_digest": the event log's digest (replay), which names the answer key itself}
    signature = Ed25519(answer key, statement)

The response: a JSON completion's canonical JSON without its "tsqp_signature" member; a stream's chunks, from
the first through the one with the finish reason (that one without its "tsqp_signature"), as the canonical
JSON of their list. The key is a separate Ed25519 key whose public half is in the event log (tsqp.answer_key),
not the TLS key: one key per purpose, and an answer checks against saved evidence without its certificate.
"""
from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .format import canonical_json

DOMAIN = "tsqp-answer-v1"
FIELD = "tsqp_signature"
EVENT_ANSWER_KEY = "tsqp.answer_key"


class AnswerError(ValueError):
    """An answer that does not check; `field` names what."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def without_signature(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != FIELD}


def completion_digest(completion: dict) -> str:
    return sha256_hex(canonical_json(without_signature(completion)))


def chunks_digest(chunks: list[dict]) -> str:
    return sha256_hex(canonical_json([without_signature(c) for c in chunks]))


class StreamDigest:
    """chunks_digest computed chunk by chunk, as a stream is written."""

    def __init__(self):
        self.h, self.count = hashlib.sha256(b"["), 0

    def add(self, chunk: dict) -> None:
        self.h.update((b"," if self.count else b"") + canonical_json(without_signature(chunk)))
        self.count += 1

    def hexdigest(self) -> str:
        h = self.h.copy()
        h.update(b"]")
        return h.hexdigest()


def statement(request_sha256: str, response_sha256: str, identity: dict, checked_rows: int) -> dict:
    """identity: weights_fingerprint, checkpoint_sha256, settings, log_digest (the runner's, fixed at start)."""
    return {"domain": DOMAIN, "request_sha256": request_sha256, "response_sha256": response_sha256,
            "weights_fingerprint": identity["weights_fingerprint"], "checkpoint_sha256": identity["checkpoint_sha256"],
            "settings": identity["settings"], "checked_rows": int(checked_rows), "log_digest": identity["log_digest"]}


def sign(key: Ed25519PrivateKey, stmt: dict) -> dict:
    """The member a completion carries: the statement and its signature."""
    return {"statement": stmt, "signature": key.sign(canonical_json(stmt)).hex()}


def check(signed: dict, public_key: bytes, request_sha256: str, response_sha256: str) -> dict:
    """The statement, once its signature and both digests check; AnswerError names what does not."""
    if not isinstance(signed, dict) or set(signed) != {"statement", "signature"}:
        raise AnswerError(FIELD, "must be an object with 'statement' and 'signature'")
    stmt, sig = signed["statement"], signed["signature"]
    if not isinstance(stmt, dict) or stmt.get("domain") != DOMAIN:
        raise AnswerError("statement.domain", f"expected {DOMAIN!r}")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(bytes.fromhex(sig), canonical_json(stmt))
    except (InvalidSignature, ValueError, TypeError):
        raise AnswerError("signature", "does not verify with the attested answer key") from None
    for name, want in (("request_sha256", request_sha256), ("response_sha256", response_sha256)):
        if stmt.get(name) != want:
            raise AnswerError(f"statement.{name}", f"expected {want}, found {stmt.get(name)}")
    return stmt
