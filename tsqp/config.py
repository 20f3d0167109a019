"""Model blueprint: a dataclass, named presets, and the mapping from a Hugging Face config.json."""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path


class ConfigError(ValueError):
    """A model config that tsqp cannot run; the message names the file and the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int          # D
    intermediate_size: int    # I
    num_layers: int           # L
    num_heads: int            # H
    num_kv_heads: int         # KV
    head_dim: int             # hd
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "llama3", "factor": .., ...} or None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**d)

    @classmethod
    def from_peer(cls, d, source: str = "the server's config") -> "ModelConfig":
        """A config another process sent (a server's hello): every field checked for type, range and
        consistency against this side's own limits (PEER_LIMITS) before anything is sized from it."""
        return check_peer_config(d, source)

    def differences(self, other: "ModelConfig") -> list[tuple[str, object, object]]:
        """(field, ours, theirs) for each field where the two configs differ."""
        return [(f.name, getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Map a transformers LlamaConfig dict; unsupported models fail naming the field."""
        def need(key):
            if key not in hf:
                raise ConfigError(f"{source}: missing field '{key}'")
            return hf[key]

        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama",):
            raise ConfigError(f"{source}: field 'model_type' is '{model_type}', only 'llama' is supported")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' is '{act}', only 'silu' is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"{source}: field '{flag}' is true; biases are not supported")
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // heads
        scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        params = hf.get("rope_parameters")  # transformers >= 5 moves theta and scaling here
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                scaling = params
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind in (None, "default"):
                scaling = None
            elif kind != "llama3":
                raise ConfigError(f"{source}: field 'rope_scaling' has type '{kind}', only 'llama3' is supported")
            else:
                scaling = {k: scaling[k] for k in
                           ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
                scaling["rope_type"] = "llama3"
        eos = hf.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        cfg = cls(
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(f"{source}: field 'num_key_value_heads' ({cfg.num_kv_heads}) "
                              f"does not divide 'num_attention_heads' ({cfg.num_heads})")
        return cfg

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{file}: not found (expected a Hugging Face model directory)")
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf(hf, str(file))


# What a runner accepts from a peer, whatever the peer says: beyond these it refuses before allocating anything.
# Far above any llama model (Llama-3.1-405B: vocab 128256, hidden 16384, intermediate 53248, 126 layers).
PEER_LIMITS = {"vocab_size": 2**20, "hidden_size": 65536, "intermediate_size": 2**18, "num_layers": 1024,
               "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024, "max_position_embeddings": 2**24}
MAX_Q_SIZE = 2**17          # num_heads * head_dim
MAX_EOS_IDS = 64
SCALING_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def shown(value, limit: int = 60) -> str:
    """A peer's value in an error message: its repr, cut short (a hello may hold 64 KiB of anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_peer_config(d, source: str) -> ModelConfig:
    """See ModelConfig.from_peer; ConfigError names the field, what it holds and what is allowed."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source} is {shown(d)}, not an object")
    names = [f.name for f in fields(ModelConfig)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(f"{source}: unknown field {shown(unknown[0])}")
    missing = [n for n in names if n not in d]
    if missing:
        raise ConfigError(f"{source}: missing field '{missing[0]}'")

    def bad(name: str, want: str):
        raise ConfigError(f"{source}: field '{name}' is {shown(d[name])}; expected {want}")

    for name, cap in PEER_LIMITS.items():
        if not is_int(d[name]) or not 1 <= d[name] <= cap:
            bad(name, f"an integer in 1..{cap}")
    V = d["vocab_size"]
    if d["num_heads"] % d["num_kv_heads"]:
        bad("num_kv_heads", f"a divisor of num_heads ({d['num_heads']})")
    if d["head_dim"] % 2:
        bad("head_dim", "an even number (RoPE rotates pairs)")
    if d["num_heads"] * d["head_dim"] > MAX_Q_SIZE:
        bad("head_dim", f"num_heads * head_dim <= {MAX_Q_SIZE}")
    if not is_number(d["rms_norm_eps"]) or not 0 < d["rms_norm_eps"] < 1:
        bad("rms_norm_eps", "a finite number in (0, 1)")
    if not is_number(d["rope_theta"]) or not d["rope_theta"] > 0:
        bad("rope_theta", "a finite positive number")
    if not isinstance(d["tie_word_embeddings"], bool):
        bad("tie_word_embeddings", "true or false")
    if d["bos_token_id"] is not None and (not is_int(d["bos_token_id"]) or not 0 <= d["bos_token_id"] < V):
        bad("bos_token_id", f"null or a token id in 0..{V - 1}")
    eos = d["eos_token_id"]
    if not isinstance(eos, list) or len(eos) > MAX_EOS_IDS or not all(is_int(e) and 0 <= e < V for e in eos):
        bad("eos_token_id", f"a list of at most {MAX_EOS_IDS} token ids in 0..{V - 1}")
    if len(set(eos)) >= V:
        bad("eos_token_id", "some tokens that are not end-of-sequence (these ids cover the whole vocabulary)")
    scaling = check_peer_scaling(d["rope_scaling"], source)
    return ModelConfig(**{**d, "rms_norm_eps": float(d["rms_norm_eps"]), "rope_theta": float(d["rope_theta"]),
                          "rope_scaling": scaling, "eos_token_id": list(eos)})


def check_peer_scaling(s, source: str) -> dict | None:
    """None, or Llama-3 rope scaling with exactly its five fields, each in the range the formula needs."""
    if s is None:
        return None
    where = f"{source}: field 'rope_scaling'"
    if not isinstance(s, dict) or sorted(s) != sorted(SCALING_KEYS):
        raise ConfigError(f"{where} is {shown(s)}; expected null or an object with exactly "
                          f"{', '.join(SCALING_KEYS)}")
    if s["rope_type"] != "llama3":
        raise ConfigError(f"{where}: rope_type is {shown(s['rope_type'])}; only 'llama3' is supported")
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if not is_number(s[k]) or not s[k] > 0:
            raise ConfigError(f"{where}: {k} is {shown(s[k])}; expected a finite positive number")
    if not s["high_freq_factor"] > s["low_freq_factor"]:
        raise ConfigError(f"{where}: high_freq_factor ({s['high_freq_factor']}) must exceed low_freq_factor "
                          f"({s['low_freq_factor']})")
    old = s["original_max_position_embeddings"]
    if not is_int(old) or not 1 <= old <= PEER_LIMITS["max_position_embeddings"]:
        raise ConfigError(f"{where}: original_max_position_embeddings is {shown(old)}; expected an integer in "
                          f"1..{PEER_LIMITS['max_position_embeddings']}")
    return {k: (s[k] if k in ("rope_type", "original_max_position_embeddings") else float(s[k]))
            for k in SCALING_KEYS}


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    # seconds on a laptop CPU; GQA, llama3 rope, head_dim != hidden/heads is covered by the tests' checkpoints
    "tiny": ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=32, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                        max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2]),
    # a CPU-sized model for benchmarks on machines without a GPU
    "small": ModelConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                         num_kv_heads=4, head_dim=64, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                         max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2]),
    # Llama-3.2-1B's exact shapes
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING),
                                max_position_embeddings=131072, tie_word_embeddings=True,
                                bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
}
# Llama-3.2-1B's shapes with 4 of its 16 layers: its per-token costs at a quarter of the memory (a runner and a
# protected server of the full 1B hold ~10 GB each, more than a small shared machine has)
PRESETS["llama-3.2-1b-4layers"] = replace(PRESETS["llama-3.2-1b"], num_layers=4)

DEFAULT_MODEL = "random:tiny"
SQUAT_REMEDY = ("choose another with --endpoint ipc:///A/DIR/OF/YOURS/gpu_server.ipc (env LLAMA_IPC_PATH), or set "
                "XDG_RUNTIME_DIR to a directory of yours with mode 0700")


def runtime_dir() -> Path | None:
    """$XDG_RUNTIME_DIR where the system gives this user one (systemd's /run/user/<uid>): a directory of this
    user's, mode 0700, not a link. No one else can create anything in it, so nothing there can be squatted;
    in /tmp and /dev/shm another user may create tsqp-<uid> first. None when unset or not so."""
    d = os.environ.get("XDG_RUNTIME_DIR")
    if not d or not os.path.isabs(d):
        return None
    try:
        st = os.lstat(d)
    except OSError:
        return None
    ok = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    return Path(d) if ok else None


def default_endpoint() -> str:
    """In a directory of this user alone (0700), which no one else can bind in first (wire/transport.py checks
    it): the runtime directory's tsqp/ where there is one, else /tmp/tsqp-<uid>/."""
    d = runtime_dir()
    return f"ipc://{d}/tsqp/gpu_server.ipc" if d else f"ipc:///tmp/tsqp-{os.getuid()}/gpu_server.ipc"


DEFAULT_ENDPOINT = default_endpoint()
DTYPES = ("float32", "float16", "bfloat16")

# The environment the team already uses; the CLI maps it onto settings through these two names only.
ENV = {"model": "LLAMA_MODEL_PATH", "endpoint": "LLAMA_IPC_PATH", "dtype": "LLAMA_DTYPE",
       "device": "LLAMA_GPU_DEVICE"}


def env_endpoint() -> tuple[str, str]:
    """(endpoint, why): LLAMA_IPC_PATH may be a full endpoint or a bare socket path."""
    value = os.environ.get(ENV["endpoint"])
    if not value:
        return default_endpoint(), "default (LLAMA_IPC_PATH not set)"
    endpoint = value if "://" in value else f"ipc://{value}"
    return endpoint, f"LLAMA_IPC_PATH={value}"
