"""ZeroMQ plumbing: endpoints, sockets with timeouts, multipart frames. It moves bytes; protocol.py knows
what they mean.

Who is at the other end of an ipc:// socket is the kernel's word, never the peer's: libzmq reads each
connection's SO_PEERCRED when it is accepted (or made) and stamps it on every message from it as the
"Peer-Address" property (`[host]:uid:gid:pid`). The server reads it from each message it receives; the
runner's RemoteOffload talks through its relay (relay.py), which reads SO_PEERCRED itself on each connection
it makes to the server, so a reconnect to someone else is caught before its first byte reaches libzmq. Before any byte leaves, the runner also checks the
socket file and its directory: a directory only its own user can write keeps everyone else from binding
there, now and on every reconnect.
"""
from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq

from .. import files
from ..config import SQUAT_REMEDY

MAX_MSG_BYTES = 4 * 2**30   # ZMQ_MAXMSGSIZE on the server: larger messages are dropped by libzmq
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 2000, 10000   # tcp only: notice peers that vanished without a FIN
INBOUND_PER_PEER = 16       # server: messages libzmq buffers per connection before it stops reading that one
OUTBOUND_PER_PEER = 64      # server: replies queued per connection; beyond, the server drops that session


class TransportError(RuntimeError):
    pass


class ServerTimeout(TransportError):
    """No reply within the timeout; names the endpoint and what was waited for."""


def transport_of(endpoint: str) -> str:
    if endpoint.startswith("ipc://"):
        return "ipc"
    if endpoint.startswith("tcp://"):
        return "tcp"
    raise TransportError(f"endpoint '{endpoint}' must start with ipc:// or tcp://")


def ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None


# ---- who is at the other end ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Creds:
    """A unix-socket peer's credentials as the kernel gave them (SO_PEERCRED, at connect time)."""
    uid: int
    gid: int
    pid: int


def peer_creds(frame: zmq.Frame) -> Creds | None:
    """The credentials libzmq attached to a message received over ipc://, or None (tcp, or not a Frame)."""
    try:
        address = frame.get("Peer-Address")
    except (AttributeError, zmq.ZMQError):
        return None
    parts = address.rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return Creds(int(parts[1]), int(parts[2]), int(parts[3]))


def check_server_creds(frame: zmq.Frame, endpoint: str) -> None:
    """Runner side, on every message from an ipc server: it must run as this user."""
    creds = peer_creds(frame)
    if creds is None:
        raise TransportError(f"cannot tell who answers on {endpoint}: the message carries no peer credentials "
                             f"(SO_PEERCRED); refusing it")
    if creds.uid != os.getuid():
        raise TransportError(f"the server on {endpoint} runs as uid {creds.uid} (pid {creds.pid}), not as this "
                             f"user (uid {os.getuid()}); refusing to talk to it")


# ---- directories only we can write ---------------------------------------------------------------------

def describe_mode(st: os.stat_result) -> str:
    return oct(stat.S_IMODE(st.st_mode))


def unsafe_ancestor(path: Path) -> str | None:
    """Why someone else could rename or replace an entry on the way to `path` (a directory), or None.
    Every directory on the way (as written and as resolved) must be ours or root's, and writable by others
    only when sticky (as /tmp); a symbolic link on the way must be ours or root's."""
    uid = os.getuid()
    for p in (Path(os.path.abspath(path)), Path(os.path.realpath(path))):
        for q in reversed([p, *p.parents]):
            try:
                st = os.lstat(q)
            except FileNotFoundError:
                return None                                   # the rest is created by us, below a checked one
            if st.st_uid not in (uid, 0):
                return f"{q} belongs to uid {st.st_uid}"
            if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX and q != p:
                return f"{q} is writable by other users and not sticky (mode {describe_mode(st)})"
    return None


def check_private_dir(d: Path, what: str) -> None:
    """`d` must be a directory (not a link) of this user that no one else can write, on a safe path."""
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise TransportError(f"{what}: {d} is not a directory")
    if st.st_uid != os.getuid():
        raise TransportError(f"{what}: {files.squatted(d, st.st_uid, SQUAT_REMEDY)}")
    if st.st_mode & 0o022:
        raise TransportError(f"{what}: {d} is writable by other users (mode {describe_mode(st)}), who could bind "
                             f"there first or replace the socket; use a directory of your own (mode 0700), as "
                             f"the default ipc:///tmp/tsqp-{os.getuid()}/gpu_server.ipc is")
    why = unsafe_ancestor(d)
    if why is not None:
        raise TransportError(f"{what}: {why}, so others could replace {d}; use a directory of your own")


def check_ipc_owner(endpoint: str) -> None:
    """Runner side, before anything is sent: the socket's directory must be this user's alone (no one else
    can bind there, now or when the runner reconnects), and a socket file already there must be ours."""
    path = ipc_path(endpoint)
    if path is None:
        return
    what = f"refusing to connect to {endpoint}"
    try:
        check_private_dir(path.parent, what)
    except FileNotFoundError:
        return                  # nothing there yet: the server creates it 0700; its reply's creds are checked
    try:
        st = path.lstat()
    except FileNotFoundError:
        return                  # not bound yet: the hello waits for it
    if st.st_uid != os.getuid():
        raise TransportError(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
                             f"refusing to send anything to it")
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{what}: {path} is not a unix socket")


# ---- the runner's socket -------------------------------------------------------------------------------

class Client:
    """A DEALER socket: several requests may be in flight; every receive is a timed poll."""

    def __init__(self, endpoint: str, timeout_s: float, ctx: zmq.Context | None = None, curve=None,
                 via: str | None = None):
        """curve: a keys.ClientCurve (CurveZMQ: encrypted, and authenticated by the server), or None.
        via: where to connect instead (the runner's ipc relay: relay.py); errors still name `endpoint`."""
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.transport = transport_of(endpoint)
        self.curve = curve is not None           # CurveZMQ's box around each frame (watch.wire_bytes)
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))   # a full queue to a dead server
        if self.transport == "tcp":
            heartbeat(self.sock)
        if curve is not None:
            curve.apply(self.sock)
        self.sock.connect(via or endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def send(self, frames: list, copy: bool = False, block: bool = True, what: str = "a request") -> None:
        try:
            self.sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            raise ServerTimeout(f"could not send {what} to {self.endpoint} within {self.timeout_s:g} s (no "
                                f"connection); is `tsqp serve` running there?") from None

    def recv(self, waiting_for: str, timeout_s: float | None = None) -> list[zmq.Frame]:
        t = self.timeout_s if timeout_s is None else timeout_s
        if not self.poller.poll(int(t * 1000)):
            raise ServerTimeout(f"no reply from {self.endpoint} within {t:g} s while waiting for {waiting_for}; "
                                f"is `tsqp serve` running there?")
        frames = self.sock.recv_multipart(copy=False)
        if self.transport == "ipc":
            check_server_creds(frames[0], self.endpoint)
        return frames

    def close(self) -> None:
        self.sock.close(linger=0)


def heartbeat(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


# ---- the server's socket -------------------------------------------------------------------------------

class EndpointLock:
    """An exclusive flock on `<socket>.lock`, held while a server serves the socket: a second server is
    refused at once however busy the first is, and a socket file whose lock is free is stale for sure."""

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self.path = socket_path.with_name(socket_path.name + ".lock")
        self.fd = self._acquire()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _acquire(self) -> int:
        for _ in range(5):            # the holder may unlink the file as it exits: take the new one then
            old = os.umask(0o177)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            finally:
                os.umask(old)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                os.close(fd)
                raise TransportError(f"{self.path} is not a regular file of uid {os.getuid()}; refusing to bind")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise TransportError(f"a live server already answers on ipc://{self.socket_path} (pid {holder} "
                                     f"holds {self.path}); refusing to take it over") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)
        raise TransportError(f"{self.path} keeps being replaced; refusing to bind")

    def release(self) -> None:
        """Remove the socket file and the lock file (while still holding it), then let go."""
        if self.fd is None:
            return
        try:
            st = os.lstat(self.socket_path)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid():
                self.socket_path.unlink()
        except FileNotFoundError:
            pass
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def claim_ipc_path(path: Path) -> EndpointLock:
    """Make the socket's directory (0700) or check it is ours alone, take the lock, clear a stale socket."""
    files.create_private(path.parent)
    check_private_dir(path.parent, f"refusing to bind ipc://{path}")
    lock = EndpointLock(path)
    try:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return lock
        if st.st_uid != os.getuid():
            raise TransportError(f"{path} belongs to uid {st.st_uid}; refusing to bind over another user's socket")
        if not stat.S_ISSOCK(st.st_mode):
            raise TransportError(f"{path} exists and is not a unix socket; refusing to bind over it")
        path.unlink()                 # its server is gone: the lock was free
        return lock
    except BaseException:
        lock.release()
        raise


def bind_server(endpoint: str, ctx: zmq.Context, max_msg_bytes: int = MAX_MSG_BYTES,
                curve=None) -> tuple[zmq.Socket, EndpointLock | None]:
    """A ROUTER socket, and for ipc:// the lock that keeps it ours (release() it after closing the socket).
    curve: a keys.ServerCurve (its authenticator must be running), or None."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    sock.setsockopt(zmq.RCVHWM, INBOUND_PER_PEER)
    sock.setsockopt(zmq.SNDHWM, OUTBOUND_PER_PEER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)     # a full or vanished peer is an error, not a silent drop
    if curve is not None:
        curve.apply(sock)
    path = ipc_path(endpoint)
    lock = None
    try:
        if path is not None:
            lock = claim_ipc_path(path)
            old = os.umask(0o177)        # the socket file is created owner-only: no chmod by path afterwards
            try:
                sock.bind(endpoint)
            finally:
                os.umask(old)
        else:
            heartbeat(sock)
            sock.bind(endpoint)
    except BaseException:
        sock.close(linger=0)
        if lock is not None:
            lock.release()
        raise
    return sock, lock
