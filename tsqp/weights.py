"""Weights: read a Hugging Face directory with safetensors, a GGUF file (gguf_checkpoint.py), or build a
deterministic random preset.

Tensors keep their Hugging Face names; the server fuses what it needs (compute.py), the runner
receives only the norm weights (trusted side).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import gguf_checkpoint
from .checkpoint import check_complete, expected_shapes, layer_names, norm_names  # noqa: F401 (re-exported)
from .config import DTYPES, PRESETS, ConfigError, ModelConfig

DTYPE = {name: getattr(torch, name) for name in DTYPES}     # the one name -> torch dtype map (wire extends it)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPE:
        raise ValueError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPE)}")
    return DTYPE[name]


def describe(spec: str) -> str:
    return spec if spec.startswith("random:") else str(Path(spec).resolve())


def load_config(spec: str) -> ModelConfig:
    if spec.startswith("random:"):
        name = spec.removeprefix("random:").split("@")[0]
        if name not in PRESETS:
            raise ConfigError(f"unknown preset '{spec}'; choose one of "
                              + ", ".join("random:" + p for p in PRESETS))
        return PRESETS[name]
    if spec.lower().endswith(".gguf"):
        return gguf_checkpoint.read_config(spec)
    return ModelConfig.from_dir(Path(spec))


def load(spec: str, dtype: torch.dtype, device: str = "cpu") -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """spec: a model directory, a .gguf file, or 'random:PRESET[@SEED]'."""
    if spec.lower().endswith(".gguf"):
        return gguf_checkpoint.read(spec, dtype, device)
    cfg = load_config(spec)
    if spec.startswith("random:"):
        seed = int(spec.split("@")[1]) if "@" in spec else 0
        # drawn on the CPU whatever the device, so a preset is the same model everywhere
        return cfg, {k: v.to(device) for k, v in random_weights(cfg, dtype, "cpu", seed).items()}
    return cfg, read_safetensors(Path(spec), cfg, dtype, device)


def load_norms(spec: str, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, the norm weights) of a model directory or .gguf file, reading no other tensor."""
    if spec.lower().endswith(".gguf"):
        reader = gguf_checkpoint.open_reader(spec)
        cfg = gguf_checkpoint.config_from_reader(reader)
        return cfg, gguf_checkpoint.weights_from_reader(reader, cfg, dtype, only=set(norm_names(cfg)))
    cfg = load_config(spec)
    if spec.startswith("random:"):
        return cfg, norm_weights(load(spec, dtype)[1])
    return cfg, read_safetensors(Path(spec), cfg, dtype, "cpu", only=set(norm_names(cfg)))


def random_weights(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic for a seed: each tensor draws from its own generator, so order does not matter."""
    weights = {}
    gen = torch.Generator(device=device)
    for k, (name, shape) in enumerate(sorted(expected_shapes(cfg).items())):
        gen.manual_seed(seed * 1_000_003 + k)
        if len(shape) == 1:  # norm weights near 1, as trained models have
            w = 1.0 + 0.1 * torch.randn(shape, generator=gen, device=device)
        else:
            w = 0.02 * torch.randn(shape, generator=gen, device=device)
        weights[name] = w.to(dtype)
    return weights


def read_safetensors(path: Path, cfg: ModelConfig, dtype: torch.dtype, device: str,
                     only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """only: read just these tensors (names from expected_shapes)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{path}: no *.safetensors files found")
    shapes = expected_shapes(cfg)
    if only is not None:
        shapes = {k: v for k, v in shapes.items() if k in only}
    weights = {}
    for file in files:
        if not file.is_file():
            raise ConfigError(f"{file}: listed in the index but not found")
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in shapes:
                    continue  # e.g. rotary inv_freq buffers, or a tied lm_head saved anyway
                t = f.get_tensor(name)
                if tuple(t.shape) != shapes[name]:
                    raise ConfigError(f"{file}: tensor '{name}' has shape {tuple(t.shape)}, "
                                      f"config.json implies {shapes[name]}")
                weights[name] = t.to(device=device, dtype=dtype)
    return check_complete(path, shapes, weights)


def norm_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The RMSNorm weights: what the trusted side needs of a checkpoint besides the offloaded matrices."""
    return {k: v for k, v in weights.items() if k.endswith("norm.weight")}


def n_params(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in weights.values())
