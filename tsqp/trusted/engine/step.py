"""The Engine: one step = one batched forward over the scheduled rows, then each sequence that reached its
last token samples its next one with its own sampler. The model sees rows and per-sequence spans only
(TrustedModel.forward_spans); the offload interface is unchanged, so plain, remote and protected offloads
(each row masked with its own fresh pad, every result checked) all carry the whole batch in one call per op."""
from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from ..model import Span, TrustedModel, run_interleaved
from .kv import KVBudget
from .scheduler import Scheduler
from .sequence import Request, Sequence

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_STEP_TOKENS = 64


def default_chunk(max_batch: int, max_step_tokens: int, bucket: int = 1) -> int:
    """The prefill chunk: what a step holds beside every decode row, in whole length buckets."""
    room = max_step_tokens - max_batch
    chunk = room // bucket * bucket if bucket > 1 else room
    if chunk < 1:
        raise ValueError(f"--max-step-tokens ({max_step_tokens}) must exceed --max-batch ({max_batch}) by at "
                         f"least {max(bucket, 1)} (a prefill chunk{' of one length bucket' if bucket > 1 else ''})")
    return chunk


class Engine:
    """Holds every active request of one offload session and advances them together."""

    def __init__(self, model: TrustedModel, kv_budget_bytes: int, max_batch: int = DEFAULT_MAX_BATCH,
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, chunk: int | None = None):
        if model.policy != "linear":
            raise ValueError(f"the engine batches sequences with --policy linear (attention on the trusted side), "
                             f"not {model.policy}")
        self.model, self.offload = model, model.offload
        bucket = getattr(self.offload, "length_bucket", 1)
        chunk = chunk if chunk is not None else default_chunk(max_batch, max_step_tokens, bucket)
        if bucket > 1 and chunk % bucket:
            raise ValueError(f"the prefill chunk ({chunk}) must be whole length buckets of {bucket}")
        itemsize = torch.empty((), dtype=model.attention.dtype).element_size()
        self.kv = KVBudget(model.cfg, kv_budget_bytes, itemsize, model.new_cache)
        self.scheduler = Scheduler(self.kv, max_batch, max_step_tokens, chunk)
        self.numbered = 0
        self.steps = self.rows = 0
        self.step_s: list[float] = []

    def add(self, request: Request) -> Sequence:
        """Queue a request (ValueError when it could never fit the KV budget)."""
        seq = Sequence(request, self.numbered)
        self.scheduler.add(seq)
        self.numbered += 1
        return seq

    @property
    def idle(self) -> bool:
        return not len(self.scheduler)

    def step(self) -> int:
        """Run one step; returns the rows it carried (0: nothing to do). An exception from the forward
        (the server failed, a check failed) leaves the sequences as they were: see fail_all."""
        self._drop_cancelled()
        batch = self.scheduler.schedule()
        if not batch:
            return 0
        t0 = time.perf_counter()
        ids, spans, want = [], [], []
        for seq, n in batch:
            ids += seq.feed(n)
            spans.append(Span(seq.cache, seq.computed, n))
            if seq.computed + n == len(seq.tokens):
                want.append(len(ids) - 1)                    # its last row's logits pick its next token
        prefill = any(seq.prefilling for seq, _ in batch)
        # a step with a prompt's rows is a prefill's to the protected offload: its one-row requests are padded
        # to the length bucket too (a lone decode row is what every token makes alike)
        padding = getattr(self.offload, "prefilling", nullcontext) if prefill else nullcontext
        with padding():
            gen = self.model.forward_spans(torch.tensor(ids, dtype=torch.long, device=self.model.device), spans,
                                           want or None)
            logits = run_interleaved([gen])[0]
        row = 0
        for seq, n in batch:
            if seq.advance(n):
                try:
                    seq.choose(logits[row])
                except Exception as e:     # its logits were not finite, its caller's callback failed: it alone ends
                    self._end(seq, "error", e)
                row += 1
                if seq.finished and seq.cache is not None:
                    self._end(seq, seq.finished, None)
        self.steps, self.rows = self.steps + 1, self.rows + len(ids)
        self.step_s.append(time.perf_counter() - t0)
        return len(ids)

    def run(self) -> None:
        """Step until every request has ended (tests, benchmarks)."""
        while self.step():
            pass

    def fail_all(self, error: BaseException) -> int:
        """Every request in the engine ends with `error` (its session with the server is over); returns how many."""
        seqs = list(self.scheduler.running) + list(self.scheduler.waiting)
        for seq in seqs:
            self._end(seq, "error", error)
        return len(seqs)

    def _drop_cancelled(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            if seq.request.cancelled.is_set():
                self._end(seq, "cancelled", None)

    def _end(self, seq: Sequence, reason: str, error: BaseException | None) -> None:
        seq.finished = reason
        self.scheduler.retire(seq)
        seq.request.on_end(reason, error)
