"""The runner's TLS identity, made in memory at start and never written to disk: an ECDSA P-256 key and a
self-signed certificate whose EVIDENCE_OID extension carries the boot evidence (nonce = 32 zeros), whose
REPORTDATA binds SHA-256 of this certificate's public key (as Gramine's RA-TLS and dstack do).

Python's ssl module loads keys from paths only, so the PEM goes through an anonymous memfd (RAM, no name in
any file system) read once by load_cert_chain and closed (load_from_memory); uvicorn takes the finished
SSLContext through its ssl_context_factory.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ...attestation import format as F

VALIDITY = datetime.timedelta(days=365)


class TlsIdentity:
    def __init__(self):
        self.key = ec.generate_private_key(ec.SECP256R1())
        spki = self.key.public_key().public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
        self.spki_sha256 = hashlib.sha256(spki).digest()
        self.certificate: x509.Certificate | None = None

    def certify(self, boot_evidence: bytes, hosts: list[str]) -> x509.Certificate:
        """The self-signed certificate carrying `boot_evidence` (the evidence JSON without a certificate)."""
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tsqp attested runner")])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                   .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(F.EVIDENCE_OID), boot_evidence),
                                  critical=False)
                   .add_extension(x509.SubjectAlternativeName([general_name(h) for h in hosts]), critical=False))
        self.certificate = builder.sign(self.key, hashes.SHA256())
        return self.certificate

    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def ssl_context(self) -> ssl.SSLContext:
        """A server context holding this key and certificate, loaded without touching the disk."""
        if self.certificate is None:
            raise RuntimeError("certify() first: the context serves the attested certificate")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        key_pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        load_from_memory(ctx, self.pem().encode("ascii") + key_pem)
        return ctx


def load_from_memory(ctx: ssl.SSLContext, pem: bytes) -> None:
    """load_cert_chain from an anonymous memfd. Where memfd_create is missing (some Gramine versions), a file
    in $TSQP_KEY_TMPFS (in Gramine: a `type = "tmpfs"` mount, enclave memory) is used and unlinked at once;
    without either, a clear error rather than a key on a disk the host can read."""
    try:
        fd = os.memfd_create("tsqp-tls", os.MFD_CLOEXEC)
        path = f"/proc/self/fd/{fd}"
    except (AttributeError, OSError) as e:
        tmpfs = os.environ.get("TSQP_KEY_TMPFS")
        if not tmpfs:
            raise RuntimeError(f"memfd_create is unavailable ({e}): set TSQP_KEY_TMPFS to an in-memory (tmpfs) "
                               f"directory for the TLS key, never a host-visible disk") from None
        path = os.path.join(tmpfs, f"tsqp-tls-{os.getpid()}-{os.urandom(8).hex()}.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        ctx.load_cert_chain(path)
    finally:
        os.close(fd)
        if not path.startswith("/proc/"):
            os.unlink(path)


def general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
