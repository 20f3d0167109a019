"""The trusted runner's set-up, shared by `tsqp run` and `tsqp api`: offload sessions opened from the
command's flags (--local, an endpoint, --protect), the TrustedModel on one, and the tokenizer, chat template
and stop ids that turn text into prompt ids and back.

`Offloads` loads what every session of a process shares once (the runner's own checkpoint for --protect, the
in-process compute for --local); `tsqp run` opens one session, `tsqp api` one per worker.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import weights as W
from ..config import ModelConfig
from ..local import LocalOffload
from ..stats import Stats
from ..trusted.chat import ChatTemplate
from ..trusted.model import TrustedModel
from ..trusted.protect.masked import ProtectedOffload, QuantizedModel
from ..trusted.tokenizer import Tokenizer, TokenizerError
from ..untrusted.compute import Compute
from ..untrusted.intmm import IntCompute
from ..wire.client import MiB, Budget, RemoteOffload, default_arena_bytes
from ..wire.hello import Expected
from ..wire.transport import transport_of


def P_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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


def bucketed(tokens: int, bucket: int) -> int:
    """tokens rounded up to a multiple of bucket (--length-bucket)."""
    return -(-tokens // bucket) * bucket


def budget_of(args, tokens: int) -> Budget:
    return Budget(tokens=tokens, seed_policy=args.policy == "seed", max_bytes=args.max_arena_mb * MiB)


# ---- offload sessions ----------------------------------------------------------------------------------
class Offloads:
    """Opens offload sessions from a command's flags; `open` returns (offload, cfg, norms)."""

    def __init__(self, args):
        self.args = args
        self._checkpoint: tuple[ModelConfig, dict] | None = None   # --protect: the runner's own weights
        self._compute = None                                        # --local: the in-process compute
        self._quantized = None                                      # --protect: its quantized form

    def open(self, stats: Stats, tokens: int, new_tokens: int = 0):
        """A session with room for a prompt of `tokens` positions and `new_tokens` generated after it, wrapped
        in the protection when asked for."""
        args = self.args
        if args.deferred_checks and not args.verify:
            raise ValueError("--deferred-checks defers --verify's checks: add --verify (with --protect otp)")
        if getattr(args, "protect", None):
            return self._open_protected(stats, tokens, new_tokens)
        if args.verify:
            raise ValueError("--verify checks masked results: it needs --protect otp")
        if args.length_bucket != 1:
            raise ValueError("--length-bucket pads masked requests: it needs --protect otp")
        if args.local:
            if self._compute is None:
                cfg, weights = W.load(args.model, W.torch_dtype(args.dtype), args.device)
                self._compute = Compute(cfg, weights, args.device), W.norm_weights(weights)
            compute, norms = self._compute
            return LocalOffload(compute, stats), compute.cfg, norms
        arena = args.arena_mb * MiB if args.arena_mb else \
            (lambda cfg: default_arena_bytes(cfg, tokens + new_tokens, args.chunks, args.policy == "seed"))
        remote = self._remote(stats, arena, tokens + new_tokens, own_model(args))
        if remote.dtype == torch.uint8:
            remote.close()
            raise ValueError(f"{args.endpoint} is a protected server (it answers masked x @ W only): run with "
                             f"--protect otp and --model, the runner's own copy of its checkpoint")
        return remote, remote.cfg, remote.norms

    def _remote(self, stats: Stats, arena, tokens: int, expect: Expected | None) -> RemoteOffload:
        args = self.args
        return RemoteOffload(args.endpoint, args.transport, timeout_s=args.timeout,
                             connect_timeout_s=args.connect_timeout, arena_bytes=arena, stats=stats,
                             curve=getattr(args, "curve", None), control=getattr(args, "control", "pipes"),
                             spin_s=getattr(args, "spin_us", 0.0) * 1e-6, expect=expect,
                             budget=budget_of(args, tokens))

    def _open_protected(self, stats: Stats, tokens: int, new_tokens: int):
        """--protect otp: the runner's own checkpoint gives the config, the norms, the embedding and the weights
        to unmask and check with; nothing about the model is taken from the server, whose config and stated
        fingerprint must match ours."""
        args = self.args
        if args.policy != "linear":
            raise ValueError(f"--protect needs --policy linear: attention stays on the trusted side (--policy "
                             f"{args.policy} would send Q, K and V in the clear)")
        if self._checkpoint is None:
            self._checkpoint = W.load(args.model, torch.float32, "cpu")
        cfg, weights = self._checkpoint
        if args.local:
            if self._compute is None:
                self._compute = IntCompute(cfg, weights, args.device)
            inner = LocalOffload(self._compute, stats)
        else:
            # what the server may be sent, padding included: sized from the bucketed prompt, never the prompt
            # itself (the arena's size is in the attach, the receive cap shows in what the runner accepts)
            rows = bucketed(tokens, args.length_bucket) + new_tokens
            arena = args.arena_mb * MiB if args.arena_mb else \
                (lambda c: 2 * default_arena_bytes(c, rows, args.chunks))
            norms = W.norm_weights(weights)
            expect = Expected(W.describe(args.model), cfg, lambda dtype: {k: v.to(dtype) for k, v in norms.items()})
            inner = self._remote(stats, arena, rows, expect)
            try:
                if inner.dtype != torch.uint8:
                    raise ValueError(f"{args.endpoint} is not a protected server (it serves {P_name(inner.dtype)} "
                                     f"in the clear); start it with `tsqp serve --protect otp`")
                if inner.cfg != cfg:
                    raise ValueError(f"the server's model config differs from {args.model}'s: refusing it")
            except BaseException:
                inner.close()
                raise
        if self._quantized is None:
            self._quantized = QuantizedModel(cfg, weights)        # once for all sessions
        offload = ProtectedOffload(inner, cfg, self._quantized, verify=args.verify, pool_tokens=args.pad_pool, stats=stats,
                                   length_bucket=args.length_bucket, deferred_checks=args.deferred_checks)
        try:
            stated = inner.info.get("fingerprint") if not args.local else inner.compute.fingerprint
            offload.expect_fingerprint(stated)
        except BaseException:
            offload.close()
            raise
        return offload, cfg, W.norm_weights(weights)


def open_offload(args, stats: Stats, tokens: int, new_tokens: int = 0):
    """(offload, cfg, norms) for --local or a remote endpoint, wrapped in the protection when asked for."""
    return Offloads(args).open(stats, tokens, new_tokens)


def where(args) -> str:
    """Where the compute runs, for the 'Connected to' line."""
    if args.local:
        return "in-process (--local)"
    return f"{args.endpoint} ({transport_of(args.endpoint).upper()}, {args.transport})"


# ---- the model on a session ----------------------------------------------------------------------------
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


def build_model(args, cfg: ModelConfig, norms: dict, offload, stats: Stats) -> TrustedModel:
    return TrustedModel(cfg, norms, offload, args.policy, stats, attn_dtype(args.attn_dtype, offload.dtype),
                        fused=getattr(args, "compile", False))


# ---- text: tokenizer, chat template, stop ids ------------------------------------------------------------
def tokenizer_source(args) -> str | None:
    """--tokenizer, else the runner's own --model (never a path the server names: the tokenizer is part of the
    trusted side); None for a random preset."""
    return args.tokenizer or (None if args.model.startswith("random:") else args.model)


def open_tokenizer(args, required: bool | None = None) -> Tokenizer | None:
    """The runner's tokenizer. required (default: when --prompt or --chat is given): a missing one is an error;
    otherwise it is used only where one is found."""
    source = tokenizer_source(args)
    if required is None:
        required = getattr(args, "prompt", None) is not None or getattr(args, "chat", None) is not None
    if not required:
        found = source is not None and (args.tokenizer or source.endswith(".gguf")
                                        or (Path(source) / "tokenizer.json").is_file())
        return Tokenizer(source) if found else None
    if source is None:
        raise TokenizerError(f"text prompts (--prompt, --chat, tsqp api) need a tokenizer: pass --tokenizer PATH (a "
                             f"tokenizer.json or a model directory) or --model DIR (env LLAMA_MODEL_PATH); the model "
                             f"is {args.model}, which has none (use --prompt-ids)")
    return Tokenizer(source)


def open_chat_template(args, tokenizer: Tokenizer) -> ChatTemplate:
    """The model's chat template (from --tokenizer or --model); its stop_ids end the assistant's turn."""
    return ChatTemplate.from_source(tokenizer_source(args) or args.model, tokenizer)
