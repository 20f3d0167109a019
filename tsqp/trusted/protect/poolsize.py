"""`--pad-pool`: the pad pool's size per op in tokens ("64", "64t") or in memory ("256MB", "1.5GiB"), a
memory size turned into tokens once the model's shapes are known (a token of pads: PadPool.bytes_per_token).
No torch here: the CLI parses it before loading anything."""
from __future__ import annotations

import re
from dataclasses import dataclass

UNITS = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class PoolSize:
    tokens: int | None = None          # exactly one of the two is set
    nbytes: int | None = None

    def rows(self, bytes_per_token: int) -> int:
        """Tokens of pads this size holds: the memory size's whole tokens (a positive size holds at least one)."""
        if self.tokens is not None:
            return self.tokens
        return max(1, self.nbytes // bytes_per_token) if self.nbytes else 0


def parse(text: str | int) -> PoolSize:
    """'64' or '64t' or '64tokens' -> 64 tokens; '256MB', '1.5GiB', '512 kib' -> bytes. Raises ValueError."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a pad pool of {text} tokens: the size must be at least 0")
        return PoolSize(tokens=text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in ("", "t", "tok", "tokens", *UNITS):
        raise ValueError(f"pad pool size {text!r}: give tokens (64, 64t) or memory (256MB, 1.5GiB)")
    value = float(m.group(1))
    if unit in UNITS:
        return PoolSize(nbytes=int(value * UNITS[unit]))
    if value != int(value):
        raise ValueError(f"pad pool size {text!r}: a number of tokens is whole")
    return PoolSize(tokens=int(value))
