"""Check a signed answer against the evidence of the runner that gave it (client side).

    answer: a completion's JSON, or a stream's chunks as a JSON list (the data lines, [DONE] left out); after
            the signed chunk only the usage chunk (choices []) may follow, and it is not signed
    the answer key: the evidence's tsqp.answer_key event; the statement's log_digest must be that event
    log's replay, so the answer is tied to exactly that evidence (whose quote `tsqp attest verify` checks)
"""
from __future__ import annotations

import hashlib

from tsqp.attestation import answer as A
from tsqp.attestation import format as fmt


def signed_part(answer) -> tuple[dict, str]:
    """(the tsqp_signature member, the response digest it must name) for a completion or a stream."""
    if isinstance(answer, dict):
        if A.FIELD not in answer:
            raise A.AnswerError(A.FIELD, "the answer carries no signature (was the runner attested?)")
        return answer[A.FIELD], A.completion_digest(answer)
    if isinstance(answer, list) and answer and all(isinstance(c, dict) for c in answer):
        ends = [i for i, c in enumerate(answer) if A.FIELD in c]
        if not ends:
            raise A.AnswerError(A.FIELD, "no chunk of the stream carries a signature")
        last = ends[0]
        for i, chunk in enumerate(answer[last + 1:], last + 1):
            # the signature covers the chunks up to the one with the finish reason; after it the runner sends
            # at most the usage (choices []): text there would pass as signed without being so
            if chunk.get("choices") != [] or A.FIELD in chunk:
                raise A.AnswerError(f"answer[{i}]", "a chunk after the signed one carries choices (or a second "
                                                    "signature): it is not covered by the signature")
        return answer[last][A.FIELD], A.chunks_digest(answer[:last + 1])
    raise A.AnswerError("answer", "must be a completion object or a list of stream chunks")


def answer_key(evidence: fmt.Evidence) -> bytes:
    claims = fmt.log_claims(evidence.event_log)
    key = claims.get(A.EVENT_ANSWER_KEY, {}).get("ed25519")
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise A.AnswerError(A.EVENT_ANSWER_KEY, "the evidence's event log names no Ed25519 answer key")
    return raw


def check_answer(answer, request_body: bytes, evidence: fmt.Evidence) -> dict:
    """The signed statement, once signature, request, response and evidence all match; AnswerError otherwise."""
    signed, response_sha256 = signed_part(answer)
    stmt = A.check(signed, answer_key(evidence), hashlib.sha256(request_body).hexdigest(), response_sha256)
    log_digest = fmt.replay(evidence.event_log).hex()
    if stmt.get("log_digest") != log_digest:
        raise A.AnswerError("statement.log_digest", f"expected {log_digest} (this evidence), found "
                                                    f"{stmt.get('log_digest')}")
    return stmt
