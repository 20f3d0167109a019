"""The runner's attestation state: a provider, the event log (each event extended into RTMR3 where the
provider can), the TLS identity whose certificate carries the boot evidence, and the answer key.

    evidence(nonce) -> Evidence: quote over report_data(SHA-256(TLS SPKI), replay(log), nonce)
"""
from __future__ import annotations

import threading

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ...attestation import answer as A
from ...attestation import format as F
from .providers import Provider
from .tls import TlsIdentity


def new_answer_key() -> tuple[Ed25519PrivateKey, str]:
    key = Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


class Attestor:
    def __init__(self, provider: Provider, events: list[dict], answer_key: Ed25519PrivateKey,
                 tls: TlsIdentity | None = None):
        """events: the log, its tsqp.answer_key event naming answer_key's public half; tls: None where no
        channel is served (`tsqp run`): REPORTDATA then binds 32 zero bytes in the key's place."""
        self.provider, self.events, self.answer_key, self.tls = provider, F.check_event_log(events), answer_key, tls
        self.lock = threading.Lock()            # one quote at a time: configfs-tsm has one report entry
        extended = [provider.extend_rtmr3(F.event_digest(e)) for e in self.events]
        self.rtmr3_extended = bool(extended) and all(extended)
        self.log_digest = F.replay(self.events)
        claims = F.log_claims(self.events)
        model, settings = claims[F.EVENT_MODEL], claims[F.EVENT_SETTINGS]
        self.identity = {"weights_fingerprint": model.get("weights_fingerprint"),
                         "checkpoint_sha256": model.get("checkpoint_sha256"), "settings": settings,
                         "log_digest": self.log_digest.hex()}

    @property
    def spki_sha256(self) -> bytes:
        return self.tls.spki_sha256 if self.tls is not None else bytes(32)

    def evidence(self, nonce: bytes, with_certificate: bool = True) -> F.Evidence:
        rd = F.report_data(self.spki_sha256, self.log_digest, nonce)
        with self.lock:
            quote = self.provider.quote(rd)
        cert = self.tls.pem() if with_certificate and self.tls is not None and self.tls.certificate else None
        return F.Evidence(provider=self.provider.name, quote=quote, nonce=nonce, event_log=self.events,
                          rtmr3_extended=self.rtmr3_extended, certificate=cert)

    def certify(self, hosts: list[str]) -> None:
        """The TLS certificate, carrying the boot evidence (nonce zeros) in its extension."""
        boot = self.evidence(F.BOOT_NONCE, with_certificate=False)
        self.tls.certify(boot.extension_value(), hosts)

    def sign(self, request_sha256: str, response_sha256: str, checked_rows: int) -> dict:
        return A.sign(self.answer_key, A.statement(request_sha256, response_sha256, self.identity, checked_rows))
