"""`tsqp api` against hostile clients, as a real process (--local, the real SmolLM2 GGUF): every client input
gets a 4xx naming its field and never costs the worker its session (the oracle: a greedy answer equal before
and after, from the same process); fields that change the answer are applied (top_k, checked against the
model's own top-k) or refused by name; hypothesis fuzzes the schema for any 5xx."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import clean_env
from tsqp.commands.api.limits import gpt2_byte_chars

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
HELLO = [{"role": "user", "content": "What is the capital of France?"}]


# ---- a real `tsqp api` ---------------------------------------------------------------------------------
class ApiProcess:
    """`tsqp api --port 0 ...` with its output in a file (a pipe nobody reads would stall it once full)."""

    def __init__(self, log: Path, *args: str, env: dict | None = None, port: int | None = 0):
        self.log = log
        listen = [] if port is None else ["--port", str(port)]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "api", *listen, *args],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         env={**clean_env(), "PYTHONUNBUFFERED": "1", **(env or {})})

    def wait_ready(self, timeout_s: float = 180.0) -> "ApiProcess":
        deadline = time.monotonic() + timeout_s
        while "ready in" not in self.output():
            if self.proc.poll() is not None:
                raise RuntimeError(f"tsqp api exited ({self.proc.returncode}):\n{self.output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tsqp api not ready within {timeout_s} s:\n{self.output()}")
            time.sleep(0.2)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def port(self) -> int:
        return int(re.search(r"Listening: http://127\.0\.0\.1:(\d+)/v1", self.output()).group(1))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def hwm_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def post(url: str, body: bytes, headers: dict | None = None, timeout_s: float = 120) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            data = r.read()
            return r.status, json.loads(data) if r.headers.get_content_type() == "application/json" else {}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(api: ApiProcess, **fields) -> tuple[int, dict]:
    body = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 4, "temperature": 0} | fields
    return post(f"{api.url}/chat/completions", json.dumps(body).encode())


@pytest.fixture(scope="module")
def api(smollm2_gguf, tmp_path_factory):
    proc = ApiProcess(tmp_path_factory.mktemp("api") / "api.log", "--local", "--model", str(smollm2_gguf),
                      "--workers", "1", "--queue", "8", "--threads", "1", "--max-tokens", "4")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def greedy(api):
    """The greedy answer before any bad input: the session must still give it after."""
    status, body = chat(api)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


# ---- named cases (issue 29, items 7 and 8) -------------------------------------------------------------
RAW_CASES = [   # (body, the field the 400 must name); raw bytes: JSON's escapes reach the server as written
    (b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL_ID.encode(), "messages"),
    (b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}'
     % MODEL_ID.encode(), "messages"),
    (b'{"model": "\\ud800", "messages": []}', "model"),
    (b'{"model": "%s", "messages": %s, "stop": "\\ud83d"}' % (MODEL_ID.encode(), json.dumps(HELLO).encode()),
     "stop"),
    (b'{"model": "%s", "messages": %s, "\\ud800": 1}' % (MODEL_ID.encode(), json.dumps(HELLO).encode()), "\\ud800"),
    (b'{"model": "%s", "messages": %s, "temperature": 1e-300}' % (MODEL_ID.encode(), json.dumps(HELLO).encode()),
     "temperature"),
    (b'{"model": "%s", "messages": %s, "temperature": 5e-324}' % (MODEL_ID.encode(), json.dumps(HELLO).encode()),
     "temperature"),
]
REFUSED = [({"response_format": {"type": "json_object"}}, "response_format"),
           ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
           ({"n": 3}, "n"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty"),
           ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
           ({"min_p": 0.1}, "min_p"), ({"repetition_penalty": 1.2}, "repetition_penalty"),
           ({"audio": {"voice": "alloy"}}, "audio"), ({"top_k": "x"}, "top_k"), ({"top_k": -5}, "top_k"),
           ({"messages": [{**HELLO[0], "tool_calls": [{"id": "c1"}]}]}, "messages"),
           ({"messages": [{**HELLO[0], "name": 7}]}, "messages")]


def test_bad_input_gets_a_400_naming_the_field_and_the_session_survives(api, greedy):
    url = f"{api.url}/chat/completions"
    deep = b'{"model": "%s", "messages": ' % MODEL_ID.encode() + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = post(url, deep)
    assert status == 400 and "deeply" in body["error"]["message"], body
    for raw, param in RAW_CASES:
        status, body = post(url, raw)
        assert status == 400 and body["error"]["param"] == param, (raw, status, body)
    for fields, param in REFUSED:
        status, body = chat(api, **fields)
        assert status == 400 and body["error"]["param"] == param, (fields, status, body)
    status, body = chat(api, messages=[{**HELLO[0], "tool_calls": [{"id": "c1"}]}])
    assert "messages[0].tool_calls" in body["error"]["message"], body
    status, body = chat(api, messages=[{**HELLO[0], "name": "bob", "refusal": None}])   # handed to the template
    assert status == 200, body
    status, body = chat(api, response_format={"type": "text"}, user="u1", metadata={"k": "v"})
    assert status == 200 and body["choices"][0]["message"]["content"] == greedy, body
    for temperature in (1e-300, 5e-324):      # sampled at temperature 1e-300 and a real token came: still there
        status, body = chat(api, temperature=temperature)
        assert status == 400
    assert chat(api)[1]["choices"][0]["message"]["content"] == greedy     # the same session, the same answer
    assert "Traceback" not in api.output(), api.output()[-3000:]


def test_top_k_one_is_the_greedy_answer_at_any_temperature(api, greedy):
    """top_k 1 keeps the argmax only: at temperature 2 (and any seed) the answer is the greedy one, which it is
    not without top_k (the same seeds sample other tokens): so top_k is applied, not ignored."""
    with_k = {chat(api, temperature=2.0, top_k=1, seed=s)[1]["choices"][0]["message"]["content"] for s in range(4)}
    assert with_k == {greedy}
    without = {chat(api, temperature=2.0, seed=s)[1]["choices"][0]["message"]["content"] for s in range(4)}
    assert without != {greedy}


# ---- fuzz: no input gets a 5xx ---------------------------------------------------------------------------
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p",
          "top_k", "seed", "stop", "stream", "stream_options", "response_format", "logprobs", "user"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values,
                                 "content": st.text(max_size=20) | json_values})
body_of = st.fixed_dictionaries({"model": st.just(MODEL_ID) | json_values},
                                optional={**{f: json_values for f in FIELDS[1:]},
                                          "messages": st.lists(message, max_size=3) | json_values,
                                          "max_tokens": st.integers(-3, 4) | json_values})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=body_of, route=st.sampled_from(["chat/completions", "completions"]))
def test_fuzzed_bodies_never_get_a_5xx(api, body, route):
    # json.dumps keeps lone surrogates as escapes and writes NaN/Infinity, which the server must refuse
    status, answer = post(f"{api.url}/{route}", json.dumps(body).encode(), timeout_s=60)
    assert status < 500, (body, status, answer)
    assert status == 200 or answer["error"]["message"], answer


# ---- connections, headers and bodies before admission (issue 29, item 1) --------------------------------
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
BIG = 8 * 2**20                 # the largest body the API accepts


class Attack:
    """Raw sockets held open against the API: slowloris headers, slow bodies, and bodies of 8 MiB (declared
    or chunked) that never finish. Each kind is started, then trickled; a socket the server closed is counted."""

    def __init__(self, port: int):
        self.port, self.socks, self.sent = port, {}, {}

    def open(self, kind: str, n: int) -> None:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.setblocking(False)
            self.socks[s], self.sent[s] = kind, 0
            self.send(s, {"headers": HEAD[:40], "body": HEAD + b"Content-Length: 60000\r\n\r\n" + b" " * 50_000,
                          "declared": HEAD + b"Content-Length: %d\r\n\r\n" % BIG,
                          "chunked": HEAD + b"Transfer-Encoding: chunked\r\n\r\n"}[kind])

    def send(self, s: socket.socket, data: bytes) -> None:
        try:
            s.send(data)
        except (BlockingIOError, ConnectionError, OSError):
            pass

    def trickle(self) -> None:
        """A byte more of each (a megabyte more of the 8 MiB bodies, up to a byte short): none finishes."""
        for s, kind in self.socks.items():
            n = min(2**20, BIG - 1 - self.sent[s])
            if kind in ("declared", "chunked") and n > 0:
                self.sent[s] += n
                self.send(s, b"x" * n if kind == "declared" else b"%x\r\n%s\r\n" % (n, b"x" * n))
            elif kind in ("headers", "body"):
                self.send(s, b"X" if kind == "headers" else b" ")

    def closed(self) -> dict[str, int]:
        """Per kind, how many the server has closed, and how many of those it answered 503 first."""
        out: dict[str, int] = {}
        for s, kind in self.socks.items():
            got = b""
            try:
                while data := s.recv(65536):
                    got += data
            except BlockingIOError:
                continue
            except ConnectionError:
                pass
            out[kind] = out.get(kind, 0) + 1
            if got.startswith(b"HTTP/1.1 503"):
                out[kind + " 503"] = out.get(kind + " 503", 0) + 1
        return out

    def close(self) -> None:
        for s in self.socks:
            s.close()


class RssSampler(threading.Thread):
    """The API's VmRSS every 20 ms, the largest kept."""

    def __init__(self, api: ApiProcess):
        super().__init__(daemon=True)
        self.api, self.peak_kib, self.done = api, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak_kib = max(self.peak_kib, self.api.rss_kib())
            time.sleep(0.02)

    def stop(self) -> int:
        self.done.set()
        self.join(5)
        return self.peak_kib


def budget_mib(api: ApiProcess) -> int:
    return int(re.search(r"at most (\d+) MiB held for clients", api.output()).group(1))


CAPPED = 100


@pytest.fixture(scope="module")
def limited_api(smollm2_gguf, tmp_path_factory):
    """An API with short deadlines (2 s for headers, 4 s for bodies), so that the cut-offs show in seconds."""
    proc = ApiProcess(tmp_path_factory.mktemp("api") / "api.log", "--local", "--model", str(smollm2_gguf),
                      "--workers", "1", "--queue", "8", "--threads", "1", "--max-tokens", "4",
                      "--header-timeout", "2", "--body-timeout", "4", "--max-connections", str(CAPPED))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def hold_and_ask(api: ApiProcess, per_kind: int, trickles: int) -> tuple[dict, int, int, str]:
    """per_kind connections of each attack kind, trickled; meanwhile a well-behaved client asks. Returns (how
    many of each kind the server closed by the end, rest RSS KiB, peak RSS KiB, the well-behaved answer)."""
    chat(api)                                       # warm: the rest figure includes a served request
    rest = api.rss_kib()
    sampler = RssSampler(api)
    sampler.start()
    attack = Attack(api.port)
    try:
        for kind in ("headers", "body", "declared", "chunked"):
            attack.open(kind, per_kind)
        status, body = chat(api)
        assert status == 200, body
        for _ in range(trickles):
            attack.trickle()
            time.sleep(1.0)
        closed = attack.closed()
    finally:
        peak = sampler.stop()
        attack.close()
    return closed, rest, peak, body["choices"][0]["message"]["content"]


def test_slow_and_oversized_clients_are_cut_off_and_a_good_client_answered(limited_api):
    """Against 20 connections of each kind: the good client gets the greedy answer while they are held, the
    8 MiB bodies get 503 at once beyond the 2 large-body slots, every slowloris header and slow body is cut off
    by its deadline (2 s, 4 s), and the RSS stays within the stated budget."""
    api = limited_api
    greedy = chat(api)[1]["choices"][0]["message"]["content"]
    closed, rest, peak, answer = hold_and_ask(api, per_kind=20, trickles=7)
    assert answer == greedy
    assert [closed[k] for k in ("headers", "body", "declared", "chunked")] == [20] * 4, closed
    assert closed["declared 503"] + closed["chunked 503"] == 40 - 2, closed     # 2 large bodies read, then cut
    assert (peak - rest) / 1024 <= budget_mib(api), (rest, peak, budget_mib(api))
    assert chat(api)[1]["choices"][0]["message"]["content"] == greedy


def test_one_connection_past_the_cap_gets_a_503_at_accept(limited_api):
    """--max-connections 100: with 100 open (idle), the 101st is answered 503 and closed before anything of it
    is read; once they are gone, requests are served again."""
    api = limited_api
    time.sleep(2.5)                                     # earlier tests' connections are closed by now
    held = [socket.create_connection(("127.0.0.1", api.port), timeout=5) for _ in range(CAPPED)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", api.port), timeout=5)
        answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"server_busy" in answer, answer
        assert extra.recv(65536) == b""                  # and closed
        extra.close()
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    assert chat(api)[0] == 200


def test_a_prompt_longer_than_the_context_in_bytes_is_refused_untokenized(limited_api, smollm2_gguf):
    """8 MiB of prompt text took 6.5 s and 1.1 GB to tokenize before its 400; now the byte count refuses it."""
    api = limited_api
    rest = api.rss_kib()
    t0 = time.perf_counter()
    for route, body in (("completions", {"prompt": "x" * (8 * 2**20 - 100)}),
                        ("chat/completions", {"messages": [{"role": "user", "content": "é" * (4 * 2**20 - 100)}]})):
        status, answer = post(f"{api.url}/{route}", json.dumps({"model": MODEL_ID, **body}, ensure_ascii=False)
                              .encode())
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded", answer
    assert time.perf_counter() - t0 < 3.0
    assert api.hwm_kib() - rest < 200 * 1024 or api.rss_kib() - rest < 100 * 1024


@pytest.mark.slow
def test_300_hostile_connections_stay_within_the_stated_memory(api):
    """The issue's attack at its size (75 connections of each kind: slowloris headers, slow bodies, 8 MiB bodies
    declared and chunked) against the default limits: the RSS stays within the budget the banner states and a
    well-behaved client gets its answer while they are held."""
    greedy = chat(api)[1]["choices"][0]["message"]["content"]
    closed, rest, peak, answer = hold_and_ask(api, per_kind=75, trickles=9)
    print(f"300 connections: RSS at rest {rest / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB (+{(peak - rest) / 1024:.0f}"
          f" MiB), budget {budget_mib(api)} MiB; closed by the server: {closed}")
    assert answer == greedy
    assert (peak - rest) / 1024 <= budget_mib(api), (rest, peak, budget_mib(api))
    assert closed["declared 503"] + closed["chunked 503"] == 150 - 2, closed     # 2 large-body slots


# ---- the length check's bound, against the real tokenizer ----------------------------------------------
@pytest.fixture(scope="module")
def prompts(smollm2_gguf):
    from tsqp.commands.api.limits import Prompts
    from tsqp.trusted.tokenizer import Tokenizer

    return Prompts(Tokenizer(smollm2_gguf), 8192)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(min_size=0, max_size=400) | st.lists(st.sampled_from([" ", "\n", "=", "<|im_start|>", "é", "😀",
                                                                           "hello", "\t", "\x16", chr(0x50000)]), max_size=300).map("".join))
def test_no_token_covers_more_bytes_than_the_longest(prompts, text):
    """The proof's two steps on SmolLM2's byte-level BPE: the tokens' bytes are the text's bytes less the ones
    the vocabulary lacks (a partition), so ceil(B' / L) <= N for any text, special-token text, long runs of
    whitespace and the dropped control bytes included."""
    tok = prompts_tokenizer(prompts)
    ids = tok.encode(text, add_special_tokens=False)
    added = {t.content for t in tok.tok.get_added_tokens_decoder().values()}
    byte_of = gpt2_byte_chars()
    pieces = [t.encode() if t in added else bytes(byte_of[c] for c in t) for t in map(tok.tok.id_to_token, ids)]
    kept = bytes(b for b in text.encode() if bytes([b]) not in prompts.dropped)
    assert b"".join(pieces) == kept
    assert all(len(p) <= prompts.longest for p in pieces)
    assert len(ids) * prompts.longest >= len(kept)


def prompts_tokenizer(prompts):
    from tsqp.trusted.tokenizer import Tokenizer

    if not hasattr(prompts, "tok"):
        prompts.tok = Tokenizer(__import__("conftest").smollm2_gguf_path())
    return prompts.tok


def test_the_bound_is_tight_and_refuses_only_what_cannot_fit(prompts):
    """L is SmolLM2's longest token (a newline and 80 spaces: 81 bytes); a text made of it is 1 token per 81
    bytes, so the bound cannot be raised; one byte past L * context is refused, L * context passes to the
    tokenizer."""
    from tsqp.commands.api.schema import APIError

    tok = prompts_tokenizer(prompts)
    assert prompts.longest == 81 and prompts.max_bytes == 81 * 8192
    # no token for these bytes (6 control characters, 2 lead bytes of 4-byte characters): the tokenizer drops them
    assert prompts.dropped == tuple(bytes([b]) for b in (4, 6, 19, 20, 22, 29, 0xF1, 0xF2))
    assert tok.encode("\x16" * 1000, add_special_tokens=False) == []
    prompts.check("\x16" * 10**6, "prompt")                         # 0 tokens: not refused
    longest = "\n" + " " * 80
    assert len(tok.encode(longest * 50, add_special_tokens=False)) == 50
    prompts.check(longest * 8192, "prompt")                     # 8,192 tokens: not refused here
    with pytest.raises(APIError) as e:
        prompts.check(longest * 8192 + "x", "prompt")
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"


@pytest.mark.parametrize("host", ["nonexistent.invalid", "::zz"])
def test_an_unresolvable_host_is_refused_naming_the_flag(host):
    """Before, `--host nonexistent.invalid` died with the resolver's bare '[Errno -2] Name or service not known'."""
    proc = subprocess.run([sys.executable, "-m", "tsqp.cli", "api", "--local", "--model", "random:tiny",
                           "--host", host, "--port", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"--host '{host}'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
