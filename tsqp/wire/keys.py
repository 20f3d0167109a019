"""CurveZMQ keys and the tcp:// policy: who may bind where, who may connect.

ipc:// is guarded by the file system (the socket file is 0600). tcp:// has no such guard, so a tcp
server needs a CurveZMQ key pair and an allow-list of client public keys (encryption plus
authentication), or an explicit --insecure. Key files use ZeroMQ's certificate format (zmq.auth reads
them) and are written owner-only.

Layout of a keys directory (`tsqp keys` writes it):
    server.key  server.key_secret    the server's pair (copy server.key to the runner's host)
    client.key  client.key_secret    a runner's pair
    allowed/*.key                    the client public keys the server accepts
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .. import files

DEFAULT_KEYS_DIR = Path(os.environ.get("TSQP_KEYS_DIR", "~/.config/tsqp/keys")).expanduser()


class SecurityError(RuntimeError):
    """A key is missing or unreadable, or an endpoint would be exposed without being asked to."""


# ---- key files -------------------------------------------------------------------------------------

def private_dir(d: Path) -> Path:
    """Create `d` (and missing parents) 0700; an existing directory must be ours and not open to others."""
    return files.private_dir(d, SecurityError)


def write_owner_only(path: Path, text: str, force: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SecurityError(f"{path} exists; pass --force to replace it") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)


def cert_text(public: bytes, secret: bytes | None) -> str:
    lines = [f"#   ZeroMQ CURVE certificate written by `tsqp keys` on {datetime.datetime.now():%Y-%m-%d %H:%M}",
             "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def generate(keys_dir: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret, both 0600, in a 0700 directory."""
    private_dir(keys_dir)
    public, secret = zmq.curve_keypair()
    pub, sec = keys_dir / f"{name}.key", keys_dir / f"{name}.key_secret"
    write_owner_only(sec, cert_text(public, secret), force)
    write_owner_only(pub, cert_text(public, None), force)
    return pub, sec


def allow(keys_dir: Path, public_file: Path, force: bool = False) -> Path:
    """Put a client's public key on the server's allow-list (keys_dir/allowed/)."""
    dest = private_dir(keys_dir / "allowed") / public_file.name
    write_owner_only(dest, cert_text(load_public(public_file), None), force)
    return dest


def load_public(path: Path) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read a public key from {path}: {e}") from None
    return public


def load_pair(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a *.key_secret file, which must be owner-only."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise SecurityError(f"cannot read a key pair from {path}: {e}; generate one with `tsqp keys`") from None
    if secret is None:
        raise SecurityError(f"{path} holds no secret key (pass the .key_secret file)")
    if mode & 0o077:
        raise SecurityError(f"{path} is readable by other users (mode {oct(mode)}); chmod 600 it")
    return public, secret


def load_allowed(path: Path) -> set[bytes]:
    """The allowed client public keys: one *.key file, or every *.key in a directory."""
    files = sorted(path.glob("*.key")) if path.is_dir() else [path]
    keys = {load_public(f) for f in files if f.exists()}
    if not keys:
        raise SecurityError(f"no allowed client keys in {path}; `tsqp keys` writes one to <dir>/allowed/")
    return keys


# ---- the two sides ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerCurve:
    public: bytes
    secret: bytes
    allowed: frozenset[bytes]

    @classmethod
    def load(cls, server_key: Path, allowed: Path) -> "ServerCurve":
        public, secret = load_pair(server_key)
        return cls(public, secret, frozenset(load_allowed(allowed)))

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"tsqp")

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """The ZAP handler that checks each client's public key against the allow-list."""
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve_callback("tsqp", _AllowList(self.allowed))
        return auth


class _AllowList:
    def __init__(self, keys: frozenset[bytes]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:     # key: z85 bytes
        return key in self.keys


@dataclass(frozen=True)
class ClientCurve:
    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key: Path, client_key: Path) -> "ClientCurve":
        public, secret = load_pair(client_key)
        return cls(load_public(server_key), public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


# ---- policy ----------------------------------------------------------------------------------------

def tcp_host(endpoint: str) -> str | None:
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint.removeprefix("tcp://").rpartition(":")[0]


def resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses a bind host stands for (as libzmq reads `0`, `0.0` or `0x0`: the C resolver's numeric
    forms), or None when the resolver does not know it (an interface name: check_bound decides then)."""
    name = host.strip("[]")
    if name in ("*", ""):
        return [ipaddress.ip_address("0.0.0.0")]
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def is_wildcard(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_unspecified or (mapped is not None and mapped.is_unspecified)


def is_loopback(host: str) -> bool:
    addresses = resolve(host)
    return bool(addresses) and all(a.is_loopback for a in addresses)


def wildcard_refusal(endpoint: str) -> SecurityError:
    return SecurityError(f"{endpoint} listens on every network interface; bind tcp://127.0.0.1:PORT for this "
                         f"host only, or pass --public to listen on all interfaces")


def check_bind(endpoint: str, curve: ServerCurve | None, insecure: bool, public: bool) -> list[str]:
    """Refuse a tcp bind that exposes more than asked for, judged by the address the host resolves to
    (`tcp://0:PORT` is every interface, as `*` is); return warnings to print."""
    host = tcp_host(endpoint)
    if host is None:
        return []
    addresses = resolve(host) or []
    if any(is_wildcard(a) for a in addresses) and not public:
        raise wildcard_refusal(endpoint)
    if curve is None and not insecure:
        raise SecurityError(f"{endpoint} needs CurveZMQ keys (`tsqp keys`, then --keys DIR) or an explicit "
                            f"--insecure")
    if curve is None:
        reach = "this host's users" if is_loopback(host) else "anyone who can reach this address"
        return [f"WARNING: --insecure: plain tcp on {endpoint}: {reach} can run requests without authentication "
                f"and read or alter every activation, norm weight and result in transit (no encryption)"]
    return []


def check_bound(last_endpoint: str, public: bool) -> None:
    """After the bind, from the address libzmq actually bound (ZMQ_LAST_ENDPOINT): a wildcard without
    --public is refused even when the name did not look like one (an interface name, say)."""
    host = tcp_host(last_endpoint)
    if host is None or public:
        return
    if any(is_wildcard(a) for a in resolve(host) or []):
        raise wildcard_refusal(last_endpoint)


# ---- from the command line -------------------------------------------------------------------------

def server_curve(endpoint: str, keys_dir, server_key, allowed, insecure: bool) -> ServerCurve | None:
    """The server's CurveZMQ setup: tcp:// only, unless --insecure. Defaults come from keys_dir."""
    if tcp_host(endpoint) is None or insecure:
        return None
    d = Path(keys_dir or DEFAULT_KEYS_DIR).expanduser()
    return ServerCurve.load(Path(server_key) if server_key else d / "server.key_secret",
                            Path(allowed) if allowed else d / "allowed")


def client_curve(endpoint: str, keys_dir, server_key, client_key, insecure: bool) -> ClientCurve | None:
    """The runner's CurveZMQ setup: tcp:// only, unless --insecure. Defaults come from keys_dir."""
    if tcp_host(endpoint) is None or insecure:
        return None
    d = Path(keys_dir or DEFAULT_KEYS_DIR).expanduser()
    return ClientCurve.load(Path(server_key) if server_key else d / "server.key",
                            Path(client_key) if client_key else d / "client.key_secret")
