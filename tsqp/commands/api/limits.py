"""What a client of `tsqp api` may hold before it is admitted, so that memory and CPU stay bounded under any
number of clients (issue 29):

  connections   at most `connections` open; one more gets a 503 and is closed at accept, before it is read
  headers       sent within `header_s` (per request: a slowloris trickle is closed), at most 16 KiB (h11)
  bodies        sent within `body_s`; any connection may hold `small_body` bytes (uvicorn itself buffers up to
                64 KiB before it pauses reading); a body beyond that needs one of `large_bodies` slots, taken
                before its bytes are read (503 when none is free), held until it is tokenized
  tokenizing    `tokenizing` prompts at once, waited for at most `admit_s` (then 503); a prompt the length check
                (`Prompts`) proves too long for the context is refused untokenized

`budget_bytes` adds these up: the memory beyond the process at rest that the most hostile mix of clients can
make it hold before the 429 of a full queue (figures measured: tests/test_api_hostile.py, docs/security.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

from ...trusted.tokenizer import Tokenizer
from .schema import APIError

KiB, MiB = 2**10, 2**20
HEADER_BYTES = 16 * KiB         # h11_max_incomplete_event_size: a request line and headers beyond get a 400
READ_CHUNK = 256 * KiB          # asyncio's largest single read, parsed by h11 before uvicorn pauses reading
PER_CONNECTION = 64 * KiB + READ_CHUNK + HEADER_BYTES + 16 * KiB    # + the protocol's and transport's objects
PARSED_PER_BYTE = 4             # a JSON string becomes a str of up to 4 bytes a character (one astral one)
JSON_TREE_PER_BYTE = 25         # json.loads of '[{},{},...]': the worst tree a byte of JSON builds (measured)
TOKENIZE_PER_BYTE = 200         # the tokenizers package's peak per byte of text (measured: 195 on SmolLM2)
BUSY = "server_busy"


@dataclass(frozen=True)
class Limits:
    connections: int = 512
    header_s: float = 10.0
    body_s: float = 30.0
    small_body: int = 64 * KiB
    large_bodies: int = 2
    tokenizing: int = 2
    admit_s: float = 10.0
    max_body: int = 8 * MiB

    def budget_bytes(self, longest_prompt_bytes: int) -> int:
        """The most memory clients can make the API hold beyond its size at rest, before admission: every
        connection's buffers, the large bodies (raw and parsed), one JSON tree being built (the event loop
        parses one body at a time) and the prompts being tokenized (each at most longest_prompt_bytes)."""
        return (self.connections * (PER_CONNECTION + self.small_body)
                + self.large_bodies * (1 + PARSED_PER_BYTE) * self.max_body
                + JSON_TREE_PER_BYTE * self.max_body
                + self.tokenizing * TOKENIZE_PER_BYTE * min(longest_prompt_bytes, self.max_body))

    def describe(self, longest_prompt_bytes: int) -> str:
        return (f"{self.connections} connections, headers within {self.header_s:g} s, bodies within "
                f"{self.body_s:g} s (at most {self.max_body // MiB} MiB, {self.large_bodies} beyond "
                f"{self.small_body // KiB} KiB at once), {self.tokenizing} prompts tokenized at once: at most "
                f"{self.budget_bytes(longest_prompt_bytes) / MiB:.0f} MiB held for clients before admission")


def busy(what: str) -> APIError:
    return APIError(503, f"the server is busy ({what}); retry shortly", type="server_error", code=BUSY)


# ---- connections and headers: uvicorn's h11 protocol with a cap and a deadline -------------------------
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
           b"content-length: %d\r\n\r\n%s")


def protocol(limits: Limits) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection beyond `limits.connections` at once and one whose request
    headers have not all arrived within `limits.header_s` (on a new connection and after each response)."""
    refused_body = json.dumps(busy(f"{limits.connections} connections open").body()).encode()

    class Limited(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.connections:
                transport.write(REFUSED % (len(refused_body), refused_body))
                transport.close()
                return
            self.arm_header_deadline()

        def arm_header_deadline(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(limits.header_s, self.headers_late, self.cycle)

        def headers_late(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():     # no request began since it was armed
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm_header_deadline()              # keep-alive: the next request's headers are on the clock

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return Limited


def uvicorn_options(limits: Limits) -> dict:
    # uvicorn's own 503 counts the connection asking among those open: one above the cap, it never fires first
    return {"http": protocol(limits), "limit_concurrency": limits.connections + 1,
            "h11_max_incomplete_event_size": HEADER_BYTES, "timeout_keep_alive": 5}


# ---- bodies and prompts: admission before the bytes are read -------------------------------------------
class Admission:
    """The semaphores of `Limits`: large bodies being read, parsed and tokenized; prompts being tokenized."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.large = 0                  # large bodies held (the event loop's thread only: no lock needed)
        self.tokenizing = asyncio.Semaphore(limits.tokenizing)

    def take_large(self) -> None:
        """Never waits: a waiting large body would hold its connection's buffers; the client retries."""
        if self.large >= self.limits.large_bodies:
            raise busy(f"{self.limits.large_bodies} bodies over {self.limits.small_body // KiB} KiB are being read")
        self.large += 1

    @contextlib.asynccontextmanager
    async def body(self, request):
        """The request's bytes, read under the limits; the large-body slot (if one was needed) is held until
        the block ends, i.e. until the body is parsed and tokenized."""
        large = False
        try:
            length = request.headers.get("content-length")
            limit = self.limits.max_body
            if length is not None and length.isdigit() and int(length) > limit:
                raise APIError(413, f"the request body ({int(length)} bytes) exceeds {limit} bytes")
            if length is not None and length.isdigit() and int(length) > self.limits.small_body:
                self.take_large()
                large = True
            body = bytearray()
            try:
                async with asyncio.timeout(self.limits.body_s):
                    async for part in request.stream():
                        body += part
                        if len(body) > limit:
                            raise APIError(413, f"the request body exceeds {limit} bytes")
                        if not large and len(body) > self.limits.small_body:
                            self.take_large()
                            large = True
            except TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.limits.body_s:g} s",
                               code="request_timeout") from None
            yield bytes(body)
        finally:
            if large:
                self.large -= 1

    @contextlib.asynccontextmanager
    async def tokenizer_slot(self):
        try:
            async with asyncio.timeout(self.limits.admit_s):
                await self.tokenizing.acquire()
        except TimeoutError:
            raise busy(f"{self.limits.tokenizing} prompts are being tokenized") from None
        try:
            yield
        finally:
            self.tokenizing.release()


class Prompts:
    """The length check before tokenizing. For a byte-level BPE tokenizer without a normalizer (GPT-2's kind,
    SmolLM2's, Llama 3's):

      the pre-tokenizer maps the text's UTF-8 bytes one to one onto characters and splits them into pieces;
      BPE splits each piece into vocabulary tokens (a byte whose character the vocabulary lacks is dropped:
      SmolLM2's GGUF has none for 6 control bytes), and an added token matches its own text verbatim. So the
      tokens' bytes, in order, are exactly the text's bytes less the dropped ones: B' = sum(bytes(t_i)) <= N * L,
      L the byte length of the longest token. Hence N >= ceil(B' / L), and a text of B' > L * context bytes
      holds more tokens than the context, whatever it says (special tokens the tokenizer or a chat template add
      only add to N).

    Tokens are no shorter than one byte, so the bound is no use the other way: a text of B bytes may be as few
    as B / L tokens. For any other tokenizer (a normalizer may shrink the text), `longest` is None and every
    prompt is tokenized, under the tokenizing slots."""

    def __init__(self, tokenizer: Tokenizer, context: int):
        self.context = context
        self.longest, self.dropped = byte_level_bounds(tokenizer) or (None, ())

    @property
    def max_bytes(self) -> int | None:
        """A text of more (kept) UTF-8 bytes than this holds more tokens than the context."""
        return None if self.longest is None else self.longest * self.context

    def check(self, text: str, param: str) -> None:
        limit = self.max_bytes
        if limit is None or len(text) * 4 <= limit:     # at most 4 bytes a character: no need to encode
            return
        raw = text.encode()
        n = len(raw) - sum(raw.count(b) for b in self.dropped)
        if n > limit:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt's "
                                f"{n} bytes hold more (each token covers at most {self.longest} bytes)",
                           param=param, code="context_length_exceeded")


def gpt2_byte_chars() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode, inverted): the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def byte_level_bounds(tokenizer: Tokenizer) -> tuple[int, tuple[bytes, ...]] | None:
    """(L of `Prompts`, the single bytes the vocabulary has no token for), from the vocabulary: a byte-level
    token's characters are its bytes; an added token's text is matched as written. None unless the tokenizer
    is byte-level BPE without a normalizer."""
    spec = json.loads(tokenizer.tok.to_str())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel" or model.get("type") != "BPE":
        return None
    added = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values()}
    vocab = tokenizer.tok.get_vocab(with_added_tokens=True)
    longest = max(len(t.encode()) if t in added else len(t) for t in vocab)
    never_in_utf8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
    return longest, tuple(bytes([b]) for c, b in sorted(gpt2_byte_chars().items(), key=lambda cb: cb[1])
                          if c not in vocab and b not in never_in_utf8)
