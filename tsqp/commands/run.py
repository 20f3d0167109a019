"""`tsqp run`: connect (or build the compute in-process), run one prefill or generate, report the statistics."""
from __future__ import annotations

import sys
import time

import torch
from rich.console import Console

from ..config import ModelConfig
from ..trusted.generate import Sampling, add_rows, check_length, check_logits, generate, generation_stats
from ..trusted.model import TrustedModel
from .files import write_json, write_npy
from ..stats import Stats
from ..wire.transport import transport_of
from .attested import describe, provider_of, run_evidence
from .engine import (P_name, attn_dtype, build_model, check_ids, open_chat_template, open_offload,
                     open_tokenizer, where)

console = Console(highlight=False)


def fixed_prompt(cfg: ModelConfig, n: int) -> torch.Tensor:
    """The same n token ids on every run and in every mode, so runs compare: a public benchmark prompt,
    seeded on purpose (pads and secrets come from protect/pads.py's ChaCha20 keyed by os.urandom)."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, cfg.vocab_size, (n,), generator=g)


def settings_of(args, offload, tokens: int) -> dict:
    remote = not args.local
    info = getattr(offload, "inner", offload).info if remote else {}
    return {
        "model": info["model"] if remote else args.model,
        "dtype": info["dtype"] if remote else args.dtype,
        "device": info["device"] if remote else args.device,
        "protect": getattr(args, "protect", None), "verify": args.verify, "deferred_checks": args.deferred_checks,
        "endpoint": args.endpoint if remote else None,
        "transport": (args.transport if args.transport == "shm" else transport_of(args.endpoint))
        if remote else "local",
        "socket": transport_of(args.endpoint) if remote else None,
        "policy": args.policy, "tokens": tokens, "chunks": args.chunks,
        "attn_dtype": str(attn_dtype(args.attn_dtype, offload.dtype)).removeprefix("torch."),
        "threads": torch.get_num_threads(), "compile": getattr(args, "compile", False),
        "control": (getattr(args, "control", "pipes") if args.transport == "shm" else "socket") if remote else None,
        "spin_us": getattr(args, "spin_us", 0.0),
    }


def prefill_once(model: TrustedModel, cfg: ModelConfig, ids: torch.Tensor, chunks: int) -> torch.Tensor:
    logits = model.prefill(ids, model.new_cache(ids.numel()), chunks)
    return check_logits(logits, f"the prefill of {ids.numel()} tokens")


def run(args) -> dict:
    if args.max_new_tokens is not None or args.prompt is not None or args.chat is not None:
        return run_generation(args)
    provider = provider_of(args)
    stats = Stats()
    ids_arg = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    tokens = len(ids_arg) if ids_arg else args.tokens
    offload, cfg, norms = open_offload(args, stats, tokens)
    try:
        console.print(f"Connected to {where(args)}: {cfg.num_layers} layers, dtype {P_name(offload.dtype)}, "
                      f"policy {args.policy}, {torch.get_num_threads()} threads")
        ids = torch.tensor(ids_arg) if ids_arg else fixed_prompt(cfg, tokens)
        check_ids(cfg, ids)
        model = build_model(args, cfg, norms, offload, stats)
        if not args.no_warmup:
            prefill_once(model, cfg, ids[: min(16, tokens)], 1)
            prefill_once(model, cfg, ids, args.chunks)
        stats.reset()
        t0 = time.perf_counter()
        logits = prefill_once(model, cfg, ids, args.chunks)
        stats.total_s = time.perf_counter() - t0
        result = {"settings": settings_of(args, offload, tokens), "stats": stats.to_dict(),
                  "argmax": int(logits.argmax())}
        if hasattr(offload, "report"):
            result["protection"] = offload.report()
        if provider is not None:
            console.print(describe(args.attest, provider))
            result["attestation"] = run_evidence(args, provider, offload,
                                                 {"prompt_ids": ids.tolist(), "argmax": result["argmax"]})
    finally:
        offload.close()
    stats.print(f"tsqp run: prefill of {tokens} tokens")
    console.print(f"next token (argmax): {result['argmax']}")
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    if args.dump_logits:
        console.print(f"wrote {write_npy(args.dump_logits, logits.numpy().astype('float32'))}")
    return result


# ---- generation: `tsqp run --max-new-tokens N [--prompt TEXT | --prompt-ids 1,2,3]` -----------------------
DEFAULT_NEW_TOKENS = 128     # for --prompt without --max-new-tokens


def warm_up(model: TrustedModel, ids: torch.Tensor, chunks: int) -> None:
    cache = model.new_cache(ids.numel() + 2)
    token = int(check_logits(model.prefill(ids, cache, chunks), "the warm-up prefill").argmax())
    for step in range(2):
        token = int(check_logits(model.decode(token, cache), f"warm-up decode step {step + 1}").argmax())


def run_generation(args) -> dict:
    """Prefill the prompt into a KV cache held here, decode token by token, stream the text, report."""
    if sum(x is not None for x in (args.prompt, args.prompt_ids, args.chat)) > 1:
        raise ValueError("give one of --prompt, --chat or --prompt-ids")
    sampling = Sampling.make(args.temperature, args.top_k, args.top_p, args.seed)
    provider = provider_of(args)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_NEW_TOKENS
    tokenizer = open_tokenizer(args)
    stop_ids = None
    if args.chat is not None:
        template = open_chat_template(args, tokenizer)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.chat}]
        ids_arg, stop_ids = template.prompt_ids(tokenizer, messages), template.stop_ids
    elif args.prompt is not None:
        ids_arg = tokenizer.encode(args.prompt)
    else:
        ids_arg = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    tokens = len(ids_arg) if ids_arg is not None else args.tokens
    stats = Stats()
    offload, cfg, norms = open_offload(args, stats, tokens, max_new)    # the arena: room for the longest step
    try:
        console.print(f"Connected to {where(args)}: {cfg.num_layers} layers, dtype {P_name(offload.dtype)}, "
                      f"policy {args.policy}, {torch.get_num_threads()} threads")
        ids = torch.tensor(ids_arg, dtype=torch.long) if ids_arg is not None else fixed_prompt(cfg, tokens)
        check_ids(cfg, ids)
        check_length(cfg, ids.numel(), max_new)
        model = build_model(args, cfg, norms, offload, stats)
        if not args.no_warmup:
            warm_up(model, ids, args.chunks)
        stats.reset()
        shown = args.chat if args.chat is not None else args.prompt if args.prompt is not None else ",".join(map(str, ids.tolist())) if ids_arg else "fixed"
        print(f"Prompt ({tokens} tokens): {shown}", flush=True)
        stream = tokenizer.stream() if tokenizer else None
        pieces = []

        def show(token: int, logits: torch.Tensor) -> None:
            piece = stream.step(token) if stream else f"{token} "
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        gen = generate(model, ids, max_new, sampling, stats, args.ignore_eos, args.chunks, on_token=show,
                       stop_ids=stop_ids)
        if stream:
            pieces.append(stream.flush())
            sys.stdout.write(pieces[-1])
        print(f"\n-- {len(gen.ids)} new tokens, stop: {gen.stop}", flush=True)
        stats.total_s = gen.total_s
        g = generation_stats(gen)
        settings = settings_of(args, offload, tokens) | {
            "max_new_tokens": max_new, "ignore_eos": args.ignore_eos, "sampling": vars(sampling),
            "tokenizer": str(tokenizer.path) if tokenizer else None}
        result = {"settings": settings, "stats": stats.to_dict() | g, "prompt_ids": ids.tolist(),
                  "generated_ids": gen.ids}
        if hasattr(offload, "report"):
            result["protection"] = offload.report()
        if tokenizer:
            result["text"] = "".join(pieces)
        if provider is not None:
            console.print(describe(args.attest, provider))
            result["attestation"] = run_evidence(args, provider, offload,
                                                 {"prompt_ids": ids.tolist(), "generated_ids": gen.ids})
    finally:
        offload.close()
    console.print(add_rows(stats.table(f"tsqp run: {tokens}-token prompt, {len(gen.ids)} new tokens"), g))
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    return result
