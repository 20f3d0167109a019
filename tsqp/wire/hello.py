"""The runner's reading of a server's `welcome` (its answer to the hello), which the runner treats as hostile.

    welcome (JSON)                                          then one raw frame per norm weight
    {"type": "welcome", "dtype": "float32" | "float16" | "bfloat16" | "uint8" (protected),
     "config": {ModelConfig fields}, "model": str, "device": str, "fingerprint": str | null,
     "norms": [names], "tensors": [{"dtype", "shape"} per name], ...}

Every field is checked for type, range and consistency before anything is sized from it: the config against
the runner's own limits (config.PEER_LIMITS), the norms for names, count, dtype, shape and finiteness, the
frames for count and size. A runner with its own copy of the model (`Expected`) takes neither config nor norms
from the server: the server's must equal its own exactly, or the runner refuses, naming the field and both
values. Any fault is a `HelloError` whose message names it (one line: the caller adds the endpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import ConfigError, ModelConfig, shown
from ..weights import norm_names
from . import protocol as P

WIRES = ("float32", "float16", "bfloat16", "uint8")   # uint8: a protected server (masked limbs in, int64 out)
MAX_TEXT = 256                                         # the model and device names, as shown to the user
MAX_FINGERPRINT = 128


class HelloError(ValueError):
    """A welcome the runner cannot accept; the message names the field."""


@dataclass(frozen=True)
class Expected:
    """A runner's own copy of the model: the server must serve exactly this. norms(dtype) gives the runner's
    own norm weights in the dtype the server sends them in."""
    source: str
    cfg: ModelConfig
    norms: Callable[[torch.dtype], dict[str, torch.Tensor]]


@dataclass
class Welcome:
    cfg: ModelConfig
    dtype: torch.dtype                   # the wire dtype
    norms: dict[str, torch.Tensor]       # name -> [D], copied out of the frames
    info: dict                           # model, dtype, device, fingerprint: checked, printable


def norm_dtype(wire: str) -> str:
    """A protected server sends its float32 norms; others send them in the wire dtype."""
    return "float32" if wire == "uint8" else wire


def printable(text: str, limit: int = MAX_TEXT) -> str:
    """A peer's text made safe to print: no control characters (terminal escapes), bounded length."""
    text = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return text + ("..." if len(text) == limit else "")


def text_field(head: dict, name: str) -> str:
    value = head.get(name)
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise HelloError(f"field '{name}' is {shown(value)}; expected a string of at most {MAX_TEXT} characters")
    return printable(value)


def read_welcome(head: dict, frames: list, expect: Expected | None = None) -> Welcome:
    """head: the decoded JSON; frames: the raw frames after it."""
    if head.get("type") != "welcome":
        raise HelloError(f"a {shown(head.get('type'))} message where a welcome was expected")
    wire = head.get("dtype")
    if wire not in WIRES:
        raise HelloError(f"field 'dtype' is {shown(wire)}; expected one of {', '.join(WIRES)}")
    pid = head.get("pid")           # server_alive() compares it: a restarted server is another process
    info = {"model": text_field(head, "model"), "dtype": wire, "device": text_field(head, "device"),
            "fingerprint": head.get("fingerprint"),
            "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None}
    fp = info["fingerprint"]
    if fp is not None and (not isinstance(fp, str) or not 0 < len(fp) <= MAX_FINGERPRINT
                           or any(c not in "0123456789abcdef" for c in fp)):
        raise HelloError(f"field 'fingerprint' is {shown(fp)}; expected null or at most {MAX_FINGERPRINT} hex digits")
    try:
        cfg = ModelConfig.from_peer(head.get("config"), "field 'config'")
    except ConfigError as e:
        raise HelloError(str(e)) from None
    norms = read_norms(head, frames, cfg, norm_dtype(wire))
    if expect is not None:
        cfg, norms = match_expected(expect, cfg, norms, norm_dtype(wire))
    return Welcome(cfg, P.WIRE_DTYPES[wire], norms, info)


def read_norms(head: dict, frames: list, cfg: ModelConfig, dtype: str) -> dict[str, torch.Tensor]:
    """The norm weights: exactly the config's names, each [D] in `dtype`, finite, one frame each."""
    names, metas = head.get("norms"), head.get("tensors")
    want = norm_names(cfg)
    if not isinstance(names, list) or len(names) != len(want) or sorted(map(str, names)) != sorted(want):
        raise HelloError(f"field 'norms' is {shown(names)}; expected the {len(want)} norm weights of a "
                         f"{cfg.num_layers}-layer model")
    if not isinstance(metas, list) or len(metas) != len(names):
        raise HelloError(f"field 'tensors' is {shown(metas)}; expected one tensor meta per norm ({len(names)})")
    if len(frames) != len(names):
        raise HelloError(f"{len(frames)} tensor frame(s) for {len(names)} norm weights")
    norms = {}
    for name, m, frame in zip(names, metas, frames):
        try:
            meta = P.meta_from_json(m)
        except P.ProtocolError as e:
            raise HelloError(f"norm {name}: {e}") from None
        if (meta.dtype, meta.shape) != (dtype, (cfg.hidden_size,)):
            raise HelloError(f"norm {name} is {meta.dtype}{list(meta.shape)}; expected {dtype}[{cfg.hidden_size}]")
        try:
            t = P.tensor_from_frame(meta, frame).clone()       # [D], out of the frame's memory
        except P.ProtocolError as e:
            raise HelloError(f"norm {name}: {e}") from None
        if not torch.isfinite(t).all():
            raise HelloError(f"norm {name} holds non-finite values (NaN or inf)")
        norms[name] = t
    return norms


def match_expected(expect: Expected, cfg: ModelConfig, norms: dict[str, torch.Tensor],
                   dtype: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The runner's own config and norms, after checking that the server's equal them bit for bit."""
    for name, ours, theirs in expect.cfg.differences(cfg):
        raise HelloError(f"the server's model differs from {expect.source}: field '{name}' is {shown(theirs)} "
                         f"there, {shown(ours)} here; refusing it")
    own = expect.norms(P.WIRE_DTYPES[dtype])
    for name, theirs in norms.items():
        ours = own[name]
        if ours.dtype != theirs.dtype or not torch.equal(ours, theirs):     # both finite: equal values, equal bits
            differ = (ours.float() != theirs.float()).nonzero() if ours.shape == theirs.shape else []
            i = int(differ[0]) if len(differ) else 0
            raise HelloError(f"the server's model differs from {expect.source}: norm {name}[{i}] is "
                             f"{float(theirs[i])!r} there, {float(ours[i])!r} here; refusing it")
    return expect.cfg, {k: own[k] for k in norms}
