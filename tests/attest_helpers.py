"""Test-side builders for attestation: self-signed certificates, simulated evidence, local HTTP(S) servers."""
from __future__ import annotations

import datetime as dt
import http.server
import json
import ssl
import threading
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from tsqp.attestation import format as fmt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "attestation"
EVENTS = [
    {"type": fmt.EVENT_CODE, "data": {"tsqp_version": "0.1.0", "code_sha256": "ab" * 32}},
    {"type": fmt.EVENT_MODEL, "data": {"weights_fingerprint": "cd" * 16, "checkpoint_sha256": "ef" * 32}},
    {"type": fmt.EVENT_SETTINGS, "data": {"protect": "otp", "verify": True, "deferred_checks": False}},
]


def self_signed(extension: bytes | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tsqp-runner")])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False))
    if extension is not None:
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(fmt.EVIDENCE_OID), extension)
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256()), key


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class SimulatedRunner:
    """What a runner with the simulated provider holds: a TLS key and certificate and a quote-signing key."""

    def __init__(self, events: list[dict] | None = None):
        self.events = list(EVENTS if events is None else events)
        self.signing_key = Ed25519PrivateKey.generate()
        self.cert, self.tls_key = self_signed()

    def evidence(self, nonce: bytes, events: list[dict] | None = None, rtmr3: bytes | None = None,
                 spki: bytes | None = None) -> fmt.Evidence:
        """Evidence over `nonce`; the keyword arguments bind something else than what it carries (attacks)."""
        log = self.events if events is None else events
        digest = fmt.replay(log)
        rd = fmt.report_data(spki or fmt.spki_sha256(self.cert), digest, nonce)
        quote = fmt.make_simulated_quote(rd, digest if rtmr3 is None else rtmr3, self.signing_key)
        return fmt.Evidence(provider="simulated", quote=quote, nonce=nonce, event_log=self.events,
                            rtmr3_extended=True, certificate=pem(self.cert))

    def write_tls_files(self, directory: Path) -> tuple[Path, Path]:
        cert_path, key_path = directory / "runner.pem", directory / "runner.key"
        cert_path.write_text(pem(self.cert))
        key_path.write_bytes(self.tls_key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        return cert_path, key_path


@contextmanager
def http_server(handle, tls: tuple[Path, Path] | None = None):
    """A threaded server on 127.0.0.1:0 calling handle(path, query) -> (status, headers, body); yields its URL
    and the list of paths it served."""
    served: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            served.append(self.path)
            status, headers, body = handle(url.path, dict(urllib.parse.parse_qsl(url.query)))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def attestation_handler(make_evidence):
    """A /v1/attestation endpoint: make_evidence(nonce bytes) -> Evidence."""
    def handle(path, query):
        if path != "/v1/attestation" or "nonce" not in query:
            return 404, {}, b"not found"
        return 200, {"Content-Type": "application/json"}, make_evidence(bytes.fromhex(query["nonce"])).to_json().encode()
    return handle


def pccs_handler(collateral_json: str):
    """A PCCS v4 API serving one quote's collateral (the shared file's contents, in Intel's response shapes)."""
    doc = json.loads(collateral_json)
    quote_chain = urllib.parse.quote
    routes = {
        "pckcrl": ({"SGX-PCK-CRL-Issuer-Chain": quote_chain(doc["pck_crl_issuer_chain"])}, bytes.fromhex(doc["pck_crl"])),
        "tcb": ({"TCB-Info-Issuer-Chain": quote_chain(doc["tcb_info_issuer_chain"])},
                f'{{"tcbInfo":{doc["tcb_info"]},"signature":"{doc["tcb_info_signature"]}"}}'.encode()),
        "qe/identity": ({"SGX-Enclave-Identity-Issuer-Chain": quote_chain(doc["qe_identity_issuer_chain"])},
                        f'{{"enclaveIdentity":{doc["qe_identity"]},"signature":"{doc["qe_identity_signature"]}"}}'
                        .encode()),
        "rootcacrl": ({}, doc["root_ca_crl"].encode()),
    }

    def handle(path, query):
        for name, (headers, body) in routes.items():
            if path.endswith("/certification/v4/" + name):
                return 200, headers, body
        return 404, {}, b"not found"
    return handle
