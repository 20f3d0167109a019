"""`tsqp api`: an OpenAI-compatible HTTP API in the trusted runner's process, on Starlette and uvicorn.

  GET  /v1/models                 the one model served (its context length as max_model_len)
  POST /v1/chat/completions       messages -> the model's chat template -> ids; stops at the end of turn
  POST /v1/completions            a prompt string or token ids; stops at the model's eos
  GET  /health                    each compute server's engine: state, steps, verification failures
  both: max_tokens, temperature, top_p, top_k, seed, stop, n=1, stream (server-sent events ending in [DONE]),
        stream_options.include_usage, response_format text; usage counts in tokens; any other field that would
        change the answer is refused by name (schema.py)

The event loop only parses, tokenizes and writes; generation runs on the engines' threads (pool.py), one
continuous-batching engine per compute server. Errors are OpenAI's JSON bodies with the HTTP status:
400 bad request, 401 key, 404 model or route, 413 body, 429 queue full, 502/503 compute server.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import socket
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ...config import ModelConfig
from ...trusted.chat import ChatTemplate
from ...trusted.generate import Sampling
from ...trusted.tokenizer import Tokenizer
from . import schema
from .prompting import Prompting
from .attestation import AttestationRoutes, signer_for
from .limits import Admission, Limits
from .pool import Done, Failed, Job, Pool, Text
from .schema import APIError

DISCONNECT_POLL_S = 1.0         # how often a waiting non-streamed request checks that its client is still there


CLOSING = {408, 413, 503}      # a body refused unread or late: the connection closes rather than read the rest


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers={"Connection": "close"} if e.status in CLOSING else None)


def sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Api:
    """The routes' state: the model served, its tokenizer and chat template, the worker pool."""

    def __init__(self, model_id: str, cfg: ModelConfig, tokenizer: Tokenizer, template: ChatTemplate | None,
                 template_error: str | None, pool: Pool, default_max_tokens: int, api_key: str | None,
                 limits: Limits = Limits(), attestor=None):   # attestor: --attest's; serves /v1/attestation and signs each answer
        self.model_id, self.cfg, self.tokenizer, self.template = model_id, cfg, tokenizer, template
        self.attestor, self.pool, self.api_key = attestor, pool, api_key
        self.limits, self.admission = limits, Admission(limits)
        self.prompting = Prompting(cfg, tokenizer, template, template_error, default_max_tokens)
        self.created = int(time.time())

    def app(self) -> Starlette:
        async def not_found(request, exc: HTTPException):
            what = "route" if exc.status_code == 404 else "method"
            return error_response(APIError(exc.status_code, f"no {what} {request.method} {request.url.path}",
                                           code=f"{what}_not_found" if what == "route" else None))

        async def internal(request, exc: Exception):       # a bug: still an OpenAI body (uvicorn logs the trace)
            return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error"))

        routes = [Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.text, methods=["POST"]),
                  Route("/health", self.health, methods=["GET"])]
        if self.attestor is not None:
            routes += AttestationRoutes(self.attestor).routes()
        return Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: internal})

    # ---- routes ------------------------------------------------------------------------------------------
    def card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "tsqp",
                "max_model_len": self.cfg.max_position_embeddings}

    async def models(self, request: HTTPRequest) -> Response:
        try:
            self.check_key(request)
        except APIError as e:
            return error_response(e)
        return JSONResponse({"object": "list", "data": [self.card()]})

    async def model(self, request: HTTPRequest) -> Response:
        try:
            self.check_key(request)
            self.check_model(request.path_params["model"])
        except APIError as e:
            return error_response(e)
        return JSONResponse(self.card())

    async def health(self, request: HTTPRequest) -> Response:
        """200 while every compute server serves, 503 otherwise (one shut out for altering a result, one
        unreachable): the body says which and counts the verification failures."""
        try:
            self.check_key(request)
        except APIError as e:
            return error_response(e)
        report = self.pool.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    async def chat(self, request: HTTPRequest) -> Response:
        return await self.complete(request, "chat")

    async def text(self, request: HTTPRequest) -> Response:
        return await self.complete(request, "text")

    # ---- one completion ------------------------------------------------------------------------------------
    async def complete(self, request: HTTPRequest, kind: str) -> Response:
        try:
            self.check_key(request)
            async with self.admission.body(request) as raw:     # bounded before a byte of the body is read
                body, req = raw, schema.parse(raw, kind)     # body: the request as signed answers hash it
                self.check_model(req.model)
                async with self.admission.tokenizer_slot():
                    ids, stop_ids = await run_in_threadpool(self.prompting.prompt_ids, req)
            job, events = self.start(req, ids, stop_ids)
        except APIError as e:
            return error_response(e)
        signer = signer_for(self.attestor, body)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if req.stream:
            first = await next_event(events, job)
            if isinstance(first, Failed):       # nothing sent yet: the status can still say what happened
                return error_response(first.error)
            return StreamingResponse(self.stream(req, rid, created, job, events, first, signer),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self.collect(request, req, rid, created, job, events, signer)

    def check_key(self, request: HTTPRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")

    def start(self, req: schema.Request, ids: list[int], stop_ids: list[int] | None) -> tuple[Job, asyncio.Queue]:
        """Queue the generation; its events arrive on the returned queue."""
        max_new = self.prompting.max_new_tokens(req, len(ids))
        greedy = req.temperature == 0
        # greedy takes the argmax, which top-k and top-p keep: they change nothing there
        sampling = Sampling.make(req.temperature, None if greedy else req.top_k, None if greedy else req.top_p,
                                 req.seed)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:        # the event loop has closed (shutting down): nobody is listening
                job.cancelled.set()

        job = Job(ids, max_new, sampling, stop_ids, req.stop, emit)
        self.pool.submit(job)
        return job, events

    async def collect(self, request: HTTPRequest, req: schema.Request, rid: str, created: int, job: Job,
                      events: asyncio.Queue, signer) -> Response:
        """A request without stream: wait for the whole text, watching that the client stays."""
        parts = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return Response(status_code=499)    # nobody reads it; frees the worker
                    continue
                if isinstance(event, Text):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    return error_response(event.error)
                else:
                    counts = schema.usage(event.prompt_tokens, event.completion_tokens)
                    body = schema.completion(req, rid, created, self.model_id, "".join(parts), event.finish_reason,
                                             counts)
                    return JSONResponse(signer.completion(body, event.checked_rows))
        finally:
            job.cancelled.set()         # a no-op once done; ends the generation if this coroutine was cancelled

    async def stream(self, req: schema.Request, rid: str, created: int, job: Job, events: asyncio.Queue, event,
                     signer):
        """Server-sent events: a chunk per piece of text, a last chunk with the finish reason (signed, with
        --attest), the usage when asked for, then [DONE]. A client that goes away ends the generation after
        the current token."""
        try:
            if req.kind == "chat":
                yield sse(signer.chunk(schema.chunk(req, rid, created, self.model_id, first=True)))
            while True:
                if isinstance(event, Text):
                    yield sse(signer.chunk(schema.chunk(req, rid, created, self.model_id, text=event.text)))
                elif isinstance(event, Failed):      # after the headers: the error goes in the stream
                    yield sse(event.error.body())
                    break
                elif isinstance(event, Done):
                    last = schema.chunk(req, rid, created, self.model_id, finish=event.finish_reason,
                                        text="" if req.kind == "text" else None)
                    yield sse(signer.chunk(last, event.checked_rows))
                    if req.include_usage:
                        counts = schema.usage(event.prompt_tokens, event.completion_tokens)
                        yield sse(schema.chunk(req, rid, created, self.model_id, counts=counts))
                    break
                event = await next_event(events, job)
            yield sse("[DONE]")
        finally:
            job.cancelled.set()


async def next_event(events: asyncio.Queue, job: Job):
    try:
        return await events.get()
    except asyncio.CancelledError:
        job.cancelled.set()
        raise


def model_id_of(spec: str) -> str:
    """The id clients name: a GGUF file's name without .gguf, a model directory's name, or a preset."""
    if spec.startswith("random:"):
        return spec
    p = Path(spec)
    return p.stem if p.suffix.lower() == ".gguf" else p.name


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving, so that a port in use is one clear error and port 0 can be reported."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(1024)             # a burst of connections waits in the kernel, not refused (limits.py caps them)
    sock.set_inheritable(True)
    return sock
