"""Which rows the next step carries. Two lists, as nano-vllm's scheduler: `waiting` (admitted by the caller,
not yet given KV memory) and `running` (holding their KV blocks). Each step:

  1. admission: the oldest waiting sequences move to running while fewer than max_batch run and the KV
     budget has room for all their positions (first come, first served: a large one at the head waits
     until it fits rather than being overtaken forever);
  2. every running sequence that is decoding gets its one row (decodes first: a prompt arriving never
     delays them by more than one step);
  3. the rest of the step's token budget goes to prefill chunks, oldest first, each a whole chunk of at
     most `chunk` tokens cut at fixed offsets of its prompt (so the chunks, and the server's view of them,
     follow from the prompt's length alone).
"""
from __future__ import annotations

from collections import deque

from .kv import KVBudget, KVBudgetError
from .sequence import Sequence


class Scheduler:
    def __init__(self, kv: KVBudget, max_batch: int, max_step_tokens: int, chunk: int):
        if max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
        if not 1 <= chunk <= max_step_tokens - max_batch + 1:
            raise ValueError(f"--max-step-tokens ({max_step_tokens}) must leave room for every decode row "
                             f"(--max-batch {max_batch}) and a prefill chunk of {chunk} token(s)")
        self.kv, self.max_batch, self.max_step_tokens, self.chunk = kv, max_batch, max_step_tokens, chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if self.kv.blocks_for(seq.reserve_tokens) > self.kv.total:
            raise KVBudgetError(f"the request needs {seq.reserve_tokens} positions of KV cache; the whole budget "
                             f"holds {self.kv.max_tokens}")
        self.waiting.append(seq)

    def admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch and \
                self.kv.can_allocate(self.waiting[0].reserve_tokens):
            seq = self.waiting.popleft()
            seq.cache, seq.blocks = self.kv.allocate(seq.reserve_tokens)
            self.running.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """[(sequence, rows)] for the next step, decodes first; [] when nothing can run."""
        self.admit()
        batch = [(seq, 1) for seq in self.running if not seq.prefilling]
        budget = self.max_step_tokens - len(batch)
        for seq in self.running:
            if seq.prefilling:
                n = seq.next_rows(self.chunk)
                if n > budget:
                    break
                batch.append((seq, n))
                budget -= n
        return batch

    def retire(self, seq: Sequence) -> None:
        """A sequence leaves (finished, cancelled or failed): its KV blocks go back."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.blocks)
            seq.cache, seq.blocks = None, 0
        elif seq in self.waiting:
            self.waiting.remove(seq)
