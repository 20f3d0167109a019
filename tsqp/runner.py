"""`tsqp run`: connect (or build the compute in-process), run one prefill, report the statistics."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from . import weights as W
from .compute import Compute
from .config import ModelConfig
from .model import KVCache, TrustedModel
from .offload import LocalOffload
from .remote import RemoteOffload, default_arena_bytes
from .stats import Stats
from .transport import transport_of

console = Console(highlight=False)


def fixed_prompt(cfg: ModelConfig, n: int) -> torch.Tensor:
    """The same n token ids on every run and in every mode, so runs compare."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (n,), generator=g)


def check_ids(cfg: ModelConfig, ids: torch.Tensor) -> None:
    if ids.numel() == 0:
        raise ValueError("the prompt is empty")
    bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
    if bad.numel():
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary 0..{cfg.vocab_size - 1}")


def open_offload(args, stats: Stats, tokens: int):
    """(offload, norms, description) for --local or a remote endpoint."""
    if args.local:
        dtype = W.torch_dtype(args.dtype)
        cfg, weights = W.load(args.model, dtype, args.device)
        compute = Compute(cfg, weights, args.device)
        norms = {k: v.cpu() for k, v in weights.items() if k.endswith("norm.weight")}
        return LocalOffload(compute, stats), cfg, norms
    keep = (12 if args.policy == "seed" else 8) * (args.chunks + 1) + 16
    arena = args.arena_mb * 2**20 if args.arena_mb else \
        (lambda cfg: default_arena_bytes(cfg, tokens, args.chunks, args.policy == "seed"))
    remote = RemoteOffload(args.endpoint, args.transport, timeout_s=args.timeout,
                           connect_timeout_s=args.connect_timeout, arena_bytes=arena, keep=keep, stats=stats,
                           curve=getattr(args, "curve", None))
    return remote, remote.cfg, remote.norms


def settings_of(args, offload, tokens: int) -> dict:
    remote = not args.local
    return {
        "model": offload.info["model"] if remote else args.model,
        "dtype": offload.info["dtype"] if remote else args.dtype,
        "device": offload.info["device"] if remote else args.device,
        "endpoint": args.endpoint if remote else None,
        "transport": (args.transport if args.transport == "shm" else transport_of(args.endpoint))
        if remote else "local",
        "socket": transport_of(args.endpoint) if remote else None,
        "policy": args.policy, "tokens": tokens, "chunks": args.chunks,
        "threads": torch.get_num_threads(),
    }


def prefill_once(model: TrustedModel, cfg: ModelConfig, ids: torch.Tensor, chunks: int) -> torch.Tensor:
    return model.prefill(ids, KVCache(cfg, ids.numel()), chunks)


def run(args) -> dict:
    stats = Stats()
    ids_arg = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    tokens = len(ids_arg) if ids_arg else args.tokens
    offload, cfg, norms = open_offload(args, stats, tokens)
    try:
        where = "in-process (--local)" if args.local else f"{args.endpoint} ({transport_of(args.endpoint).upper()}, " \
                f"{args.transport})"
        console.print(f"Connected to {where}: {cfg.num_layers} layers, dtype {P_name(offload.dtype)}, "
                      f"policy {args.policy}, {torch.get_num_threads()} threads")
        ids = torch.tensor(ids_arg) if ids_arg else fixed_prompt(cfg, tokens)
        check_ids(cfg, ids)
        model = TrustedModel(cfg, norms, offload, args.policy, stats)
        if not args.no_warmup:
            prefill_once(model, cfg, ids[: min(16, tokens)], 1)
            prefill_once(model, cfg, ids, args.chunks)
        stats.reset()
        t0 = time.perf_counter()
        logits = prefill_once(model, cfg, ids, args.chunks)
        stats.total_s = time.perf_counter() - t0
        result = {"settings": settings_of(args, offload, tokens), "stats": stats.to_dict(),
                  "argmax": int(logits.argmax())}
    finally:
        offload.close()
    stats.print(f"tsqp run: prefill of {tokens} tokens")
    console.print(f"next token (argmax): {result['argmax']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        console.print(f"wrote {args.json}")
    if args.dump_logits:
        np.save(args.dump_logits, logits.numpy().astype(np.float32))
        console.print(f"wrote {args.dump_logits}")
    return result


def P_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
