"""`tsqp api`'s workers: N threads, each holding its own offload session (and the TrustedModel on it) across
requests, fed from one queue. Admission is bounded: N requests generate and at most Q wait; the next one is
refused at once (429). Generation runs on these threads, never on the event loop; each job's text goes back
through `emit` as `Text`, then one `Done` or `Failed`.

A session is opened when a worker first needs one (or with room for more positions than it has). Before
each job a kept session's server is asked whether it is still there (one round trip, --connect-timeout at
most), so a dead or restarted server costs that, not a call's whole --timeout. A session is closed when the
compute server fails it (the next request opens a fresh one) or after --session-idle seconds unused
(freeing the server's session slot).
"""
from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq

from ...config import ModelConfig
from ...stats import Stats
from ...trusted.generate import Sampling, generate
from ...trusted.protect.freivalds import VerificationError
from ...trusted.tokenizer import Tokenizer
from ...wire.client import RemoteError, RemoteOffload
from ...wire.pipes import PipeError
from ...wire.shm import ArenaError
from ...wire.transport import TransportError
from ..engine import Offloads, build_model
from .schema import APIError

MIN_SESSION_TOKENS = 512        # a session's first arena has room for this many positions at least


# ---- what a worker sends back --------------------------------------------------------------------------
@dataclass
class Text:
    text: str


@dataclass
class Done:
    finish_reason: str          # "stop" (end of turn, eos or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int      # generated tokens, the one that ended the turn included
    checked_rows: int = 0       # --verify: result rows Freivalds-checked for this generation (signed answers)


@dataclass
class Failed:
    error: APIError


@dataclass
class Job:
    ids: list[int]
    max_new: int
    sampling: Sampling
    stop_ids: list[int] | None              # None: the model's eos ids
    stops: list[str]
    emit: Callable[[object], None]          # thread-safe: hands an event to the request's coroutine
    cancelled: threading.Event = field(default_factory=threading.Event)   # the client went away
    sent: bool = False                      # some text went to the client already


class StopStrings:
    """Text in, text out, held back while it could be the start of a stop string; `hit` once one appears
    (the text from it on is dropped, as OpenAI does)."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        text = self.held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, self.held = True, ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


# ---- sessions ------------------------------------------------------------------------------------------
class Session:
    """One offload session and the TrustedModel on it, with room for `tokens` positions."""

    def __init__(self, offloads: Offloads, tokens: int, expect: ModelConfig | None):
        self.stats = Stats()
        self.offload, self.cfg, norms = offloads.open(self.stats, tokens)
        if expect is not None and self.cfg != expect:
            self.offload.close()
            raise RemoteError("the compute server now serves another model than at start-up; restart tsqp api")
        self.model = build_model(offloads.args, self.cfg, norms, self.offload, self.stats)
        self.tokens = tokens

    def alive(self, timeout_s: float) -> bool:
        """A remote session's server still answers, and is the same process (in-process ones always are)."""
        remote = getattr(self.offload, "inner", self.offload)
        return not isinstance(remote, RemoteOffload) or remote.server_alive(timeout_s)

    def close(self) -> None:
        self.offload.close()


def checked_rows(offload) -> int:
    """Rows --verify has checked on this session so far (0 without protection)."""
    return offload.report()["checked_rows"] if hasattr(offload, "report") else 0


def session_tokens(needed: int, context: int) -> int:
    """Room for a request's positions, rounded up to a power of two so a few sizes serve all requests."""
    n = MIN_SESSION_TOKENS
    while n < needed:
        n *= 2
    return min(n, max(context, needed))


def failure(e: BaseException, where: str) -> APIError:
    """A failed generation as the client sees it: 503 when the compute server cannot be reached or does not
    answer in time, 502 when it answered wrongly (a protocol violation, a failed verification)."""
    if isinstance(e, (TransportError, PipeError, ArenaError, zmq.ZMQError, OSError)):
        return APIError(503, f"the compute server at {where} is unavailable: {e}", "service_unavailable",
                        code="compute_unavailable")
    if isinstance(e, (RemoteError, VerificationError)):
        return APIError(502, f"the compute server at {where} failed: {e}", "bad_gateway", code="compute_failed")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


# ---- the pool ------------------------------------------------------------------------------------------
class Pool:
    def __init__(self, offloads: Offloads, tokenizer: Tokenizer, cfg: ModelConfig, workers: int, waiting: int,
                 idle_s: float, where: str, check_s: float, first: Session | None = None):
        """check_s: how long a kept session's server may take to answer the check before each job (the
        connect timeout); first: a session opened already (the start-up check), handed to the first worker."""
        if workers < 1 or waiting < 0:
            raise ValueError(f"--workers must be >= 1 and --queue >= 0, got {workers} and {waiting}")
        self.offloads, self.tokenizer, self.cfg, self.where = offloads, tokenizer, cfg, where
        self.capacity, self.idle_s, self.check_s = workers + waiting, idle_s, check_s
        self.jobs: queue.Queue = queue.Queue()        # bounded by admission below, not by the queue
        self.admitted, self.lock = 0, threading.Lock()
        self.closing = threading.Event()
        self.threads = [threading.Thread(target=self._work, args=(first if i == 0 else None,),
                                         name=f"tsqp-api-worker-{i}", daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it (429) when N are generating and Q wait already."""
        with self.lock:
            if self.closing.is_set():
                raise APIError(503, "tsqp api is shutting down", "service_unavailable")
            if self.admitted >= self.capacity:
                raise APIError(429, f"all {len(self.threads)} workers are busy and {self.capacity - len(self.threads)} "
                                    f"requests wait already; retry later", "rate_limit_exceeded",
                               code="queue_full")
            self.admitted += 1
        self.jobs.put(job)

    def stop(self) -> None:
        """Stop taking jobs; the running ones end at their next token with a 'shutting down' error."""
        self.closing.set()

    def close(self, timeout_s: float) -> None:
        """stop(), then let the workers close their sessions and end (each within a call's timeout)."""
        self.stop()
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # ---- a worker thread ---------------------------------------------------------------------------------
    def _work(self, session: Session | None) -> None:
        try:
            while True:
                try:
                    job = self.jobs.get(timeout=self.idle_s if session is not None else None)
                except queue.Empty:          # unused for --session-idle: free the server's slot
                    session = self._close(session)
                    continue
                if job is None:
                    break
                try:
                    if self.closing.is_set():
                        job.emit(Failed(APIError(503, "tsqp api is shutting down", "service_unavailable")))
                    elif not job.cancelled.is_set():
                        session = self._serve(session, job)
                finally:
                    with self.lock:
                        self.admitted -= 1
        finally:
            self._close(session)

    @staticmethod
    def _close(session: Session | None) -> None:
        if session is not None:
            session.close()
        return None

    def _serve(self, session: Session | None, job: Job) -> Session | None:
        """Run one job on this worker's session (opened or enlarged first); returns the session to keep.
        A reused session that the server dropped meanwhile (it restarted, say) gets one retry on a fresh
        session, as long as nothing has been sent to the client yet."""
        needed = len(job.ids) + job.max_new
        if session is not None and (session.tokens < needed or not session.alive(self.check_s)):
            session = self._close(session)
        for retry in (True, False):
            reused = session is not None
            try:
                if session is None:
                    session = Session(self.offloads, session_tokens(needed, self.cfg.max_position_embeddings),
                                      self.cfg)
                job.emit(self._generate(session, job))
                return session
            except Exception as e:          # every failure becomes the client's answer; the worker goes on
                session = self._close(session)      # its state is unknown: the next job opens a fresh one
                error = failure(e, self.where)
                if retry and reused and error.status == 503 and not job.sent:
                    continue
                if error.status == 500:
                    traceback.print_exc(file=sys.stderr)
                job.emit(Failed(error))
                return None
        return None                         # not reached: the second try returns or fails

    def _generate(self, session: Session, job: Job) -> Done | Failed:
        stream, stops = self.tokenizer.stream(), StopStrings(job.stops)
        checked_before = checked_rows(session.offload)

        def on_token(token: int, logits: torch.Tensor) -> bool:
            text = stops.feed(stream.step(token))
            if text:
                job.sent = True
                job.emit(Text(text))
            return stops.hit or job.cancelled.is_set() or self.closing.is_set()

        gen = generate(session.model, torch.tensor(job.ids, dtype=torch.long), job.max_new, job.sampling,
                       session.stats, stop_ids=job.stop_ids, on_token=on_token)
        if not stops.hit:
            rest = stops.feed(stream.flush())
            rest += "" if stops.hit else stops.flush()
            if rest:
                job.emit(Text(rest))
        if gen.stop == "caller" and not stops.hit and self.closing.is_set():
            return Failed(APIError(503, "tsqp api is shutting down: the generation was cut", "service_unavailable"))
        finish = "length" if gen.stop == "max_new_tokens" and not stops.hit else "stop"
        return Done(finish, len(job.ids), len(gen.ids), checked_rows(session.offload) - checked_before)
