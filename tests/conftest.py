"""Shared fixtures: small real checkpoints written by transformers, and real `tsqp serve` processes."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# name -> LlamaConfig overrides: GQA and MHA, tied and untied head, llama3 rope and none,
# head_dim different from hidden/heads
CHECKPOINTS = {
    "gqa_llama3_tied": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True,
                            rope_scaling=LLAMA3, rope_theta=500000.0),
    "mha_plain_untied": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),
}


def make_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    # trained-looking norms, so a mistake in applying them shows
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, seed=i, **kw) for i, (name, kw) in enumerate(CHECKPOINTS.items())}


def short_endpoint(tag: str = "s") -> str:
    """A unique ipc endpoint with a short path (unix socket paths are limited to ~100 bytes)."""
    d = tempfile.mkdtemp(prefix="tsqp-t-", dir="/tmp")
    return f"ipc://{d}/{tag}.ipc"


@contextmanager
def serving(model: str, dtype: str = "float32", endpoint: str | None = None, extra: tuple = (),
            timeout_s: float = 60.0):
    """Start `tsqp serve` as a real process; yield (endpoint, process); stop it afterwards."""
    own_dir = endpoint is None
    endpoint = endpoint or short_endpoint()
    cmd = [sys.executable, "-m", "tsqp.cli", "serve", "--model", str(model), "--device", "cpu",
           "--dtype", dtype, "--endpoint", endpoint, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited before ready:\n{''.join(lines)}")
            lines.append(line)
            if "ready" in line:
                break
        else:
            raise RuntimeError(f"server not ready in {timeout_s} s:\n{''.join(lines)}")
        proc.banner = "".join(lines)
        yield endpoint, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        proc.stdout.close()
        if own_dir:
            shutil.rmtree(Path(endpoint.removeprefix("ipc://")).parent, ignore_errors=True)


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: transformers' Llama on the same checkpoint, float32, last position's logits [V]."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0, -1].float()
