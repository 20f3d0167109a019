"""The OpenAI API's shapes for `tsqp api`: a request body checked field by field into a `Request` (anything
wrong is one `APIError` naming the field), and the bodies of responses, stream chunks and errors.
No HTTP and no model here: the app (app.py) reads the bytes, the pool (pool.py) generates."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ...trusted.generate import MIN_TEMPERATURE

MAX_STOP_STRINGS = 16           # OpenAI allows 4; a few more cost nothing
MAX_STOP_CHARS = 256
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = {"role", "content", "name"}

# fields that would change what comes back if honoured: refused rather than silently ignored
UNSUPPORTED = {
    "tools": "tools", "functions": "function calling", "tool_choice": "tool choice",
    "function_call": "function calling", "logprobs": "logprobs", "top_logprobs": "logprobs",
    "logit_bias": "logit_bias", "echo": "echo", "suffix": "suffix", "best_of": "best_of",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}
NEUTRAL = {"logprobs": (False, None), "top_logprobs": (0, None), "logit_bias": ({}, None), "echo": (False, None),
           "suffix": ("", None), "best_of": (1, None), "presence_penalty": (0, None),
           "frequency_penalty": (0, None), "tools": ([], None), "functions": ([], None),
           "tool_choice": ("none", None), "function_call": ("none", None)}
# fields read below, and fields that change nothing in the answer (bookkeeping, latency hints); any other field
# is refused by name, so that an option tsqp does not know is never silently dropped
KNOWN = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p",
         "top_k", "seed", "stop", "stream", "stream_options", "response_format", *UNSUPPORTED}
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


class APIError(Exception):
    """An error the client gets as OpenAI's JSON body with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Request:
    kind: str                               # "chat" (/v1/chat/completions) or "text" (/v1/completions)
    model: str
    messages: list[dict] | None = None      # chat: [{'role', 'content'}] with system/user/assistant roles
    prompt: str | list[int] | None = None   # text: a string or token ids
    max_tokens: int | None = None           # None: as many as fit, up to the server's default
    temperature: float = 1.0                # OpenAI's default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0                          # 0: off (an extension OpenAI lacks; vLLM's meaning)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False             # stream_options.include_usage: a last chunk with the usage


# ---- parsing -------------------------------------------------------------------------------------------
def parse(raw: bytes, kind: str) -> Request:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise bad("the request body nests JSON arrays or objects too deeply") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, not {type(body).__name__}")
    unknown = sorted(set(body) - KNOWN - HARMLESS)
    if unknown:
        name = json.dumps(unknown[0])[1:-1][:60]       # escaped: a key may be anything, lone surrogates too
        raise bad(f"unknown field '{name}': tsqp api does not support it", param=name)
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in NEUTRAL[name]:
            raise bad(f"{what} is not supported by tsqp api", param=name)
    _response_format(body.get("response_format"))
    req = Request(kind, model=_string(body, "model", required=True))
    if kind == "chat":
        req.messages = _messages(body.get("messages"))
        limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        req.prompt = _prompt(body.get("prompt"))
        limit = "max_tokens"
    req.max_tokens = _integer(body, limit, low=1)
    if body.get("n") is not None and _integer(body, "n", low=1) != 1:
        raise bad("n > 1 is not supported: ask once per completion", param="n")
    temperature = _number(body, "temperature", 0.0, 2.0)
    req.temperature = 1.0 if temperature is None else temperature
    if 0 < req.temperature < MIN_TEMPERATURE:
        raise bad(f"'temperature' must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {req.temperature:g}",
                  param="temperature")
    req.top_k = _integer(body, "top_k", low=-1) or 0
    if req.top_k < 0:                       # vLLM's -1: off
        req.top_k = 0
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0:
        raise bad("top_p must be greater than 0", param="top_p")
    req.top_p = 1.0 if top_p is None else top_p
    req.seed = _integer(body, "seed", low=-2**63, high=2**64 - 1)
    req.stop = _stop(body.get("stop"))
    req.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad("stream_options must be an object", param="stream_options")
        if not req.stream:
            raise bad("stream_options is only allowed with stream: true", param="stream_options")
        req.include_usage = _boolean(options, "include_usage")
    return req


def _response_format(value) -> None:
    """Only plain text is served: a JSON mode or schema would need constrained decoding."""
    if value is None or value == {"type": "text"}:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    raise bad(f"response_format {json.dumps(kind)[:40]} is not supported by tsqp api (only {{\"type\": \"text\"}})",
              param="response_format")


def _text(value: str, where: str, param: str) -> str:
    """A string that is valid Unicode: JSON's \\ud800 escapes give lone surrogates, which have no UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{where} holds a lone UTF-16 surrogate at character {e.start}, which is not text",
                  param=param) from None
    return value


def _string(body: dict, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise bad(f"'{name}' must be a string" + ("" if value is not None else " (it is required)"), param=name)
    return _text(value, f"'{name}'", name)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false", param=name)
    return value


def _integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer, got {json.dumps(value)[:40]}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(f"'{name}' must be {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, got {value}",
                  param=name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{name}' must be a number, got {json.dumps(value)[:40]}", param=name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be in [{low:g}, {high:g}], got {value}", param=name)
    return float(value)


def _content(content, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text parts are served."""
    if isinstance(content, str):
        return _text(content, f"{where}.content", "messages")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where}.content: only text parts are supported, got {kind!r}", param="messages")
            texts.append(_text(part["text"], f"{where}.content", "messages"))
        return "".join(texts)
    raise bad(f"{where}.content must be a string or a list of text parts", param="messages")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", param="messages")
        role = m.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)[:40]}",
                      param="messages")
        out.append({"role": CHAT_ROLES[role], "content": _content(m.get("content"), where), **_name(m, where)})
    return out


def _name(m: dict, where: str) -> dict:
    """A message's optional name, handed to the chat template as transformers does (most templates ignore
    it); any other field of a message is refused, since honouring it (tool calls, say) would change the answer."""
    extra = sorted(k for k, v in m.items() if k not in MESSAGE_FIELDS and v is not None)
    if extra:
        key = json.dumps(extra[0])[1:-1][:60]          # escaped: a key may be anything
        raise bad(f"{where}.{key} is not supported (a message takes role, content and name)", param="messages")
    name = m.get("name")
    if name is None:
        return {}
    if not isinstance(name, str):
        raise bad(f"{where}.name must be a string", param="messages")
    return {"name": _text(name, f"{where}.name", "messages")}


def _prompt(prompt) -> str | list[int]:
    """A string, or token ids; a list of one of either (OpenAI's batch form, with a batch of one)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _text(prompt, "'prompt'", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("a batch of prompts is not supported: send one prompt per request", param="prompt")
    raise bad("'prompt' must be a string or a non-empty list of token ids", param="prompt")


def _stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad(f"each stop string must hold 1 to {MAX_STOP_CHARS} characters", param="stop")
    return [_text(s, "'stop'", "stop") for s in stops]


# ---- bodies --------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(req: Request, rid: str, created: int, model: str, text: str, finish: str, counts: dict) -> dict:
    """The whole answer of a request made without stream."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                "usage": counts}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": counts}


def chunk(req: Request, rid: str, created: int, model: str, text: str | None = None, finish: str | None = None,
          first: bool = False, counts: dict | None = None) -> dict:
    """One server-sent event's data. counts: the usage chunk (no choices) that ends a stream asked for it."""
    if req.kind == "chat":
        obj, choices = "chat.completion.chunk", []
        if counts is None:
            delta = ({"role": "assistant", "content": ""} if first else {}) | \
                ({"content": text} if text is not None else {})
            choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        obj = "text_completion"
        choices = [] if counts is not None else \
            [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if req.include_usage:
        body["usage"] = counts      # null on every chunk but the last, as OpenAI sends it
    return body
