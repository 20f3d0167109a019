"""`tsqp api`'s generation: one continuous-batching engine (tsqp/trusted/engine) per compute server, each on
its own thread with one offload session, sized once from the engine's budget (--max-batch,
--max-step-tokens, --kv-budget-mb), never from a request. A request goes to the least loaded engine;
admission is bounded: --max-batch per engine generate, --queue more wait, the next one is refused at once
(429); one that could never fit the KV budget is refused at once (400). Generation never runs on the event
loop; each job's text goes back through `emit` as `Text`, then one `Done` or `Failed`.

A session is opened when an engine first has work (and after its server failed one); before an idle
engine starts on new work its server is asked whether it is still there (one round trip, --connect-timeout
at most). A failed step fails every request on that engine with the same error; a failed verification also
shuts that server out (loop.py) unless --reconnect-after-verification-failure.
"""
from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

import zmq

from ...config import ModelConfig
from ...ops import TABLE
from ...stats import Stats
from ...trusted.engine.kv import BLOCK_TOKENS, KVBudgetError, kv_bytes_per_token
from ...trusted.engine.loop import EngineLoop, ServerShutOut, ShuttingDown
from ...trusted.engine.sequence import Request
from ...trusted.engine.step import Engine
from ...trusted.generate import Sampling
from ...trusted.protect.freivalds import VerificationError
from ...trusted.tokenizer import Tokenizer
from ...wire.client import RemoteError, RemoteOffload
from ...wire.pipes import PipeError
from ...wire.shm import ArenaError
from ...wire.transport import TransportError
from ..engine import Offloads, build_model
from .schema import APIError

RETRY_S = 10.0                  # an unreachable compute server gets new requests again this long after it failed


# ---- what an engine sends back -------------------------------------------------------------------------
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


# ---- sessions ----------------------------------------------------------------------------------------
class Session:
    """One offload session and the TrustedModel on it, with room for `tokens` rows per request."""

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


def session_tokens(cfg: ModelConfig, max_batch: int, max_step_tokens: int) -> int:
    """The most rows one request of a step carries: max_step_tokens, and the logits of max_batch rows (the
    session's arena and frame cap follow from it, whatever the requests)."""
    widest = max(cfg.qkv_size, 2 * cfg.intermediate_size, cfg.hidden_size)
    return max(max_step_tokens, -(-max_batch * cfg.vocab_size // widest))


def checked_rows(cfg: ModelConfig, positions: int, logit_rows: int) -> int:
    """Rows --verify checked for one request: each position it fed went through every per-layer matmul of
    every layer, and each of its rows whose logits were read through the LM head (signed answers state it)."""
    per_layer = sum(op.per_layer for op in TABLE if op.kind == "matmul")
    return positions * per_layer * cfg.num_layers + logit_rows


def failure(e: BaseException, where: str) -> APIError:
    """A failed generation as the client sees it: 503 when the compute server cannot be reached or does not
    answer in time (or tsqp api is stopping), 502 when it answered wrongly (a protocol violation, a failed
    verification: the server was caught altering a result)."""
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), "service_unavailable")
    if isinstance(e, KVBudgetError):
        return APIError(400, str(e), param="max_tokens", code="context_length_exceeded")
    if isinstance(e, (TransportError, PipeError, ArenaError, zmq.ZMQError, OSError)):
        return APIError(503, f"the compute server at {where} is unavailable: {e}", "service_unavailable",
                        code="compute_unavailable")
    if isinstance(e, ServerShutOut):
        return APIError(502, str(e), "bad_gateway", code="server_caught_altering")
    if isinstance(e, VerificationError):
        return APIError(502, f"the compute server at {where} was caught altering a result: {e}", "bad_gateway",
                        code="server_caught_altering")
    if isinstance(e, (RemoteError, ValueError)):    # ValueError from a step: non-finite logits, a bad reply
        return APIError(502, f"the compute server at {where} failed: {e}", "bad_gateway", code="compute_failed")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", "internal_error")


# ---- the pool of engines -------------------------------------------------------------------------------
@dataclass
class Limits:
    max_batch: int
    max_step_tokens: int
    kv_budget_bytes: int
    waiting: int                 # --queue: requests beyond every engine's max_batch that may wait
    idle_s: float
    check_s: float               # how long a kept session's server may take to answer the check
    reconnect_after_verification_failure: bool = False


class Pool:
    def __init__(self, offloads: list[Offloads], wheres: list[str], tokenizer: Tokenizer, cfg: ModelConfig,
                 limits: Limits, first: Session):
        """offloads, wheres: one per compute server; first: a session on the first one, opened already (the
        start-up check), handed to its engine."""
        if limits.max_batch < 1 or limits.waiting < 0:
            raise ValueError(f"--max-batch must be >= 1 and --queue >= 0, got {limits.max_batch} and {limits.waiting}")
        self.tokenizer, self.cfg, self.limits = tokenizer, cfg, limits
        self.verified = bool(getattr(offloads[0].args, "verify", False))     # every result row checked
        self.capacity = len(offloads) * limits.max_batch + limits.waiting
        itemsize = first.model.attention.dtype.itemsize
        block = BLOCK_TOKENS * kv_bytes_per_token(cfg, itemsize)
        self.kv_tokens = limits.kv_budget_bytes // block * BLOCK_TOKENS     # the most one request may hold
        tokens = first.tokens                                               # every session the same size

        def make_engine(session: Session) -> Engine:
            return Engine(session.model, limits.kv_budget_bytes, limits.max_batch, limits.max_step_tokens)
        self.engine_chunk = make_engine(first).scheduler.chunk            # flags checked before serving
        self.loops = [EngineLoop(lambda o=o: Session(o, tokens, cfg), make_engine, where, limits.idle_s,
                                 limits.check_s, limits.reconnect_after_verification_failure,
                                 session=first if i == 0 else None)
                      for i, (o, where) in enumerate(zip(offloads, wheres))]
        self.lock = threading.Lock()
        self.closing = threading.Event()

    def submit(self, job: "Job") -> None:
        """Hand a job to the least loaded engine, or refuse it: 429 when every engine is full and --queue wait
        already, 400 when it could never fit the KV budget."""
        reserve = len(job.ids) + job.max_new
        if reserve > self.kv_tokens:
            raise APIError(400, f"the prompt ({len(job.ids)} tokens) and max_tokens ({job.max_new}) need {reserve} "
                                f"positions of KV cache; --kv-budget-mb holds {self.kv_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        with self.lock:
            if self.closing.is_set():
                raise APIError(503, "tsqp api is shutting down", "service_unavailable")
            if sum(loop.active for loop in self.loops) >= self.capacity:
                raise APIError(429, f"{len(self.loops) * self.limits.max_batch} requests are generating and "
                                    f"{self.limits.waiting} wait already; retry later", "rate_limit_exceeded",
                               code="queue_full")
            loop = min(self._usable(), key=lambda lp: lp.active)
            loop.submit(self._request(job, loop.where))

    def _usable(self) -> list[EngineLoop]:
        """The engines a request may go to: not shut out, and not failing (an unreachable server is tried again
        RETRY_S after it failed, or when every other one fails too)."""
        now = time.monotonic()
        trusted = [lp for lp in self.loops if lp.shut_out is None] or self.loops
        return [lp for lp in trusted if lp.health.state != "unavailable" or now - lp.failed_at > RETRY_S] or trusted

    def _request(self, job: "Job", where: str) -> Request:
        stream, stops = self.tokenizer.stream(), StopStrings(job.stops)
        count = [0]

        def on_token(token: int, logits) -> bool:
            count[0] += 1
            text = stops.feed(stream.step(token))
            if text:
                job.sent = True
                job.emit(Text(text))
            return stops.hit

        def on_end(reason: str, error: BaseException | None) -> None:
            if error is not None:
                e = failure(error, where)
                if e.status == 500:
                    traceback.print_exception(error, file=sys.stderr)
                job.emit(Failed(e))
                return
            if reason == "cancelled":
                return
            if not stops.hit:
                rest = stops.feed(stream.flush())
                rest += "" if stops.hit else stops.flush()
                if rest:
                    job.emit(Text(rest))
            checked = checked_rows(self.cfg, len(job.ids) + count[0] - 1, count[0]) if self.verified else 0
            job.emit(Done("length" if reason == "length" else "stop", len(job.ids), count[0], checked))
        stop_ids = frozenset(job.stop_ids if job.stop_ids is not None else self.cfg.eos_token_id)
        return Request(job.ids, job.max_new, job.sampling, stop_ids, on_token, on_end, job.cancelled)

    def health(self) -> dict:
        servers = [{**asdict(loop.health), "active": loop.active} for loop in self.loops]
        failures = sum(s["verification_failures"] for s in servers)
        status = "ok" if all(s["state"] in ("idle", "serving") for s in servers) else \
            "degraded" if any(s["state"] in ("idle", "serving") for s in servers) else "failing"
        return {"status": status, "verification_failures": failures, "servers": servers}

    def stop(self) -> None:
        """Stop taking jobs; the running ones end at their next step with a 'shutting down' error."""
        self.closing.set()
        for loop in self.loops:
            loop.stop()

    def close(self, timeout_s: float) -> None:
        self.stop()
        for loop in self.loops:
            loop.close(timeout_s)
