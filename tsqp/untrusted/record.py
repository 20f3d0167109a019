"""What the compute server saw, written to disk: the recording that `tsqp audit` attacks.

`tsqp serve --record DIR` keeps everything the server receives and returns, per runner session, in order,
exactly as it crossed the boundary. Off by default. The format is plain JSON lines and numpy `.npy` files
(np.save with allow_pickle=False; read back with allow_pickle=False), so any tool can read it:

    DIR/                                   0700, owner only
    ├── 0000-<label>/                      one folder per session, numbered in the order they opened (0700)
    │   ├── session.json                   {"format": 1, "label": ..., "started": unix time, ...}
    │   ├── index.jsonl                    one line per call, in the order the server served them:
    │   │     {"seq": 0, "op": "embed", "layer": null, "id": 7,
    │   │      "header": {...the call's JSON header as received...},
    │   │      "inputs": [{"file": "000000-in0.npy", "dtype": "int64", "shape": [37]}],
    │   │      "output": {"file": "000000-out.npy", "dtype": "bfloat16", "shape": [37, 576]}}
    │   ├── 000000-in0.npy                 each tensor as an .npy (0600); bfloat16 is stored as uint16
    │   ├── 000000-out.npy                 (numpy has no bfloat16) and named "bfloat16" in the index
    │   └── ...
    └── 0001-<label>/ ...

`RecordingCompute` wraps a `tsqp.untrusted.compute.Compute` in-process and records each call exactly as a server would
receive and return it; the server's own call handler calls `SessionRecord.call` directly.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from .. import files

FORMAT = 1
FILE_MODE = 0o600

# torch dtype -> (name in the index, numpy dtype the bytes are stored as)
STORED = {
    torch.float32: ("float32", np.float32), torch.float16: ("float16", np.float16),
    torch.bfloat16: ("bfloat16", np.uint16), torch.float64: ("float64", np.float64),
    torch.int64: ("int64", np.int64), torch.int32: ("int32", np.int32), torch.int16: ("int16", np.int16),
    torch.int8: ("int8", np.int8), torch.uint8: ("uint8", np.uint8), torch.uint16: ("uint16", np.uint16),
    torch.uint32: ("uint32", np.uint32), torch.uint64: ("uint64", np.uint64), torch.bool: ("bool", np.bool_),
}
# a stored dtype whose bytes numpy reads as another dtype: view them back as this torch dtype
VIEW_AS = {"bfloat16": torch.bfloat16}


def open_private(path: Path, mode: str = "wb"):
    """A new file readable by its owner only; never follows a link, never reuses a file already there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    if "a" in mode:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, FILE_MODE)
    return os.fdopen(fd, mode)


def to_numpy(t: torch.Tensor) -> tuple[str, np.ndarray]:
    """(dtype name for the index, array holding the tensor's exact bytes)."""
    if t.dtype not in STORED:
        raise TypeError(f"cannot record a tensor of dtype {t.dtype}")
    name, np_dtype = STORED[t.dtype]
    t = t.detach().to("cpu").contiguous()
    if name in VIEW_AS:
        t = t.view(torch.uint16)
    return name, t.numpy().astype(np_dtype, copy=False)


class SessionRecord:
    """One runner session's calls. Thread-compatible, not thread-safe (the server serves in one thread)."""

    def __init__(self, path: Path, label: str):
        self.path, self.label, self.seq = files.private_dir(path, repair=True), label, 0
        with open_private(path / "session.json", "w") as f:
            json.dump({"format": FORMAT, "label": label, "started": time.time()}, f)
        self.index = open_private(path / "index.jsonl", "a")

    def _save(self, name: str, t: torch.Tensor) -> dict:
        dtype, array = to_numpy(t)
        with open_private(self.path / name) as f:
            np.save(f, array, allow_pickle=False)
        return {"file": name, "dtype": dtype, "shape": list(t.shape)}

    def call(self, op: str, layer: int | None, rid, inputs: list[torch.Tensor], output: torch.Tensor | None,
             header: dict) -> int:
        """Record one call: what came in (`inputs`, `header`) and what went back (`output`; None for a call
        that failed). Returns the call's sequence number in this session."""
        seq = self.seq
        self.seq += 1
        line = {"seq": seq, "op": op, "layer": layer, "id": rid, "header": header,
                "inputs": [self._save(f"{seq:06d}-in{i}.npy", x) for i, x in enumerate(inputs)],
                "output": None if output is None else self._save(f"{seq:06d}-out.npy", output)}
        self.index.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.index.flush()
        return seq

    def close(self) -> None:
        if not self.index.closed:
            self.index.close()


class Recorder:
    """The recording folder: one SessionRecord per runner session."""

    def __init__(self, path: str | Path):
        self.path = files.private_dir(Path(path), repair=True)
        taken = [int(m.group(1)) for p in self.path.iterdir() if (m := re.match(r"(\d{4,})-", p.name))]
        self.next = max(taken, default=-1) + 1        # a second server run on the same folder appends
        self.sessions: list[SessionRecord] = []

    def session(self, label: str = "session") -> SessionRecord:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:64] or "session"
        record = SessionRecord(self.path / f"{self.next:04d}-{safe}", label)
        self.next += 1
        self.sessions.append(record)
        return record

    def close(self) -> None:
        for s in self.sessions:
            s.close()


def call_header(op: str, layer: int | None, rid: int, inputs: list[torch.Tensor]) -> dict:
    """The header a runner sends for a frames-transport call (tsqp.remote), as the server receives it."""
    metas = [{"dtype": STORED[x.dtype][0], "shape": list(x.shape)} for x in inputs]
    return {"v": 1, "type": "call", "op": op, "layer": layer, "id": rid, "inputs": metas}


class RecordingCompute:
    """A Compute whose every call is recorded into `record` as the server would receive and return it.
    Use as `LocalOffload(RecordingCompute(compute, recorder.session("prompt-3")))`. Results are unchanged:
    the recording only copies the tensors out after each call has finished."""

    def __init__(self, compute, record: SessionRecord):
        self.inner, self.record, self.rid = compute, record, 0

    def __getattr__(self, name):           # cfg, dtype, device, cuda, ... as the wrapped compute has them
        return getattr(self.inner, name)

    def _record(self, op, layer, inputs, y) -> None:
        self.rid += 1
        self.record.call(op, layer, self.rid, inputs, y, call_header(op, layer, self.rid, inputs))

    def run(self, op: str, layer: int | None, inputs: list[torch.Tensor], out: torch.Tensor | None = None):
        y, seconds = self.inner.run(op, layer, inputs, out)
        self._record(op, layer, inputs, y)
        return y, seconds

    def launch(self, op: str, layer: int | None, inputs: list[torch.Tensor], out: torch.Tensor | None = None):
        y, finish = self.inner.launch(op, layer, inputs, out)

        def finish_and_record() -> float:
            seconds = finish()
            self._record(op, layer, inputs, y)    # inputs are still valid: the caller frees them after result()
            return seconds
        return y, finish_and_record
