"""The compute server (untrusted side): holds the weights on its device and answers offload requests.

One ROUTER socket, one thread, requests served in order. Each connected runner has a session (its
shared-memory arena, if any). A bad request gets an error reply naming the op; the server keeps serving.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import zmq

from . import protocol as P
from .compute import Compute
from .keys import ServerCurve, check_bind
from .doorbell import Channel, DoorbellError, open_pipe, pipe_paths
from .shm import NAME as ARENA_NAME
from .shm import Arena, ArenaError, arena_dir, pid_alive
from .transport import (MAX_MSG_BYTES, Client, ServerTimeout, TransportError, bind_server, ipc_path,
                        transport_of)

POLL_MS = 100
REAP_EVERY_S = 1.0
BELL_SEND_S = 1.0   # a runner that leaves its reply pipe full this long loses its session


@dataclass
class Session:
    arena: Arena | None
    last_seen: float
    pid: int | None = None      # the runner's pid, for sessions on this host (ipc): dropped when it dies
    bell: Channel | None = None    # the doorbell pipes, when the runner asked for them
    views: dict = field(default_factory=dict)   # call_key -> (inputs, out, encoded reply tail): checked once
    repeats: dict = field(default_factory=dict)  # a doorbell call's bytes up to its id -> (op, layer, views entry)


VIEW_CACHE = 1024   # checked calls remembered per session (a prefill reuses a few dozen region layouts)


def call_key(header: dict) -> tuple | None:
    """What a shm call's checks depend on, as a hashable key; None unless every field has its exact type."""
    ins, out, op, layer = header.get("inputs"), header.get("output"), header.get("op"), header.get("layer")
    if type(ins) is not list or type(out) is not dict or type(op) is not str or type(out.get("offset")) is not int:
        return None
    if layer is not None and type(layer) is not int:
        return None
    parts = []
    for m in ins:
        if type(m) is not dict:
            return None
        dtype, shape, offset = m.get("dtype"), m.get("shape"), m.get("offset")
        if type(dtype) is not str or type(shape) is not list or type(offset) is not int or len(m) != 3:
            return None
        if not all(type(n) is int for n in shape):
            return None
        parts.append((dtype, tuple(shape), offset))
    return op, layer, tuple(parts), out["offset"]


class Server:
    def __init__(self, compute: Compute, norms: dict[str, torch.Tensor], endpoint: str, model: str,
                 max_sessions: int = 8, idle_timeout_s: float = 600.0, max_msg_bytes: int = MAX_MSG_BYTES,
                 curve: ServerCurve | None = None, insecure: bool = False, public: bool = False,
                 spin_s: float = 0.0):
        """idle_timeout_s: a session without a known pid (tcp) is dropped after this long unheard (0: never).
        curve / insecure / public: the tcp:// policy (keys.check_bind)."""
        self.compute, self.norms, self.endpoint, self.model = compute, norms, endpoint, model
        self.cfg, self.wire = compute.cfg, P.DTYPE_NAME[compute.dtype]
        self.max_sessions, self.idle_timeout_s, self.max_msg_bytes = max_sessions, idle_timeout_s, max_msg_bytes
        self.curve, self.insecure, self.public = curve, insecure, public
        self.spin_s = spin_s      # after a doorbell call, poll this long for the next before sleeping
        self.sessions: dict[bytes, Session] = {}
        self.stopping = False
        self.requests = 0
        self.poller = zmq.Poller()            # the socket, and each session's doorbell pipe
        self.bell_peers: dict[int, bytes] = {}   # doorbell pipe fd -> its session

    # ---- message handling: frames in, frames out, never raises on bad input --------------------------
    def handle(self, peer: bytes, frames: list, decoded: dict | None = None) -> list:
        """decoded: frames[0] already decoded by the caller (the control pipes)."""
        header = {}
        try:
            if not frames:
                raise P.ProtocolError("empty message")
            header = decoded if decoded is not None else P.decode(frames[0])
            kind = header["type"]
            if kind == "call":
                return self.call(peer, header, frames[1:])
            if kind == "hello":
                return self.hello(peer, header)
            if kind == "attach":
                return self.attach(peer, header)
            if kind == "bye":
                self.drop(peer)
                return [P.encode({"type": "bye"})]
            if kind == "info":
                return [P.encode({"type": "info", **self.info()})]
            if kind == "echo":
                return self.echo(peer, header, frames[1:])
            raise P.ProtocolError(f"unknown message type {kind!r}")
        except (P.ProtocolError, ArenaError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            op = header.get("op") if isinstance(header, dict) else None
            where = f"op {op}" if isinstance(op, str) else f"message {header.get('type', '?')!r}"
            return [P.encode({"type": "error", "id": header.get("id"), "op": op,
                              "error": f"{where}: {type(e).__name__}: {e}"})]

    def info(self) -> dict:
        return {"model": self.model, "dtype": self.wire, "device": str(self.compute.device),
                "config": self.cfg.to_dict(), "sessions": len(self.sessions), "requests": self.requests,
                "pid": os.getpid()}

    def hello(self, peer: bytes, header: dict) -> list:
        """Open a session; the runner gets the config, the norm weights and the rope parameters (config)."""
        self.drop(peer)
        if len(self.sessions) >= self.max_sessions:
            self.reap()
        if len(self.sessions) >= self.max_sessions:
            raise P.ProtocolError(f"server is at its session limit ({self.max_sessions} sessions, --max-sessions); "
                                  f"try again later")
        pid = header.get("pid")
        local = transport_of(self.endpoint) == "ipc"     # a pid means something only on this host
        pid = pid if local and isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**22 else None
        self.sessions[peer] = Session(None, time.monotonic(), pid)
        names = sorted(self.norms)
        metas = [P.TensorMeta.of(self.norms[n]).to_json() for n in names]
        head = {"type": "welcome", **self.info(), "norms": names, "tensors": metas}
        return [P.encode(head)] + [P.tensor_bytes(self.norms[n]) for n in names]

    def attach(self, peer: bytes, header: dict) -> list:
        """Map the session's shared-memory arena (replacing an earlier one)."""
        session = self.sessions.get(peer)
        if session is None:
            raise P.ProtocolError("no session: send hello first")
        spec = header.get("arena")
        if not isinstance(spec, dict) or not isinstance(spec.get("size"), int) or spec["size"] <= 0:
            raise P.ProtocolError("attach: 'arena' must be {name, size}")
        bell = self.open_bell(spec.get("name")) if header.get("doorbell") else None
        try:
            arena = Arena.attach(spec.get("name"), spec["size"])
            if self.compute.cuda:
                arena.register_cuda()
        except BaseException:
            if bell is not None:
                bell.close()
            raise
        self.close_session_files(session)
        session.arena, session.bell = arena, bell
        if bell is not None:
            self.poller.register(bell.in_fd, zmq.POLLIN)
            self.bell_peers[bell.in_fd] = peer
        session.pid = int(ARENA_NAME.match(spec["name"]).group(1))    # its creator: shm is same-host
        return [P.encode({"type": "attached", "size": arena.size})]

    @staticmethod
    def open_bell(name) -> Channel:
        """Open the runner's doorbell pipes (named after its arena) and unlink them."""
        if not isinstance(name, str) or not ARENA_NAME.match(name):
            raise P.ProtocolError(f"bad arena name {name!r}")
        req, rep = pipe_paths(arena_dir() / name)
        fds = []
        try:
            for p in (req, rep):
                try:
                    fds.append(open_pipe(p))
                except OSError as e:
                    raise ArenaError(f"cannot open the doorbell pipe {p}: {e.strerror}") from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        finally:
            req.unlink(missing_ok=True)
            rep.unlink(missing_ok=True)
        return Channel(fds[0], fds[1])

    def close_session_files(self, session: Session) -> None:
        session.views.clear()
        session.repeats.clear()
        if session.bell is not None:
            self.poller.unregister(session.bell.in_fd)
            self.bell_peers.pop(session.bell.in_fd, None)
            session.bell.close()
            session.bell = None
        if session.arena is not None:
            session.arena.close()
            session.arena = None

    def ring_bell(self, peer: bytes) -> None:
        """Serve the calls that arrived on a session's doorbell pipe, in order; replies go back the same way."""
        session = self.sessions.get(peer)
        if session is None or session.bell is None:
            return
        try:
            messages = session.bell.receive()
        except DoorbellError as e:        # framing lost: say why on the reply pipe, then end the session
            print(f"dropped a session: {e}", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError, OSError):
                session.bell.send(P.encode({"type": "error", "id": None, "error": f"doorbell: {e}; session "
                                                                                  f"dropped"}), 0.1)
            self.drop(peer)
            return
        for payload in messages:
            head = None
            try:
                reply = self.repeat_call(session, payload)
                if reply is None:
                    head = P.decode(payload)
                    if head.get("type") != "call":
                        raise P.ProtocolError(f"the doorbell carries calls only, not {head.get('type')!r}")
                    reply = self.handle(peer, [payload], head)[0]
                    self.remember_call(session, payload, head)
            except P.ProtocolError as e:
                rid = head.get("id") if isinstance(head, dict) and isinstance(head.get("id"), int) else None
                reply = P.encode({"type": "error", "id": rid, "op": None, "error": f"doorbell: {e}"})
            except Exception as e:     # a bug, not bad input: log, answer, go on
                traceback.print_exc()
                reply = P.encode({"type": "error", "id": None, "error": f"internal server error: {e}"})
            try:
                session.bell.send(reply, BELL_SEND_S)
            except (TimeoutError, OSError) as e:
                print(f"dropped a session: its doorbell reply pipe: {e}", file=sys.stderr, flush=True)
                self.drop(peer)
                return

    @staticmethod
    def remember_call(session: Session, payload: bytes, head: dict) -> None:
        """After a doorbell call was checked and served: the same bytes (but for the id at their end) are the
        same call, so the next one can skip decoding."""
        cut = payload.rfind(b',"id":')
        key = call_key(head)
        hit = session.views.get(key) if key is not None else None
        if hit is not None and cut > 0:
            if len(session.repeats) >= VIEW_CACHE:
                session.repeats.clear()
            session.repeats[payload[:cut]] = (head["op"], head.get("layer"), hit)

    def repeat_call(self, session: Session, payload: bytes) -> bytes | None:
        """Serve a call whose bytes up to its id match an earlier, checked one; None for anything else."""
        cut = payload.rfind(b',"id":')
        hit = session.repeats.get(payload[:cut]) if cut > 0 else None
        rid = payload[cut + 6:-1]
        if hit is None or payload[-1:] != b"}" or not rid.isdigit() or len(rid) > 15 or rid[:1] == b"0":
            return None
        op, layer, checked = hit
        session.last_seen = time.monotonic()
        return self.serve_checked(op, layer, checked, rid)

    def serve_checked(self, op: str, layer: int | None, checked: tuple, rid: bytes) -> bytes:
        """Run a call on the views an earlier, identical call was checked with; the reply is pre-encoded but
        for its id (given as JSON) and compute_s."""
        inputs, out, reply_tail = checked
        y, compute_s = self.compute.run(op, layer, inputs, out)
        self.requests += 1
        return P.result_head(rid, compute_s) + reply_tail

    def drop(self, peer: bytes) -> None:
        s = self.sessions.pop(peer, None)
        if s is not None:
            self.close_session_files(s)

    def reap(self) -> list[bytes]:
        """Drop the sessions of runners that died (pid gone) or went silent (no pid, idle too long)."""
        now = time.monotonic()
        dead = [peer for peer, s in self.sessions.items()
                if (s.pid is not None and not pid_alive(s.pid))
                or (s.pid is None and self.idle_timeout_s and now - s.last_seen > self.idle_timeout_s)]
        for peer in dead:
            s = self.sessions[peer]
            why = f"runner pid {s.pid} is gone" if s.pid is not None else f"idle for {now - s.last_seen:.0f} s"
            print(f"dropped a session: {why}", file=sys.stderr, flush=True)
            self.drop(peer)
        return dead

    def call(self, peer: bytes, header: dict, frames: list) -> list:
        session = self.sessions.get(peer)
        if session is None:
            raise P.ProtocolError("no session: send hello first")
        session.last_seen = time.monotonic()
        key = call_key(header) if session.arena is not None and not frames else None
        hit = session.views.get(key) if key is not None else None
        if hit is not None:     # the same op on the same arena regions as an earlier, checked call
            rid = header.get("id")
            rid = b"%d" % rid if type(rid) is int else json.dumps(rid).encode()     # echoed as the checks do
            return [self.serve_checked(key[0], key[1], hit, rid)]
        metas = header.get("inputs")
        if not isinstance(metas, list):
            raise P.ProtocolError("'inputs' must be a list")
        metas = [P.TensorMeta.from_json(m) for m in metas]
        out_meta = P.check_request(self.cfg, self.wire, header.get("op"), header.get("layer"), metas)
        arena = session.arena
        if arena is not None:
            if frames:
                raise P.ProtocolError("shared-memory session sent tensor frames")
            inputs = [arena.view(m) for m in metas]
            out_spec = header.get("output")
            if not isinstance(out_spec, dict):
                raise P.ProtocolError("'output' must be {offset}")
            out_meta = P.TensorMeta(out_meta.dtype, out_meta.shape, out_spec.get("offset"))
            out = arena.view(P.TensorMeta.from_json(out_meta.to_json()))
            if self._overlaps(out, inputs):
                raise P.ProtocolError("output region overlaps an input region")
        else:
            if len(frames) != len(metas):
                raise P.ProtocolError(f"{len(metas)} tensor metas but {len(frames)} frames")
            inputs = [P.tensor_from_frame(m, f) for m, f in zip(metas, frames)]
            out = None
        if header["op"] == "embed" and inputs[0].numel():
            lo, hi = int(inputs[0].min()), int(inputs[0].max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise P.ProtocolError(f"token id {lo if lo < 0 else hi} outside the vocabulary 0..{self.cfg.vocab_size - 1}")
        y, compute_s = self.compute.run(header["op"], header.get("layer"), inputs, out)
        self.requests += 1
        reply = {"type": "result", "id": header.get("id"), "compute_s": compute_s,
                 "output": P.TensorMeta.of(y, out_meta.offset if arena is not None else None).to_json()}
        if key is not None and header["op"] != "embed":      # token ids are checked on every call
            if len(session.views) >= VIEW_CACHE:
                session.views.clear()
            tail = b'"output":%s}' % json.dumps(reply["output"], separators=(",", ":")).encode()
            session.views[key] = (inputs, out, tail)      # the reply after compute_s, pre-encoded
        return [P.encode(reply)] + ([] if arena is not None else [P.tensor_bytes(y)])

    @staticmethod
    def _overlaps(out: torch.Tensor, inputs: list[torch.Tensor]) -> bool:
        o0 = out.data_ptr()
        o1 = o0 + out.numel() * out.element_size()
        return any(x.data_ptr() < o1 and o0 < x.data_ptr() + x.numel() * x.element_size() for x in inputs)

    def echo(self, peer: bytes, header: dict, frames: list) -> list:
        """For `tsqp diagnose`: frames come back as they are; in a shm session, `nbytes` are copied from
        offset `src` to `dst` in the arena (the server consumes and produces that much; nbytes a multiple of 4)."""
        session = self.sessions.get(peer)
        if header.get("shm"):
            if session is None or session.arena is None:
                raise P.ProtocolError("echo over shm needs a shared-memory session")
            session.last_seen = time.monotonic()
            n = header.get("nbytes")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n % 4:
                raise P.ProtocolError(f"echo: bad nbytes {n!r}")
            src = session.arena.view(P.TensorMeta("float32", (n // 4,), header.get("src")))
            dst = session.arena.view(P.TensorMeta("float32", (n // 4,), header.get("dst")))
            if self._overlaps(dst, [src]):
                raise P.ProtocolError("echo: src and dst regions overlap")
            dst.copy_(src)      # with the server's threads, as its ops read and write the arena
            return [P.encode({"type": "echo"})]
        return [P.encode({"type": "echo"})] + list(frames)

    # ---- the loop ------------------------------------------------------------------------------------
    def serve_forever(self, on_ready=None) -> None:
        ctx = zmq.Context.instance()
        for warning in check_bind(self.endpoint, self.curve, self.insecure, self.public):
            print(warning, file=sys.stderr, flush=True)
        claim_endpoint(self.endpoint, ctx)
        auth = self.curve.start_authenticator(ctx) if self.curve is not None else None
        try:
            sock = bind_server(self.endpoint, ctx, self.max_msg_bytes, self.curve)
        except BaseException:
            if auth is not None:
                auth.stop()
            raise
        self._install_signals()
        if on_ready:
            on_ready()
        self.poller.register(sock, zmq.POLLIN)
        next_reap = time.monotonic() + REAP_EVERY_S
        spin_until = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_reap:     # also while busy: one runner must not shield dead ones
                    self.reap()
                    next_reap = now + REAP_EVERY_S
                ready = dict(self.poller.poll(0 if now < spin_until else POLL_MS))
                for fd in [fd for fd in ready if fd in self.bell_peers]:
                    if fd in self.bell_peers:         # not dropped while serving another pipe
                        self.ring_bell(self.bell_peers[fd])
                        spin_until = time.monotonic() + self.spin_s
                if sock not in ready:
                    continue
                frames = sock.recv_multipart(copy=False)
                peer, body = frames[0].bytes, frames[1:]
                try:
                    reply = self.handle(peer, body)
                except Exception as e:     # a bug, not bad input (handle answers that): log, answer, go on
                    traceback.print_exc()
                    reply = [P.encode({"type": "error", "error": f"internal server error: {type(e).__name__}: {e}"})]
                sock.send_multipart([peer] + reply, copy=False)
        finally:
            for peer in list(self.sessions):
                self.drop(peer)
            sock.close(linger=0)
            if auth is not None:
                auth.stop()
            path = ipc_path(self.endpoint)
            if path is not None:
                path.unlink(missing_ok=True)

    def _install_signals(self) -> None:
        def stop(signum, frame):
            self.stopping = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)


def claim_endpoint(endpoint: str, ctx: zmq.Context) -> None:
    """Refuse an ipc socket file that another user owns or a live server answers on; remove a stale one."""
    path = ipc_path(endpoint)
    if path is None or not path.exists():
        return
    st = path.lstat()
    if st.st_uid != os.getuid():
        raise TransportError(f"{path} belongs to uid {st.st_uid}; refusing to bind over another user's socket")
    probe = Client(endpoint, timeout_s=1.0, ctx=ctx)
    try:
        probe.send([P.encode({"type": "info"})])
        probe.recv("info")
    except ServerTimeout:
        path.unlink(missing_ok=True)     # stale: nobody answers
        return
    finally:
        probe.close()
    raise TransportError(f"a live server already answers on {endpoint}; refusing to take it over")


def describe_endpoint(endpoint: str) -> str:
    return {"ipc": "IPC (unix domain socket)", "tcp": "TCP"}[transport_of(endpoint)]
