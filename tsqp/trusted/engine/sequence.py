"""One request's state in the engine: its prompt and generated tokens, its own sampler (a per-request
torch.Generator, so a seeded request samples the same tokens batched as alone), its KV cache, and how it
ends. The caller hears of it through two callbacks, both called on the engine's thread."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..generate import Sampling, check_logits, sample
from ..model import KVCache


@dataclass
class Request:
    """What a caller asks of the engine."""
    ids: list[int]                                   # the prompt
    max_new: int
    sampling: Sampling = Sampling()
    stop_ids: frozenset[int] = frozenset()           # tokens that end the generation (eos, end of turn)
    on_token: Callable[[int, torch.Tensor], bool] = lambda token, logits: False   # True: end here
    on_end: Callable[[str, BaseException | None], None] = lambda reason, error: None
    cancelled: threading.Event = field(default_factory=threading.Event)          # the client went away


class Sequence:
    """A request inside the engine. finish reasons: 'eos' (a stop id), 'length' (max_new), 'caller' (on_token
    said so: a stop string), 'cancelled' (its client left), or an error."""

    def __init__(self, request: Request, number: int):
        self.request, self.number = request, number
        self.tokens = list(request.ids)              # prompt, then every generated token
        self.prompt_len = len(request.ids)
        self.generator = request.sampling.generator()
        self.cache: KVCache | None = None           # given at admission
        self.blocks = 0                              # KV blocks reserved for it
        self.computed = 0                            # tokens whose K/V are in the cache
        self.finished: str | None = None

    @property
    def reserve_tokens(self) -> int:
        """Every position it may ever hold: the prompt and max_new tokens."""
        return self.prompt_len + self.request.max_new

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len

    def next_rows(self, limit: int) -> int:
        """How many of its tokens the next step should carry: one while decoding, else the next prefill chunk
        (at most `limit`: chunk boundaries follow from the prompt alone, so a sequence's attention calls are
        the same batched as alone)."""
        return min(limit, len(self.tokens) - self.computed)

    def feed(self, n: int) -> list[int]:
        return self.tokens[self.computed:self.computed + n]

    def advance(self, n: int) -> bool:
        """n more tokens are in the cache; True when that reached the last one (its logits pick the next)."""
        self.computed += n
        return self.computed == len(self.tokens)

    def choose(self, logits: torch.Tensor) -> int:
        """logits [V] -> the next token, appended; sets `finished` when it ends the generation."""
        check_logits(logits, f"request {self.number}'s step {self.generated}")
        token = sample(logits, self.request.sampling, self.generator)
        self.tokens.append(token)
        if self.request.on_token(token, logits):
            self.finished = "caller"
        elif token in self.request.stop_ids:
            self.finished = "eos"
        elif self.generated >= self.request.max_new:
            self.finished = "length"
        return token
