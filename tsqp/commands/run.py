"""`tsqp run`: connect (or build the compute in-process), run one prefill or generate, report the statistics."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from .. import weights as W
from ..untrusted.compute import Compute
from ..config import ModelConfig
from ..trusted.generate import Sampling, add_rows, check_length, check_logits, generate, generation_stats
from ..trusted.model import TrustedModel
from ..local import LocalOffload
from ..wire.client import MiB, Budget, RemoteOffload, default_arena_bytes
from ..wire.hello import Expected
from .files import write_json, write_npy
from ..stats import Stats
from ..trusted.chat import ChatTemplate
from ..trusted.protect.masked import ProtectedOffload
from ..untrusted.intmm import IntCompute
from ..trusted.tokenizer import Tokenizer, TokenizerError
from ..wire.transport import transport_of

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


def own_model(args) -> Expected | None:
    """The runner's own copy of the model (--model a directory or a .gguf file): config, norms and special tokens
    come from it, and the server must serve exactly it. None for a random preset (the server's, once checked)."""
    if args.model.startswith("random:"):
        return None
    return Expected(W.describe(args.model), W.load_config(args.model),
                    lambda dtype: W.load_norms(args.model, dtype)[1])


def budget_of(args, tokens: int) -> Budget:
    return Budget(tokens=tokens, seed_policy=args.policy == "seed", max_bytes=args.max_arena_mb * MiB)


def connect(args, stats: Stats, tokens: int, arena, expect: Expected | None) -> RemoteOffload:
    return RemoteOffload(args.endpoint, args.transport, timeout_s=args.timeout,
                         connect_timeout_s=args.connect_timeout, arena_bytes=arena, stats=stats,
                         curve=getattr(args, "curve", None), control=getattr(args, "control", "pipes"),
                         spin_s=getattr(args, "spin_us", 0.0) * 1e-6, expect=expect, budget=budget_of(args, tokens))


def open_offload(args, stats: Stats, tokens: int):
    """(offload, cfg, norms) for --local or a remote endpoint, wrapped in the protection when asked for."""
    if getattr(args, "protect", None):
        return open_protected(args, stats, tokens)
    if args.verify:
        raise ValueError("--verify checks masked results: it needs --protect otp")
    if args.local:
        dtype = W.torch_dtype(args.dtype)
        cfg, weights = W.load(args.model, dtype, args.device)
        compute = Compute(cfg, weights, args.device)
        norms = W.norm_weights(weights)
        return LocalOffload(compute, stats), cfg, norms
    arena = args.arena_mb * MiB if args.arena_mb else \
        (lambda cfg: default_arena_bytes(cfg, tokens, args.chunks, args.policy == "seed"))
    remote = connect(args, stats, tokens, arena, own_model(args))
    if remote.dtype == torch.uint8:
        remote.close()
        raise ValueError(f"{args.endpoint} is a protected server (it answers masked x @ W only): run with "
                         f"--protect otp and --model, the runner's own copy of its checkpoint")
    return remote, remote.cfg, remote.norms


def open_protected(args, stats: Stats, tokens: int):
    """--protect otp: the runner's own checkpoint gives the config, the norms, the embedding and the weights to
    unmask and check with; nothing about the model is taken from the server, whose config, norms and stated
    fingerprint must match ours."""
    if args.policy != "linear":
        raise ValueError(f"--protect needs --policy linear: attention stays on the trusted side (--policy "
                         f"{args.policy} would send Q, K and V in the clear)")
    cfg, weights = W.load(args.model, torch.float32, "cpu")
    if args.local:
        inner = LocalOffload(IntCompute(cfg, weights, args.device), stats)
    else:
        arena = args.arena_mb * MiB if args.arena_mb else (lambda c: 2 * default_arena_bytes(c, tokens, args.chunks))
        norms = W.norm_weights(weights)
        expect = Expected(W.describe(args.model), cfg, lambda dtype: {k: v.to(dtype) for k, v in norms.items()})
        inner = connect(args, stats, tokens, arena, expect)
        if inner.dtype != torch.uint8:
            inner.close()
            raise ValueError(f"{args.endpoint} is not a protected server (it serves {P_name(inner.dtype)} "
                             f"in the clear); start it with `tsqp serve --protect otp`")
    offload = ProtectedOffload(inner, cfg, weights, verify=args.verify, pool_tokens=args.pad_pool, stats=stats)
    try:
        stated = inner.info.get("fingerprint") if not args.local else inner.compute.fingerprint
        offload.expect_fingerprint(stated)
    except BaseException:
        offload.close()
        raise
    return offload, cfg, W.norm_weights(weights)


def cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def attn_dtype(choice: str, wire: torch.dtype) -> torch.dtype:
    """Chosen by measurement: bf16 attention only pays where AMX runs bf16 matmuls; elsewhere fp32."""
    if choice == "auto":
        return torch.bfloat16 if wire == torch.bfloat16 and cpu_has_amx() else torch.float32
    return W.torch_dtype(choice)


def settings_of(args, offload, tokens: int) -> dict:
    remote = not args.local
    info = getattr(offload, "inner", offload).info if remote else {}
    return {
        "model": info["model"] if remote else args.model,
        "dtype": info["dtype"] if remote else args.dtype,
        "device": info["device"] if remote else args.device,
        "protect": getattr(args, "protect", None), "verify": args.verify,
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
        model = TrustedModel(cfg, norms, offload, args.policy, stats, attn_dtype(args.attn_dtype, offload.dtype),
                             fused=getattr(args, "compile", False))
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
    finally:
        offload.close()
    stats.print(f"tsqp run: prefill of {tokens} tokens")
    console.print(f"next token (argmax): {result['argmax']}")
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    if args.dump_logits:
        console.print(f"wrote {write_npy(args.dump_logits, logits.numpy().astype('float32'))}")
    return result


def P_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- generation: `tsqp run --max-new-tokens N [--prompt TEXT | --prompt-ids 1,2,3]` -----------------------
DEFAULT_NEW_TOKENS = 128     # for --prompt without --max-new-tokens


def open_tokenizer(args) -> Tokenizer | None:
    """From --tokenizer, else the runner's own --model directory (never a path the server names: the
    tokenizer is part of the trusted side). Required for --prompt; with ids, used only where one is found."""
    source = args.tokenizer or (None if args.model.startswith("random:") else args.model)
    if args.prompt is None and args.chat is None:
        found = source is not None and (args.tokenizer or source.endswith(".gguf")
                                        or (Path(source) / "tokenizer.json").is_file())
        return Tokenizer(source) if found else None
    if source is None:
        raise TokenizerError(f"--prompt and --chat need a tokenizer: pass --tokenizer PATH (a tokenizer.json or a model "
                             f"directory) or --model DIR (env LLAMA_MODEL_PATH); the model is {args.model}, "
                             f"which has none (use --prompt-ids)")
    return Tokenizer(source)


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
    max_new = args.max_new_tokens if args.max_new_tokens is not None else DEFAULT_NEW_TOKENS
    tokenizer = open_tokenizer(args)
    stop_ids = None
    if args.chat is not None:
        template = ChatTemplate.from_source(args.tokenizer or args.model, tokenizer)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.chat}]
        ids_arg, stop_ids = template.prompt_ids(tokenizer, messages), template.stop_ids
    elif args.prompt is not None:
        ids_arg = tokenizer.encode(args.prompt)
    else:
        ids_arg = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    tokens = len(ids_arg) if ids_arg is not None else args.tokens
    stats = Stats()
    offload, cfg, norms = open_offload(args, stats, tokens + max_new)   # the arena: room for the longest step
    try:
        where = "in-process (--local)" if args.local else f"{args.endpoint} ({transport_of(args.endpoint).upper()}, " \
                f"{args.transport})"
        console.print(f"Connected to {where}: {cfg.num_layers} layers, dtype {P_name(offload.dtype)}, "
                      f"policy {args.policy}, {torch.get_num_threads()} threads")
        ids = torch.tensor(ids_arg, dtype=torch.long) if ids_arg is not None else fixed_prompt(cfg, tokens)
        check_ids(cfg, ids)
        check_length(cfg, ids.numel(), max_new)
        model = TrustedModel(cfg, norms, offload, args.policy, stats, attn_dtype(args.attn_dtype, offload.dtype),
                             fused=getattr(args, "compile", False))
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
    finally:
        offload.close()
    console.print(add_rows(stats.table(f"tsqp run: {tokens}-token prompt, {len(gen.ids)} new tokens"), g))
    if args.json:
        console.print(f"wrote {write_json(args.json, result)}")
    return result
