"""`tsqp api` as an application sees it: the official `openai` client against `tsqp api` launched as a real
process, connected over shared memory to a real `tsqp serve` holding the real SmolLM2-135M-Instruct GGUF.
The oracle is transformers' greedy `generate` on the same GGUF and the same templated ids (its own
apply_chat_template). Also: 8 concurrent streams, `tsqp run --chat` against the API, the error bodies; on a
pair of processes of its own, a full queue (429), a client that goes away, a compute server killed (503 before
the call timeout) and restarted, SIGTERM with a stream open; and --protect otp --verify through the API."""
from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch

from conftest import clean_env, serving, start_server, stop_server
from tsqp.commands import launch
from tsqp.commands.api.pool import StopStrings
from tsqp.commands.api.schema import APIError, parse

CHAT = [[{"role": "user", "content": "What is the capital of France?"}],      # ends its turn (eos)
        [{"role": "system", "content": "You are a poet."},
         {"role": "user", "content": "Write a short poem about the sea."}]]   # runs into max_tokens
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 2 + 2?",
             "Say hello in Spanish."]
MAX_TOKENS = 24
MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"


# ---- processes -------------------------------------------------------------------------------------------
def start_api(*args: str) -> subprocess.Popen:
    """`tsqp api ... --port 0` as a real process, not waited for (see api_url)."""
    proc = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "api", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**clean_env(), "PYTHONUNBUFFERED": "1"})
    proc.endpoint = None
    return proc


def api_url(proc: subprocess.Popen) -> str:
    """The base URL a ready API printed."""
    return "http://127.0.0.1:%s/v1" % re.search(r"Listening: http://127\.0\.0\.1:(\d+)/v1", proc.banner).group(1)


def client(base_url: str, **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=base_url, api_key=kw.pop("api_key", "unused"), max_retries=0,
                         timeout=kw.pop("timeout", 120), **kw)


def load_transformers(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def hf(smollm2_gguf):
    """transformers' model and tokenizer on the same GGUF."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # a 135M model on two busy cores: one thread is faster
    yield load_transformers(smollm2_gguf)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stack(smollm2_gguf, request):
    """(server endpoint, API URL). Server and API start together (the API's start-up check waits for the
    server's hello), while transformers loads here if no test has loaded it yet."""
    server = start_server(str(smollm2_gguf), extra=("--max-sessions", "12", "--threads", "1"))
    api = start_api("--endpoint", server.endpoint, "--model", str(smollm2_gguf), "--workers", "8", "--queue", "4",
                    "--threads", "1", "--timeout", "60", "--connect-timeout", "180")
    try:
        request.getfixturevalue("hf")
        launch.wait_ready([server, api], 240)
        yield server.endpoint, api_url(api)
    finally:
        launch.stop_servers([api])
        stop_server(server, own_dir=True)


@pytest.fixture(scope="module")
def api(stack):
    return stack[1]


GREEDY: dict[str, dict] = {}


def hf_greedy(hf, messages: list[dict], max_new: int) -> dict:
    """transformers' greedy answer: prompt ids, new ids (the eos that ended the turn included), text, finish."""
    key = json.dumps([messages, max_new])
    if key in GREEDY:
        return GREEDY[key]
    model, tokenizer = hf
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False)
    new = out[0, len(ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    GREEDY[key] = {"prompt_ids": ids, "new": new, "text": tokenizer.decode(new, skip_special_tokens=True),
                   "finish": "stop" if new[-1] in eos else "length"}
    return GREEDY[key]


# ---- answers equal transformers' ------------------------------------------------------------------------
@pytest.mark.parametrize("messages", CHAT, ids=["eos", "length"])
def test_greedy_chat_equals_transformers(api, hf, messages):
    want = hf_greedy(hf, messages, MAX_TOKENS)
    c = client(api)
    got = c.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == want["text"]
    assert got.choices[0].message.role == "assistant" and len(got.choices) == 1
    assert got.choices[0].finish_reason == want["finish"]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == \
        (len(want["prompt_ids"]), len(want["new"]), len(want["prompt_ids"]) + len(want["new"]))
    assert got.model == MODEL_ID and got.object == "chat.completion"

    chunks = list(c.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == want["text"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want["finish"]
    assert chunks[-1].choices == [] and chunks[-1].usage == got.usage
    assert len({ch.id for ch in chunks}) == 1


def test_text_completion_from_ids_and_a_stop_string(api, hf):
    """/v1/completions: the templated ids as the prompt give the same greedy text (stopping at the model's
    eos); a stop string cuts the text just before it, as OpenAI does, streamed or not."""
    want = hf_greedy(hf, CHAT[1], MAX_TOKENS)
    c = client(api)
    got = c.completions.create(model=MODEL_ID, prompt=want["prompt_ids"], temperature=0, max_tokens=MAX_TOKENS)
    assert got.choices[0].text == want["text"] and got.usage.completion_tokens == len(want["new"])
    words = want["text"].split()
    stop = words[len(words) // 2]
    cut = want["text"][:want["text"].index(stop)]
    got = c.completions.create(model=MODEL_ID, prompt=want["prompt_ids"], temperature=0, max_tokens=MAX_TOKENS,
                               stop=[stop, "\u2603 never"])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (cut, "stop")
    assert got.usage.completion_tokens < len(want["new"])
    streamed = c.completions.create(model=MODEL_ID, prompt=want["prompt_ids"], temperature=0, max_tokens=MAX_TOKENS,
                                    stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut


@pytest.mark.slow
def test_eight_concurrent_streams_get_what_they_get_alone(api, hf):
    """Eight streaming clients at once (six greedy, two sampled with a seed): each text equals the one the
    same request gets alone (transformers' for the greedy ones, a lone API request for the sampled ones),
    and the streams really overlapped in time."""
    c = client(api)
    requests = [dict(messages=[{"role": "user", "content": QUESTIONS[i % 4]}], temperature=0) for i in range(6)]
    requests += [dict(messages=[{"role": "user", "content": "Tell me a fact about cats."}], temperature=0.9,
                      top_p=0.95, seed=seed) for seed in (7, 8)]
    alone = [hf_greedy(hf, r["messages"], 16)["text"] for r in requests[:6]]
    alone += [c.chat.completions.create(model=MODEL_ID, max_tokens=16, **r).choices[0].message.content
              for r in requests[6:]]
    assert alone[6] != alone[7]                                         # two seeds, two samples
    texts, spans, errors = [None] * 8, [None] * 8, []
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        try:
            barrier.wait(30)
            pieces, first = [], None
            for ch in c.chat.completions.create(model=MODEL_ID, max_tokens=16, stream=True, **requests[i]):
                if ch.choices and ch.choices[0].delta.content:
                    first = first or time.monotonic()
                    pieces.append(ch.choices[0].delta.content)
            texts[i], spans[i] = "".join(pieces), (first, time.monotonic())
        except Exception as e:      # reported below with its index
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and texts == alone
    # they streamed at once: the engine admits prompts a chunk per step, so a short answer may end before the
    # last stream's first token; still, at some instant at least half of them were streaming together
    together = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert together >= 4, spans


def test_run_chat_prints_the_same_answer(stack, smollm2_gguf):
    endpoint, url = stack
    question = QUESTIONS[1]
    run = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "run", "--endpoint", endpoint, "--model", str(smollm2_gguf),
                            "--chat", question, "--max-new-tokens", str(MAX_TOKENS), "--no-warmup", "--threads", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        answer = client(url).chat.completions.create(model=MODEL_ID, temperature=0, max_tokens=MAX_TOKENS, messages=[
            {"role": "user", "content": question}]).choices[0].message.content
        out, err = run.communicate(timeout=180)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate(timeout=10)
    assert run.returncode == 0, err
    printed = re.split(r"\n-- \d+ new tokens, stop: ", out.split(f"): {question}\n", 1)[1])[0]
    assert printed == answer and answer


# ---- errors ----------------------------------------------------------------------------------------------
def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_error(body: dict, *words: str) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    for w in words:
        assert w in error["message"], error
    return error


def test_errors_are_openai_bodies_with_the_right_status(api):
    url = api
    chat = f"{url}/chat/completions"
    status, body = post(chat, b'{"model": "x", "messages": [')
    assert status == 400 and "not valid JSON" in assert_error(body)["message"]
    status, body = post(chat, b"[1, 2]")
    assert status == 400 and assert_error(body, "JSON object")
    c = client(url)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=CHAT[0])
    assert e.value.status_code == 404 and "gpt-4o" in str(e.value) and MODEL_ID in str(e.value)
    context = c.models.list().data[0].model_extra["max_model_len"]
    long_prompt = "hello " * (context + 10)
    for call in (lambda: c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": long_prompt}]),
                 lambda: c.completions.create(model=MODEL_ID, prompt=long_prompt),
                 lambda: c.completions.create(model=MODEL_ID, prompt="hi", max_tokens=context)):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
        assert str(context) in e.value.message
    cases = [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"temperature": 3}, "temperature"),
             ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"), ({"messages": []}, "messages"),
             ({"messages": [{"role": "tool", "content": "x"}]}, "messages"), ({"seed": "x"}, "seed")]
    for extra, param in cases:
        status, body = post(chat, json.dumps({"model": MODEL_ID, "messages": CHAT[0], **extra}).encode())
        assert status == 400 and assert_error(body)["param"] == param, (extra, body)
    status, body = post(f"{url}/completions", json.dumps({"model": MODEL_ID, "prompt": [5, 10**9]}).encode())
    assert status == 400 and assert_error(body, "outside the vocabulary")
    status, body = post(f"{url}/nowhere", b"{}")
    assert status == 404 and assert_error(body)["code"] == "route_not_found"
    assert c.models.retrieve(MODEL_ID).id == MODEL_ID
    assert c.chat.completions.create(model=MODEL_ID, messages=CHAT[0], temperature=0, max_tokens=2).usage \
        .completion_tokens == 2                                     # and it serves on after all that


# ---- a pair of its own: queue, disconnects, a dead server, shutdown; the protected pair -------------------
@pytest.mark.slow
def test_queue_disconnect_a_killed_server_and_shutdown(smollm2_gguf, hf):
    """With one worker and no queue a second request gets 429 at once; a client that goes away frees the
    worker; a killed compute server gives 503 well before the call timeout, the API lives on and picks up a
    restarted server; SIGTERM ends an open stream with an error event, and the process promptly."""
    want = hf_greedy(hf, CHAT[0], 12)
    key = "k-" + str(random.randrange(10**9))
    story = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    with serving(str(smollm2_gguf), extra=("--threads", "1")) as (endpoint, srv):
        proc = start_api("--endpoint", endpoint, "--model", str(smollm2_gguf), "--workers", "1", "--queue", "0",
                         "--timeout", "60", "--connect-timeout", "2", "--threads", "1", "--api-key", key)
        try:
            launch.wait_ready([proc], 180)
            url = api_url(proc)
            with pytest.raises(openai.AuthenticationError):
                client(url).models.list()
            c = client(url, api_key=key)
            stream = c.chat.completions.create(model=MODEL_ID, stream=True, temperature=0, max_tokens=1000,
                                               messages=story)
            next(iter(stream))                                    # the worker is generating
            t0 = time.monotonic()
            with pytest.raises(openai.RateLimitError) as e:
                c.chat.completions.create(model=MODEL_ID, messages=CHAT[0], max_tokens=2)
            assert e.value.status_code == 429 and time.monotonic() - t0 < 2
            stream.close()                                        # the client goes away mid-stream
            t0 = time.monotonic()
            while True:             # the worker notices at its next token; 1000 tokens would take minutes
                try:
                    got = c.chat.completions.create(model=MODEL_ID, messages=CHAT[0], temperature=0, max_tokens=12)
                    break
                except openai.RateLimitError:
                    assert time.monotonic() - t0 < 20, "the worker was not freed"
                    time.sleep(0.2)
            assert got.choices[0].message.content == want["text"]

            srv.send_signal(signal.SIGKILL)
            srv.wait(10)
            t0 = time.monotonic()
            with pytest.raises(openai.InternalServerError) as e:
                c.chat.completions.create(model=MODEL_ID, messages=CHAT[0], max_tokens=4)
            waited = time.monotonic() - t0
            assert e.value.status_code == 503 and endpoint in e.value.message
            assert waited < 15, waited                            # the connect timeouts, not the 60 s call one
            assert c.models.list().data[0].id == MODEL_ID         # the API itself lives on

            with serving(str(smollm2_gguf), endpoint=endpoint, extra=("--threads", "1")):
                got = c.chat.completions.create(model=MODEL_ID, messages=CHAT[0], temperature=0, max_tokens=12)
                assert got.choices[0].message.content == want["text"]     # a restarted server is picked up
                chunks = iter(c.chat.completions.create(model=MODEL_ID, stream=True, max_tokens=1000,
                                                        messages=story))
                next(chunks)
                proc.send_signal(signal.SIGTERM)       # the open stream ends with an error event, not a cut
                with pytest.raises(openai.APIError, match="shutting down"):
                    list(chunks)
                assert proc.wait(20) == 130
        finally:
            launch.stop_servers([proc])


@pytest.mark.slow
def test_protection_flags_apply_to_the_api(smollm2_gguf, hf):
    """tsqp api --protect otp --verify --deferred-checks against tsqp serve --protect otp: every request's linear
    steps go out masked and come back checked (a decode step's while the next reply is awaited; strict checks
    are covered by tests/test_protect_smollm2.py), and the answer is still transformers' (12-bit weights do not
    change it)."""
    want = hf_greedy(hf, CHAT[0], 12)
    with serving(str(smollm2_gguf), extra=("--protect", "otp", "--threads", "1")) as (endpoint, _):
        proc = start_api("--endpoint", endpoint, "--model", str(smollm2_gguf), "--protect", "otp", "--verify",
                         "--deferred-checks", "--pad-pool", "16", "--workers", "1", "--threads", "1", "--connect-timeout", "60")
        try:
            launch.wait_ready([proc], 240)
            assert "protect otp + verify (deferred checks)" in proc.banner
            got = client(api_url(proc)).chat.completions.create(model=MODEL_ID, messages=CHAT[0], temperature=0,
                                                                max_tokens=12)
            assert got.choices[0].message.content == want["text"]
        finally:
            launch.stop_servers([proc])


# ---- pieces without processes ----------------------------------------------------------------------------
def test_stop_strings_cut_at_the_first_stop_whatever_the_pieces():
    rng = random.Random(3)
    for _ in range(300):
        text = "".join(rng.choice("ab c.\n") for _ in range(rng.randrange(1, 40)))
        stops = ["".join(rng.choice("ab c.") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 8)))) if len(text) > 1 else []
        pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        s, out = StopStrings(stops), ""
        for p in pieces:
            out += s.feed(p)
            if s.hit:
                break
        if not s.hit:
            out += s.flush()
        found = [text.find(x) for x in stops if x in text]
        assert (out, s.hit) == ((text[:min(found)], True) if found else (text, False)), (text, stops, pieces)


def test_request_parsing_names_the_field():
    r = parse(b'{"model": "m", "prompt": [[1, 2, 3]], "stop": "x", "stream": true, '
              b'"stream_options": {"include_usage": true}, "seed": -1}', "text")
    assert (r.prompt, r.stop, r.stream, r.include_usage, r.seed, r.temperature) == ([1, 2, 3], ["x"], True, True,
                                                                                   -1, 1.0)
    r = parse(b'{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, '
              b'{"type": "text", "text": "b"}]}], "max_completion_tokens": 5, "max_tokens": 9}', "chat")
    assert r.messages == [{"role": "system", "content": "ab"}] and r.max_tokens == 5
    for body, param in [(b'{"messages": []}', "model"), (b'{"model": "m", "prompt": ["a", "b"]}', "prompt"),
                        (b'{"model": "m", "prompt": "a", "top_p": 0}', "top_p"),
                        (b'{"model": "m", "prompt": "a", "max_tokens": true}', "max_tokens"),
                        (b'{"model": "m", "prompt": "a", "stream_options": {}}', "stream_options"),
                        (b'{"model": "m", "prompt": "a", "temperature": NaN}', "temperature")]:
        with pytest.raises(APIError) as e:
            parse(body, "text")
        assert e.value.status == 400 and e.value.param == param, body
