"""`tsqp api` on the engine with real processes and the real SmolLM2 GGUF: two compute servers behind one
API (requests spread over both; one killed mid-run fails only its own requests, the other keeps serving);
a server caught altering results (`tsqp serve --protect otp --inject-faults flip`) is logged, counted in
/health and shut out, or reconnected to with --reconnect-after-verification-failure; and with
--length-bucket the server's recorded view of two prompts of different lengths in one bucket is identical."""
from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from conftest import serving, serving_all
from test_api import MODEL_ID, api_url, client, start_api
from tsqp.commands import launch


def story(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about dragon number {i}."}]


def get_health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def stop_and_read(proc: subprocess.Popen) -> str:
    """SIGTERM, then everything the process printed after its banner."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    return out.decode(errors="replace")


def drain(stream) -> tuple[str, str | None]:
    """(text, error message or None) of a streamed chat."""
    text = []
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
    except openai.APIError as e:
        return "".join(text), str(e.message)
    return "".join(text), None


@pytest.mark.slow
def test_two_servers_share_the_load_and_one_killed_fails_only_its_requests(smollm2_gguf):
    g = str(smollm2_gguf)
    with serving_all([{"model": g, "extra": ("--threads", "1")}] * 2) as [(a, _), (b, server_b)]:
        proc = start_api("--endpoint", a, "--endpoint", b, "--model", g, "--max-batch", "4", "--threads", "1",
                         "--timeout", "30", "--connect-timeout", "60", "--kv-budget-mb", "16")
        try:
            launch.wait_ready([proc], 240)
            assert "Engine: 2 compute server(s)" in proc.banner and "(352 positions)" in proc.banner   # 16 MiB / 45 KiB
            url = api_url(proc)
            c = client(url)
            with pytest.raises(openai.BadRequestError) as e:          # could never fit the KV budget: at once
                c.chat.completions.create(model=MODEL_ID, messages=story(0), max_tokens=340)
            assert e.value.code == "context_length_exceeded" and "--kv-budget-mb holds 352" in e.value.message
            streams = [c.chat.completions.create(model=MODEL_ID, messages=story(i), stream=True, temperature=0,
                                                 max_tokens=80) for i in range(4)]     # each has its first token
            status, health = get_health(url)
            assert status == 200 and [s["active"] for s in health["servers"]] == [2, 2]   # spread: least loaded
            server_b.send_signal(signal.SIGKILL)
            server_b.wait(10)
            results = [drain(s) for s in streams]
            failed = [err for _, err in results if err is not None]
            assert len(failed) == 2 and all(b in err and "unavailable" in err for err in failed), failed
            assert sum(1 for text, err in results if err is None and text) == 2        # A's two finished
            got = c.chat.completions.create(model=MODEL_ID, messages=story(9), temperature=0, max_tokens=4)
            assert got.usage.completion_tokens == 4                                    # A keeps serving
            status, health = get_health(url)
            assert status == 503 and health["status"] == "degraded"
            assert [s["state"] for s in health["servers"]] == ["idle", "unavailable"]
        finally:
            launch.stop_servers([proc])


@pytest.mark.slow
def test_a_server_caught_altering_results_is_logged_counted_and_shut_out(smollm2_gguf):
    g = str(smollm2_gguf)
    specs = [{"model": g, "extra": ("--protect", "otp", "--inject-faults", "flip", "--threads", "1")},
             {"model": g, "extra": ("--protect", "otp", "--threads", "1")}]
    with serving_all(specs) as [(bad, _), (good, _)]:
        flags = ("--model", g, "--protect", "otp", "--verify", "--max-batch", "2", "--threads", "1",
                 "--connect-timeout", "120", "--pad-pool", "16")
        shut = start_api("--endpoint", bad, "--endpoint", good, *flags)
        again = start_api("--endpoint", bad, *flags, "--reconnect-after-verification-failure")
        try:
            launch.wait_ready([shut, again], 300)
            c = client(api_url(shut))
            with pytest.raises(openai.APIStatusError) as e:          # both idle: the first server gets it
                c.chat.completions.create(model=MODEL_ID, messages=story(0), temperature=0, max_tokens=4)
            assert e.value.status_code == 502 and "caught altering a result" in e.value.message and bad in e.value.message
            status, health = get_health(api_url(shut))
            assert status == 503 and health["verification_failures"] == 1
            first, second = health["servers"]
            assert first["state"] == "shut out" and second["state"] == "idle"
            record = first["failures"][0]
            assert record["op"] in ("qkv", "o", "gate_up", "down", "lm_head") and record["time"] and record["session"] == 1
            for i in range(2):                                       # the good server serves every later one
                got = c.chat.completions.create(model=MODEL_ID, messages=story(i), temperature=0, max_tokens=4)
                assert got.usage.completion_tokens == 4

            c2 = client(api_url(again))
            for _ in range(2):                                       # each request meets a fresh session, and fails
                with pytest.raises(openai.APIStatusError) as e:
                    c2.chat.completions.create(model=MODEL_ID, messages=story(0), temperature=0, max_tokens=4)
                assert e.value.status_code == 502 and "caught altering a result" in e.value.message
            _, health = get_health(api_url(again))
            assert health["verification_failures"] == 2 and health["servers"][0]["sessions_opened"] == 2
        finally:
            logs = [stop_and_read(p) for p in (shut, again)]
    assert "VERIFICATION FAILED" in logs[0] and f"op '{record['op']}' layer {record['layer']}" in logs[0]
    assert "no longer used until tsqp api is restarted" in logs[0]
    assert logs[1].count("VERIFICATION FAILED") == 2 and "a fresh session is opened" in logs[1]


def recorded_view(session_dir: Path) -> list[tuple]:
    """A recorded session as the server saw it: every call's op, layer, header (ids and offsets aside) and
    input and output dtypes and shapes, in order."""
    view = []
    for line in (session_dir / "index.jsonl").read_text().splitlines():
        call = json.loads(line)
        header = {k: v for k, v in call["header"].items() if k not in ("id", "seq", "compute_s")}   # the server's own clock
        view.append((call["op"], call["layer"], json.dumps(header, sort_keys=True),
                     [(i["dtype"], i["shape"]) for i in call["inputs"]],
                     (call["output"]["dtype"], call["output"]["shape"]) if call.get("output") else None))
    return view


@pytest.mark.slow
def test_two_prompts_in_one_length_bucket_give_the_server_one_view(smollm2_gguf, tmp_path):
    """Prompts of 20 and 50 tokens, --length-bucket 64: each through its own `tsqp api` (its own session)
    against one `tsqp serve --protect otp --record`: both sessions' calls are identical in op, layer, header,
    dtypes, shapes, count and order; the session itself is sized from the engine's flags alone."""
    g = str(smollm2_gguf)
    record = tmp_path / "record"
    with serving(g, extra=("--protect", "otp", "--record", str(record), "--threads", "1")) as (endpoint, _):
        flags = ("--endpoint", endpoint, "--model", g, "--protect", "otp", "--verify", "--length-bucket", "64",
                 "--max-batch", "4", "--max-step-tokens", "132", "--threads", "1", "--connect-timeout", "120")
        apis = [start_api(*flags), start_api(*flags)]
        try:
            launch.wait_ready(apis, 300)
            for proc, n in zip(apis, (20, 50)):
                got = client(api_url(proc)).completions.create(model=MODEL_ID, prompt=list(range(100, 100 + n)),
                                                               temperature=0, max_tokens=3)
                assert got.usage.prompt_tokens == n and got.usage.completion_tokens == 3
        finally:
            launch.stop_servers(apis)
    views = [recorded_view(s) for s in sorted(p for p in record.iterdir() if p.is_dir())]
    assert len(views) == 2                    # one session each: opened at start-up, kept (never resized)
    assert len(views[0]) > 100 and views[0] == views[1]
    assert views[0][0][3] == [("uint8", [5, 64, 576])]             # the prefill's rows: one bucket
