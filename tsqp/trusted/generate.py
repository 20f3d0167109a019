"""Generation on the trusted side: sampling, the prefill + one-token-at-a-time decode loop, and its statistics.

The KV cache and the sampler live here, in the runner; each decode step offloads the same linear steps as a
prefill with T=1 (embed, qkv/o/gate_up/down per layer, lm_head), so the server sees one token's activations.
"""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.table import Table

from ..config import ModelConfig
from .model import TrustedModel
from ..stats import Stats


# ---- sampling ----------------------------------------------------------------------------------------
MIN_TEMPERATURE = 1e-6      # below it float32 logits / temperature overflow (1e-300 rounds to 0): ask for 0 instead
@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0     # 0: greedy
    top_k: int = 0               # 0: off
    top_p: float = 1.0           # 1.0: off
    seed: int | None = None      # None: a fresh seed, reported so the run can be repeated

    @classmethod
    def make(cls, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None) -> "Sampling":
        """Greedy unless asked otherwise; --top-k/--top-p alone sample at temperature 1."""
        top_k, top_p = top_k or 0, 1.0 if top_p is None else top_p
        if temperature is None:
            temperature = 1.0 if (top_k or top_p < 1.0) else 0.0
        if temperature < 0 or 0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {temperature:g}")
        if top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
        if temperature == 0 and (top_k or top_p < 1.0):
            raise ValueError("--top-k/--top-p need --temperature > 0 (temperature 0 is greedy)")
        if seed is None and temperature > 0:
            seed = secrets.randbelow(2**31)
        return cls(temperature, top_k, top_p, seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed if self.seed is not None else 0)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits [V] -> logits / temperature with every token outside top-k and top-p set to -inf."""
    x = logits.float() / s.temperature
    if 0 < s.top_k < x.numel():
        kth = torch.topk(x, s.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        # keep the smallest set of most likely tokens whose mass reaches top_p (always the first)
        sorted_x, order = torch.sort(x, descending=True)
        p = torch.softmax(sorted_x, dim=-1)
        mass_before = p.cumsum(0) - p
        sorted_x = sorted_x.masked_fill(mass_before >= s.top_p, float("-inf"))
        x = torch.empty_like(x).scatter_(0, order, sorted_x)
    return x


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """logits [V] -> the next token id."""
    if s.greedy:
        return int(logits.argmax())
    probs = torch.softmax(filter_logits(logits, s), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---- the loop ----------------------------------------------------------------------------------------
def check_logits(logits: torch.Tensor, step: str) -> torch.Tensor:
    """A step's logits [V] must be finite: NaN or inf come from a broken model or a lying server, and a token
    chosen from them (argmax of NaN is 0) would pass for output."""
    finite = torch.isfinite(logits)
    if not finite.all():
        raise ValueError(f"the logits of {step} hold {int((~finite).sum())} non-finite value(s) (NaN or inf) "
                         f"among {logits.numel()}; no token can be chosen from them")
    return logits


def check_length(cfg: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Refuse before anything starts: positions beyond the model's maximum have no trained rope."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"the prompt ({prompt_len} tokens) plus --max-new-tokens ({max_new_tokens}) is "
                         f"{prompt_len + max_new_tokens} positions, beyond the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]                                  # the new tokens, the EOS that stopped it included
    stop: str                                       # "eos", "max_new_tokens" or "caller" (on_token said so)
    ttft_s: float                                   # prefill + first sample
    step_s: list[float] = field(default_factory=list)  # each later token: one decode step + its sample
    total_s: float = 0.0
    decode: dict = field(default_factory=dict)     # Stats counters spent on decode steps only


COUNTERS = ("rpc_calls", "rpc_time_s", "wait_s", "server_compute_s", "serialize_s", "deserialize_s")


def counters(stats: Stats) -> dict:
    c = {k: getattr(stats, k) for k in COUNTERS}
    c["bytes_moved"] = stats.bytes_moved
    c["trusted_s"] = sum(stats.trusted_s.values())
    return c


def generate(model: TrustedModel, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
             stats: Stats | None = None, ignore_eos: bool = False, chunks: int = 1, on_token=None,
             stop_ids: list[int] | None = None) -> Generation:
    """prompt [T] -> Generation. stats: the offload's (its counters split prefill from decode).
    on_token(token, logits) is called as each token is chosen; logits [V] may live in a transport buffer,
    valid only during the call (clone to keep). If it returns True, generation ends there (stop "caller":
    a stop string seen, a client gone)."""
    cfg = model.cfg
    T = prompt.numel()
    check_length(cfg, T, max_new_tokens)
    stats = stats if stats is not None else model.offload.stats
    eos = set() if ignore_eos else set(cfg.eos_token_id if stop_ids is None else stop_ids)   # stop_ids: a chat's
    g = sampling.generator()
    cache = model.new_cache(T + max_new_tokens)

    t0 = time.perf_counter()
    logits = check_logits(model.prefill(prompt, cache, chunks), "the prefill")
    token = sample(logits, sampling, g)
    gen = Generation(prompt.tolist(), [token], "", time.perf_counter() - t0)
    ended = bool(on_token and on_token(token, logits))
    before = counters(stats)
    while not ended and token not in eos and len(gen.ids) < max_new_tokens:
        t = time.perf_counter()
        logits = check_logits(model.decode(token, cache), f"decode step {len(gen.ids)}")
        token = sample(logits, sampling, g)
        gen.step_s.append(time.perf_counter() - t)
        gen.ids.append(token)
        ended = bool(on_token and on_token(token, logits))
    gen.total_s = time.perf_counter() - t0
    gen.stop = "caller" if ended else "eos" if token in eos else "max_new_tokens"
    after = counters(stats)
    gen.decode = {k: after[k] - before[k] for k in after}
    return gen


# ---- statistics --------------------------------------------------------------------------------------
def generation_stats(gen: Generation) -> dict:
    """Per-token figures over the decode steps (the first token comes from the prefill: that is ttft_s).
    bytes_per_token counts socket and shared-memory bytes in both directions."""
    n = len(gen.step_s)
    ms = np.array(gen.step_s) * 1e3
    d = gen.decode
    per = (lambda v: v / n) if n else (lambda v: None)
    per_ms = (lambda v: 1e3 * v / n) if n else (lambda v: None)
    return {
        "new_tokens": len(gen.ids), "decode_steps": n, "stop": gen.stop,
        "ttft_s": gen.ttft_s,
        "decode_ms_p50": float(np.percentile(ms, 50)) if n else None,
        "decode_ms_p90": float(np.percentile(ms, 90)) if n else None,
        "decode_ms_min": float(ms.min()) if n else None,
        "decode_ms_max": float(ms.max()) if n else None,
        "tokens_per_s": n / sum(gen.step_s) if n else None,
        "generation_s": gen.total_s,
        "rpc_per_token": per(d["rpc_calls"]),
        "bytes_per_token": per(d["bytes_moved"]),
        # where a decode step's time goes: blocked on replies (round trips, server compute inside them)
        # versus the runner's own math
        "rpc_ms_per_token": per_ms(d["rpc_time_s"]),
        "wait_ms_per_token": per_ms(d["wait_s"]),
        "server_compute_ms_per_token": per_ms(d["server_compute_s"]),
        "round_trip_overhead_ms_per_token": per_ms(d["rpc_time_s"] - d["server_compute_s"]),
        "trusted_ms_per_token": per_ms(d["trusted_s"]),
        "serialize_ms_per_token": per_ms(d["serialize_s"] + d["deserialize_s"]),
    }


def add_rows(table: Table, g: dict) -> Table:
    """Append the generation figures to a Stats table."""
    def ms(key):
        return "-" if g[key] is None else f"{g[key]:.3f} ms"

    rows = [
        ("new tokens", f"{g['new_tokens']} (stop: {g['stop']})"),
        ("time to first token", f"{g['ttft_s']:.4f} s"),
        ("decode per token p50 / p90", f"{ms('decode_ms_p50')} / {ms('decode_ms_p90')}"),
        ("decode tokens/s", "-" if g["tokens_per_s"] is None else f"{g['tokens_per_s']:.1f}"),
        ("RPCs per token", "-" if g["rpc_per_token"] is None else f"{g['rpc_per_token']:.1f}"),
        ("bytes per token", "-" if g["bytes_per_token"] is None else f"{g['bytes_per_token'] / 1024:.1f} KiB"),
        ("per token: RPC time", ms("rpc_ms_per_token")),
        ("per token: server compute", ms("server_compute_ms_per_token")),
        ("per token: round-trip overhead", ms("round_trip_overhead_ms_per_token")),
        ("per token: trusted math", ms("trusted_ms_per_token")),
        ("per token: (de)serialize", ms("serialize_ms_per_token")),
    ]
    for r in rows:
        table.add_row(*r)
    return table
