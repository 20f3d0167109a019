"""A flag that cannot apply is refused, never silently ignored.

Each command's flags are listed here with the condition under which they take effect; a flag given on the
command line where its condition does not hold stops the command before anything is loaded, with one line
naming the flag and why. Flags left at their defaults (or set from the environment) are never refused: only
what the user typed. tests/test_flags.py checks that every flag of `run`, `api`, `serve` and `bench` has a
rule here.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Rule:
    applies: Callable[[argparse.Namespace], bool]
    why: str                    # completes "--flag ..." when it does not apply


def always(_args) -> bool:
    return True


def local(args) -> bool:
    return bool(args.local)


def remote(args) -> bool:
    return not getattr(args, "local", False)


def shm(args) -> bool:
    return remote(args) and args.transport == "shm"


def tcp(args) -> bool:
    return remote(args) and str(args.endpoint).startswith("tcp://")


def curve(args) -> bool:
    """CurveZMQ is in use: a tcp:// endpoint without --insecure."""
    return tcp(args) and not args.insecure


def protected(args) -> bool:
    return args.protect is not None


def generating(args) -> bool:
    """`tsqp run` generates (rather than timing one prefill) with any of these."""
    return args.max_new_tokens is not None or args.prompt is not None or args.chat is not None


def sampling(args) -> bool:
    """Tokens are drawn at random (as trusted.generate.Sampling.make decides): only then does a seed matter."""
    if args.temperature is not None:
        return args.temperature > 0
    return bool(args.top_k) or (args.top_p is not None and args.top_p < 1.0)


NO_SERVER = "has no server to apply to with --local (drop it, or drop --local)"
NOT_LOCAL = ("applies to the in-process compute of --local only; without it the server's "
             "`tsqp serve` flag decides")

RUNNER = {   # `tsqp run` and `tsqp api`: the model, the server, the split and its protection
    "model": Rule(always, ""),
    "device": Rule(local, NOT_LOCAL),
    "dtype": Rule(lambda a: local(a) and (not protected(a) or a.dtype == "float32"),
                  f"{NOT_LOCAL}; with --protect the runner quantizes from float32 (--dtype float32 only)"),
    "endpoint": Rule(remote, NO_SERVER),
    "transport": Rule(remote, NO_SERVER),
    "timeout": Rule(remote, NO_SERVER),
    "connect_timeout": Rule(remote, NO_SERVER),
    "arena_mb": Rule(shm, "sizes the shared-memory arena: it needs --transport shm and a server (no --local)"),
    "max_arena_mb": Rule(remote, NO_SERVER),
    "control": Rule(shm, "says where shared memory's call headers go: it needs --transport shm (no --local)"),
    "spin_us": Rule(lambda a: shm(a) and a.control == "pipes",
                    "polls the control pipes: it needs --transport shm with --control pipes (no --local)"),
    "keys": Rule(curve, "holds CurveZMQ keys, used only for a tcp:// endpoint without --insecure"),
    "server_key": Rule(curve, "is a CurveZMQ key, used only for a tcp:// endpoint without --insecure"),
    "client_key": Rule(curve, "is a CurveZMQ key, used only for a tcp:// endpoint without --insecure"),
    "insecure": Rule(tcp, "turns off CurveZMQ, which only tcp:// endpoints use"),
    "local": Rule(always, ""),
    "policy": Rule(lambda a: not protected(a) or a.policy == "linear",
                   "other than linear sends Q, K and V in the clear: --protect needs --policy linear"),
    "protect": Rule(always, ""),
    "verify": Rule(protected, "checks masked results: it needs --protect otp"),
    "deferred_checks": Rule(lambda a: protected(a) and a.verify,
                            "defers --verify's checks: add --verify (with --protect otp)"),
    "length_bucket": Rule(protected, "pads masked requests: it needs --protect otp"),
    "pad_pool": Rule(protected, "sizes the one-time pads' pool: it needs --protect otp"),
    "compile": Rule(always, ""),
    "attn_dtype": Rule(always, ""),
    "chunks": Rule(always, ""),
    "threads": Rule(always, ""),
    "attest": Rule(always, ""),
}

NEEDS_GENERATION = "applies to generation only: add --max-new-tokens N, --prompt or --chat"

RUN = RUNNER | {
    "tokens": Rule(lambda a: a.prompt_ids is None and a.prompt is None and a.chat is None,
                   "sets the fixed prompt's length: --prompt-ids, --prompt and --chat bring their own"),
    "prompt_ids": Rule(lambda a: a.prompt is None and a.chat is None, "and --prompt/--chat: give one of them"),
    "prompt": Rule(lambda a: a.chat is None, "and --chat: give one of them"),
    "chat": Rule(always, ""),
    "system": Rule(lambda a: a.chat is not None, "is a chat's system message: it needs --chat"),
    "tokenizer": Rule(generating, NEEDS_GENERATION + " (one prefill decodes no text)"),
    "max_new_tokens": Rule(always, ""),
    "temperature": Rule(generating, NEEDS_GENERATION),
    "top_k": Rule(generating, NEEDS_GENERATION),
    "top_p": Rule(generating, NEEDS_GENERATION),
    "seed": Rule(lambda a: generating(a) and sampling(a),
                 "seeds sampling: it needs generation that samples (--temperature > 0, or --top-k/--top-p)"),
    "ignore_eos": Rule(generating, NEEDS_GENERATION),
    "json": Rule(always, ""),
    "dump_logits": Rule(lambda a: not generating(a),
                        "writes one prefill's logits: it does not apply to generation (--max-new-tokens, "
                        "--prompt, --chat); use --json for the generated ids"),
    "no_warmup": Rule(always, ""),
}

NOT_UNIX = "names a tcp listener: --unix listens on a unix socket instead (drop one)"

API = RUNNER | {name: Rule(always, "") for name in (
    "tokenizer", "model_name", "api_key", "max_batch", "max_step_tokens", "kv_budget_mb", "queue", "max_tokens",
    "session_idle", "unix", "max_connections", "header_timeout", "body_timeout")} | {
    "chunks": Rule(lambda a: False, "interleaves one prompt's prefill: tsqp api's engine cuts prompts into chunks "
                                    "of --max-step-tokens itself (drop it)"),
    "reconnect_after_verification_failure": Rule(lambda a: protected(a) and a.verify,
                                                 "applies to servers caught by --verify: add --protect otp --verify"),
    "host": Rule(lambda a: a.unix is None, NOT_UNIX),
    "port": Rule(lambda a: a.unix is None, NOT_UNIX),
    "api_key_file": Rule(lambda a: a.api_key is None, "and --api-key: give one of them"),
    "tls_cert": Rule(lambda a: a.tls_key is not None, "needs --tls-key (they go together)"),
    "tls_key": Rule(lambda a: a.tls_cert is not None, "needs --tls-cert (they go together)"),
}


def ipc(args) -> bool:
    return str(args.endpoint).startswith("ipc://")


SERVE = {name: Rule(always, "") for name in (
    "model", "device", "endpoint", "max_sessions", "max_sessions_per_user", "max_request_mb", "max_message_mb",
    "max_queued_mb", "max_arena_mb", "threads", "record", "protect")} | {
    "dtype": Rule(lambda a: not protected(a) or a.dtype == "float32",
                  "does not apply with --protect: the server quantizes 12-bit weights from float32 (--dtype "
                  "float32 only)"),
    "inject_faults": Rule(protected, "alters masked results: it needs --protect otp"),
    "idle_timeout": Rule(tcp, "applies to tcp:// sessions only (an ipc:// session ends when its connection closes)"),
    "keys": Rule(curve, "holds CurveZMQ keys, used only for a tcp:// endpoint without --insecure"),
    "server_key": Rule(curve, "is a CurveZMQ key, used only for a tcp:// endpoint without --insecure"),
    "allow": Rule(curve, "lists CurveZMQ client keys, used only for a tcp:// endpoint without --insecure"),
    "insecure": Rule(tcp, "turns off CurveZMQ, which only tcp:// endpoints use"),
    "public": Rule(tcp, "allows a wildcard tcp bind: it needs a tcp:// endpoint"),
    "spin_us": Rule(ipc, "polls shared memory's control pipes, which only ipc:// endpoints have"),
}

def polls_pipes(args) -> bool:
    """`tsqp bench`: some row goes through shared memory's control pipes (shm, shm-otp*; not shm-socket)."""
    return any(t.strip().startswith("shm") and t.strip() != "shm-socket" for t in args.transport.split(","))


def protected_row(args) -> bool:
    """`tsqp bench`: some row of --transport is protected (shm-otp*)."""
    return any("otp" in t for t in args.transport.split(","))


BENCH = {name: Rule(always, "") for name in (
    "model", "device", "tokens", "transport", "dtype", "policy", "chunks", "attn_dtype", "repeat", "warmup",
    "decode", "endpoint", "timeout", "threads", "compile", "no_references", "json", "plot")} | {
    "spin_us": Rule(polls_pipes, "polls the control pipes: it needs a shm or shm-otp* row in --transport"),
    "pad_rate": Rule(protected_row, "measures the protected rows' pad pool: it needs a shm-otp* row in --transport"),
    "sustained": Rule(protected_row, "times protected prefills: it needs a shm-otp* row in --transport"),
}

RULES = {"run": RUN, "api": API, "serve": SERVE, "bench": BENCH}


def suppressed(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser with every default removed, so that a parse holds only what the command line gave."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                suppressed(sub)
        elif action.dest != "help":
            action.default = argparse.SUPPRESS
    return ap


def given(ap: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags written on the command line (ap: a fresh parser, changed here)."""
    return set(vars(suppressed(ap).parse_args(argv))) - {"command"}


def refuse_inapplicable(args: argparse.Namespace, written: set[str]) -> None:
    """ValueError naming the first written flag that cannot apply to this command line."""
    rules = RULES.get(args.command, {})
    for dest in sorted(written & set(rules)):
        rule = rules[dest]
        if not rule.applies(args):
            raise ValueError(f"--{dest.replace('_', '-')} {rule.why}")
