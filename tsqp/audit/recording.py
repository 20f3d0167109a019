"""Read a recording written by `tsqp.untrusted.record` (the format is drawn there): sessions, their calls in
order, tensors as torch tensors in their recorded dtype. Tensors are read lazily (each when asked for), so
a recording larger than memory can be audited. Nothing is unpickled: np.load(allow_pickle=False)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "uint16": torch.uint16, "uint32": torch.uint32, "uint64": torch.uint64, "bool": torch.bool,
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+\.npy$")


class RecordingError(ValueError):
    """A recording that does not follow the format; the message names the file and line."""


@dataclass(frozen=True)
class TensorRef:
    """One recorded tensor: where it is and what it is; .load() reads it."""
    path: Path
    dtype: str
    shape: tuple[int, ...]

    def load(self) -> torch.Tensor:
        array = np.load(self.path, allow_pickle=False)
        if tuple(array.shape) != self.shape:
            raise RecordingError(f"{self.path}: shape {array.shape}, the index says {list(self.shape)}")
        t = torch.from_numpy(array)
        if self.dtype == "bfloat16":
            return t.view(torch.bfloat16)
        if t.dtype != TORCH_DTYPES[self.dtype]:
            raise RecordingError(f"{self.path}: stored as {array.dtype}, the index says {self.dtype}")
        return t

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


@dataclass
class RecordedCall:
    seq: int
    op: str
    layer: int | None
    rid: object
    header: dict
    input_refs: list[TensorRef]
    output_ref: TensorRef | None

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [r.load() for r in self.input_refs]

    @property
    def output(self) -> torch.Tensor | None:
        return None if self.output_ref is None else self.output_ref.load()

    def input(self, i: int = 0) -> torch.Tensor:
        return self.input_refs[i].load()


@dataclass
class RecordedSession:
    path: Path
    label: str
    meta: dict
    calls: list[RecordedCall] = field(default_factory=list)


def _ref(folder: Path, entry, where: str) -> TensorRef:
    if not isinstance(entry, dict):
        raise RecordingError(f"{where}: tensor entry is not an object")
    name, dtype, shape = entry.get("file"), entry.get("dtype"), entry.get("shape")
    if not isinstance(name, str) or not SAFE_NAME.match(name):     # no paths out of the session folder
        raise RecordingError(f"{where}: bad tensor file name {name!r}")
    if dtype not in TORCH_DTYPES:
        raise RecordingError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise RecordingError(f"{where}: bad shape {shape!r}")
    return TensorRef(folder / name, dtype, tuple(shape))


def load_session(folder: Path) -> RecordedSession:
    folder = Path(folder)
    meta_file, index = folder / "session.json", folder / "index.jsonl"
    if not index.is_file():
        raise RecordingError(f"{index}: not found")
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    session = RecordedSession(folder, meta.get("label", folder.name), meta)
    with open(index) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{index}:{n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordingError(f"{where}: not JSON ({e})") from None
            out = d.get("output")
            session.calls.append(RecordedCall(
                seq=d["seq"], op=d["op"], layer=d.get("layer"), rid=d.get("id"), header=d.get("header") or {},
                input_refs=[_ref(folder, e, where) for e in d.get("inputs", [])],
                output_ref=None if out is None else _ref(folder, out, where)))
    session.calls.sort(key=lambda c: c.seq)
    return session


def load(path: str | Path) -> list[RecordedSession]:
    """Every session under a recording folder, in the order they were opened (a session folder works too)."""
    path = Path(path)
    if (path / "index.jsonl").is_file():
        return [load_session(path)]
    if not path.is_dir():
        raise RecordingError(f"{path}: not a recording folder")
    folders = sorted(p for p in path.iterdir() if p.is_dir() and (p / "index.jsonl").is_file())
    if not folders:
        raise RecordingError(f"{path}: no session folders (each holds an index.jsonl)")
    return [load_session(p) for p in folders]
