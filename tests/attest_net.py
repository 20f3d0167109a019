"""Network actors for the attestation tests: a TLS server of the test's own (its own key, as an attacker
holds), a TLS-terminating man in the middle built on it, a server replaying captured evidence, and a client-
side recorder of every plaintext byte handed to TLS. Each counts the plaintext it receives from the client."""
from __future__ import annotations

import datetime
import json
import select
import socket
import ssl
import threading
from pathlib import Path

import httpcore
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PUMP_S = 30.0
RECV_S = 0.2


def attacker_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key of the attacker's (files: the attacker's own, not the runner's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tsqp attested runner")])    # looks alike
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "attacker.pem", directory / "attacker.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return ctx


class TlsServer(threading.Thread):
    """Accepts TLS with the attacker's key; each connection goes to handle(tls_socket) on its own thread.
    `received` is every plaintext byte clients sent (filled by the handlers through `record`)."""

    def __init__(self, directory: Path):
        super().__init__(daemon=True)
        cert, key = attacker_certificate(directory)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.received, self.lock, self.closing = bytearray(), threading.Lock(), threading.Event()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def record(self, data: bytes) -> None:
        with self.lock:
            self.received += data

    def run(self):
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(PUMP_S)
                self.handle(tls)
        except (OSError, ssl.SSLError):
            pass                 # the client hung up (as a refusing client does): nothing more to record

    def handle(self, tls):
        raise NotImplementedError

    def close(self):
        self.closing.set()
        self.join(5)
        self.sock.close()


class ManInTheMiddle(TlsServer):
    """Ends the client's TLS with its own key, opens TLS to the real runner, relays both ways, reads all."""

    def __init__(self, directory: Path, upstream_port: int):
        super().__init__(directory)
        self.upstream_port = upstream_port

    def handle(self, tls):
        with client_tls().wrap_socket(socket.create_connection(("127.0.0.1", self.upstream_port))) as up:
            relay(tls, up, self.record)


def relay(client, upstream, record) -> None:
    """Both directions on one thread (an SSL socket must not be read and written by two threads at once),
    until either side closes or stays silent for PUMP_S. A socket can be readable with no application data
    (TLS 1.3 session tickets arrive after the handshake): a blocking recv there waited for ever while the
    other side's request went unread, so each recv gives up after RECV_S and the loop goes on."""
    while True:
        ready = [s for s in (client, upstream) if s.pending()] or \
            select.select([client, upstream], [], [], PUMP_S)[0]
        if not ready:
            return
        for src in ready:
            dst = upstream if src is client else client
            src.settimeout(RECV_S)
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            if src is client:
                record(data)
            dst.settimeout(PUMP_S)
            dst.sendall(data)


class Replayer(TlsServer):
    """Answers GET /v1/attestation with evidence captured earlier (rewrite(doc, nonce_hex) may alter it),
    then reads whatever else the client sends."""

    def __init__(self, directory: Path, captured: dict, rewrite=None):
        super().__init__(directory)
        self.captured, self.rewrite = captured, rewrite or (lambda doc, nonce: doc)

    def handle(self, tls):
        head = bytearray()
        while b"\r\n\r\n" not in head and (data := tls.recv(65536)):
            head += data
        self.record(bytes(head))
        target = head.split(b" ")[1].decode() if head.count(b" ") >= 2 else ""
        nonce = target.partition("nonce=")[2][:64]
        body = json.dumps(self.rewrite(dict(self.captured), nonce)).encode()
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body)
        while data := tls.recv(65536):
            self.record(data)


class RecordingStream(httpcore.NetworkStream):
    """A client stream whose plaintext writes (after TLS, what the peer receives) go into `sent`."""

    def __init__(self, inner, sent: bytearray, tls: bool = False):
        self.inner, self.sent, self.tls = inner, sent, tls

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        return RecordingStream(self.inner.start_tls(ssl_context, server_hostname, timeout), self.sent, True)

    def write(self, buffer, timeout=None):
        if self.tls:
            self.sent += buffer
        self.inner.write(buffer, timeout)

    def read(self, max_bytes, timeout=None):
        return self.inner.read(max_bytes, timeout)

    def close(self):
        self.inner.close()

    def get_extra_info(self, info):
        return self.inner.get_extra_info(info)


class RecordingBackend(httpcore.SyncBackend):
    def __init__(self):
        self.sent = bytearray()

    def connect_tcp(self, *args, **kw):
        return RecordingStream(super().connect_tcp(*args, **kw), self.sent)
