"""The server's sessions: one per connected runner, with its shared-memory arena and control pipes, if any.

A session belongs to the connection its hello came on. It ends on `bye`, on a new hello on that connection,
when that connection closes (the socket monitor says so: a runner that dies or closes its socket), or, over
tcp, after --idle-timeout unheard. Nothing the runner states (a pid, a name) decides how long it lives.
Sessions are counted per user (the kernel's uid over ipc, the CurveZMQ key or the address over tcp) against
--max-sessions-per-user, and in all against --max-sessions.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..wire import protocol as P
from ..wire.pipes import Channel, open_pipe, pipe_paths
from ..wire.shm import NAME as ARENA_NAME
from ..wire.shm import Arena, ArenaError, arena_dir
from ..wire.transport import TransportError, check_private_dir
from .peers import Peer

CHECKED_CACHE = 1024   # checked calls remembered per session (a prefill reuses a few dozen region layouts)


@dataclass
class Session:
    last_seen: float
    peer: Peer                      # who opened it, and on which connection
    arena: Arena | None = None
    pipes: Channel | None = None    # the control pipes, when the runner asked for them
    checked: dict = field(default_factory=dict)   # a call header but its id -> handlers.check()
    record: object | None = None    # a record.SessionRecord under `tsqp serve --record`

    def remember(self, key: bytes, value: tuple) -> None:
        if len(self.checked) >= CHECKED_CACHE:
            self.checked.clear()
        self.checked[key] = value

    def close_files(self) -> None:
        self.checked.clear()
        if self.pipes is not None:
            self.pipes.close()
            self.pipes = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None


def pipe_dir(given) -> Path:
    """Where the runner made its pipes: the directory its attach names (its runtime directory, which this
    process's environment may lack), which must be this user's alone, as arena_dir() is; else arena_dir()."""
    if given is None:
        return arena_dir()
    if not isinstance(given, str) or not os.path.isabs(given) or len(given) > 4096:
        raise P.ProtocolError(f"attach: bad pipe directory {str(given)[:80]!r}")
    try:
        check_private_dir(Path(given), "attach: the pipe directory")
    except (OSError, TransportError) as e:
        raise ArenaError(str(e)) from None
    return Path(given)


def open_pipes(name, directory=None) -> Channel:
    """Open a runner's control pipes (named after its arena) and unlink them."""
    if not isinstance(name, str) or not ARENA_NAME.match(name):
        raise P.ProtocolError(f"bad arena name {name!r}")
    req, rep = pipe_paths(pipe_dir(directory) / name)
    fds = []
    try:
        for p in (req, rep):
            try:
                fds.append(open_pipe(p))
            except OSError as e:
                raise ArenaError(f"cannot open the control pipe {p}: {e.strerror}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        req.unlink(missing_ok=True)
        rep.unlink(missing_ok=True)
    return Channel(fds[0], fds[1])


class Sessions:
    """peer id -> Session, and which pipe belongs to whom (the loop polls the pipes beside the socket)."""

    def __init__(self, max_sessions: int, idle_timeout_s: float, on_pipes_change, per_user: int | None = None,
                 max_arena_bytes: int | None = None):
        self.max_sessions, self.idle_timeout_s = max_sessions, idle_timeout_s
        self.per_user = per_user or max_sessions
        self.max_arena_bytes = max_arena_bytes
        self.by_peer: dict[bytes, Session] = {}
        self.pipe_peers: dict[int, bytes] = {}      # control pipe fd -> its session's peer
        self.on_pipes_change = on_pipes_change      # (fd, added: bool): the loop's poller follows

    def need(self, peer: bytes) -> Session:
        session = self.by_peer.get(peer)
        if session is None:
            raise P.ProtocolError("no session: send hello first")
        session.last_seen = time.monotonic()
        return session

    def open(self, peer: bytes, who: Peer) -> Session:
        self.drop(peer)
        if len(self.by_peer) >= self.max_sessions:
            self.reap()
        if len(self.by_peer) >= self.max_sessions:
            raise P.ProtocolError(f"server is at its session limit ({self.max_sessions} sessions, --max-sessions); "
                                  f"try again later")
        mine = sum(s.peer.user == who.user for s in self.by_peer.values())
        if mine >= self.per_user:
            raise P.ProtocolError(f"{who.user} already holds {mine} sessions, this server's limit per user "
                                  f"(--max-sessions-per-user {self.per_user}); close one first")
        session = self.by_peer[peer] = Session(time.monotonic(), who)
        return session

    def attach(self, peer: bytes, spec, want_pipes: bool, pin_cuda: bool) -> Arena:
        """Map the session's shared-memory arena (replacing an earlier one), and its pipes if asked for."""
        session = self.need(peer)
        if not isinstance(spec, dict) or not isinstance(spec.get("size"), int) or spec["size"] <= 0:
            raise P.ProtocolError("attach: 'arena' must be {name, size}")
        if not isinstance(spec.get("name"), str) or not ARENA_NAME.match(spec["name"]):
            raise P.ProtocolError(f"bad arena name {spec.get('name')!r}")
        pipes = open_pipes(spec["name"], spec.get("dir")) if want_pipes else None
        arena = None
        try:
            arena = Arena.attach(spec["name"], spec["size"], session.peer.pid, self.max_arena_bytes)
            if pin_cuda:
                arena.register_cuda()
        except BaseException:
            if pipes is not None:
                pipes.close()
            if arena is not None:
                arena.close()
            raise
        self._forget_pipes(session)
        session.close_files()
        session.arena, session.pipes = arena, pipes
        if pipes is not None:
            self.pipe_peers[pipes.in_fd] = peer
            self.on_pipes_change(pipes.in_fd, True)
        return arena

    def _forget_pipes(self, session: Session) -> None:
        if session.pipes is not None:
            self.pipe_peers.pop(session.pipes.in_fd, None)
            self.on_pipes_change(session.pipes.in_fd, False)

    def drop(self, peer: bytes, why: str | None = None) -> None:
        session = self.by_peer.pop(peer, None)
        if session is not None:
            if why:
                print(f"dropped a session of {session.peer.user}: {why}", file=sys.stderr, flush=True)
            self._forget_pipes(session)
            session.close_files()
            if session.record is not None:
                session.record.close()

    def connection_closed(self, fd: int) -> None:
        """Its runner closed the connection (or died): end the sessions opened on it."""
        for peer in [p for p, s in self.by_peer.items() if s.peer.fd == fd]:
            self.drop(peer, "its connection closed")

    def reap(self) -> list[bytes]:
        """Drop tcp sessions unheard for --idle-timeout (ipc ones end with their connection)."""
        if not self.idle_timeout_s:
            return []
        now = time.monotonic()
        dead = [peer for peer, s in self.by_peer.items()
                if s.peer.uid is None and now - s.last_seen > self.idle_timeout_s]
        for peer in dead:
            self.drop(peer, f"idle for {now - self.by_peer[peer].last_seen:.0f} s")
        return dead

    def close_all(self) -> None:
        for peer in list(self.by_peer):
            self.drop(peer)
