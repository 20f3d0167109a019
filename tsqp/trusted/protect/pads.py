"""One-time pads over Z_2^40 for masked offload, and the pool that precomputes them.

A session draws a 32-byte key from os.urandom. Pad block n is the ChaCha20 keystream under that key with
nonce n (block counter from 0), so a pad's identity is (session key, n); `PadSource.issue` refuses an n it
has issued before (PadReuseError). Keystream bytes are uniform, so 5 of them are an element R uniform in
Z_2^40, and B = X + R mod 2^40 is uniform whatever X is: the server learns nothing from B.

To unmask Z = B W^T mod 2^40 the runner needs U = R W^T mod 2^40. `PadPool` computes (R, U) per
(op, layer) ahead of time on a background thread, a batch of future tokens per int8 GEMM; a request takes
its rows from the pool, or computes them on demand if the pool ran dry (counted). A row is handed out once.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ... import ring
from . import fast
from .poolsize import PoolSize

Key = tuple[str, int | None]


class PadReuseError(RuntimeError):
    """A pad block number was asked for a second time: a one-time pad must never be reused."""


class PadSource:
    """ChaCha20 keystream blocks under a per-session key, issued in increasing order of block number: a number
    below the last one issued (issued, or skipped and so never to be used) is refused, so no block is issued
    twice, in O(1) memory however long the session lives."""

    def __init__(self, key: bytes | None = None):
        self._key = key if key is not None else os.urandom(32)
        if len(self._key) != 32:
            raise ValueError("a pad key is 32 bytes")
        self._next = 0               # the lowest number that may still be issued
        self._count = 0
        self._lock = threading.Lock()

    def issue(self, n: int, nbytes: int) -> torch.Tensor:
        """Pad block n: the first nbytes of ChaCha20(key, nonce=n), uint8 [nbytes]."""
        if not 0 <= n < 1 << 96:
            raise ValueError(f"pad block number {n} out of range")
        with self._lock:
            self._take(n)
        return keystream(self._key, n, nbytes)

    def fresh(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next unissued block: (n, uint8 [nbytes])."""
        with self._lock:
            n = self._next
            self._take(n)
        return n, keystream(self._key, n, nbytes)

    def _take(self, n: int) -> None:
        """Mark n issued (the lock held)."""
        if n < self._next:
            raise PadReuseError(f"pad block {n} was already issued in this session, or skipped (blocks are issued "
                                f"in increasing order; the next is {self._next})")
        self._next, self._count = n + 1, self._count + 1

    @property
    def blocks_issued(self) -> int:
        return self._count


def keystream(key: bytes, n: int, nbytes: int) -> torch.Tensor:
    """ChaCha20 keystream (4-byte block counter 0, 12-byte nonce n little-endian): uint8 [nbytes]."""
    cipher = Cipher(algorithms.ChaCha20(key, bytes(4) + n.to_bytes(12, "little")), mode=None)
    buf = bytearray(nbytes)
    cipher.encryptor().update_into(bytes(nbytes), buf)
    return torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)


def uniform_below(bound: int, count: int) -> torch.Tensor:
    """count integers uniform in [0, bound) (bound < 2^62), int64, from a fresh ChaCha20 key drawn from
    os.urandom; rejection sampling on bound.bit_length() bits keeps them exactly uniform."""
    if not 1 < bound < 1 << 62:
        raise ValueError(f"bound {bound} out of range")
    source = PadSource()
    bits = bound.bit_length()
    out = torch.empty(0, dtype=torch.int64)
    while out.numel() < count:
        want = 2 * (count - out.numel()) + 16            # acceptance > 1/2 per candidate
        raw = source.fresh(8 * want)[1].view(torch.int64)
        candidates = raw & ((1 << bits) - 1)
        out = torch.cat([out, candidates[candidates < bound]])
    return out[:count].clone()


class _Batch:
    """Rows start.. of one precomputed pad block, in the ring's 5 bytes an element: R's limbs uint8
    [5, b, in] (the keystream as drawn) and U's uint8 [5, b, out]."""

    def __init__(self, r: torch.Tensor, u: torch.Tensor):
        self.r, self.u, self.start = r, u, 0
        rows = r.shape[1]
        if r.stride()[1:] != (r.shape[2], 1) or u.stride()[1:] != (u.shape[2], 1) or u.shape[1] != rows:
            raise ValueError(f"a pad block's planes must hold contiguous rows, got R {tuple(r.shape)} strides "
                             f"{r.stride()}, U {tuple(u.shape)} strides {u.stride()}")
        # where the compiled one-row passes read a row (fast.mask_row / finish_row): planes' address and stride
        self.r_at, self.u_at = (r.data_ptr(), r.stride(0)), (u.data_ptr(), u.stride(0))
        self.in_features, self.out_features = r.shape[2], u.shape[2]

    @property
    def left(self) -> int:
        return self.r.shape[1] - self.start


class PadRow:
    """One unused pad row as `PadPool.take_row` hands it out: the row's index in its block, which it keeps
    alive. A decode step's compiled passes read R's and U's limbs where the block holds them (fast.mask_row,
    fast.finish_row): slicing two tensors per call cost more than the row's arithmetic."""

    __slots__ = ("batch", "row")

    def __init__(self, batch: _Batch, row: int):
        self.batch, self.row = batch, row

    @property
    def in_features(self) -> int:
        return self.batch.in_features

    @property
    def out_features(self) -> int:
        return self.batch.out_features

    def r(self) -> torch.Tensor:
        """R's limbs uint8 [5, 1, in] (a view of the block)."""
        return self.batch.r[:, self.row:self.row + 1]

    def u(self) -> torch.Tensor:
        """U's limbs uint8 [5, 1, out] (a view of the block)."""
        return self.batch.u[:, self.row:self.row + 1]


def make_block(source: PadSource, w: ring.RingWeight, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh pad block of `rows` rows for one weight: (R's limbs uint8 [5, rows, in], U's uint8
    [5, rows, out]) with U = R W^T - 2^39 mod 2^40: shifted by half the ring, so that the runner's unmask
    Z - U is Y + 2^39 in one subtraction (blocks.finish). 5 bytes an element: a token of Llama-3.2-1B's pads
    is 3.7 MB (int64 R and U took 11.8)."""
    _, stream = source.fresh(ring.LIMBS * rows * w.in_features)
    limbs = stream.view(ring.LIMBS, rows, w.in_features)                  # [5, rows, in]: R's limbs
    if fast.usable(limbs) and w.wt.device.type == "cpu":
        return limbs, fast.pad_u(limbs, w)
    u = ring.limb_matmul(limbs, w).sub_(ring.HALF).bitwise_and_(ring.MASK)   # [rows, out]
    return limbs, ring.to_limbs(u)


class PadPool:
    """(R, U) rows per (op, layer), precomputed on a background thread.

    weights: (op, layer) -> RingWeight, in forward order. Each per-layer op keeps `pool_tokens` rows ready
    (or as many as a poolsize.PoolSize of memory holds);
    the lm_head, called for one row per prefill or decode step, keeps `lm_head_rows` (default: one batch).
    The filler tops up the emptiest pool (relative to its target) once the pool lacks a whole batch
    (`batch_tokens` rows), up to `fill_rows` rows per GEMM (or as many as the pool lacks): the GEMM's rate
    depends on its rows (Llama-3.2-1B shapes: 241 G multiply-adds/s at 16 rows, 330 at 256: scripts/pad_rate.py).
    """

    def __init__(self, weights: dict[Key, ring.RingWeight], pool_tokens: int | PoolSize = 64,
                 batch_tokens: int = 16, lm_head_rows: int | None = None, source: PadSource | None = None,
                 background: bool = True, fill_rows: int = 256):
        self.weights = weights
        if isinstance(pool_tokens, PoolSize):         # --pad-pool in memory: the tokens it holds
            pool_tokens = pool_tokens.rows(self.bytes_per_token)
        if pool_tokens < 0 or batch_tokens < 1 or fill_rows < 1:
            raise ValueError("pool_tokens must be >= 0, batch_tokens and fill_rows >= 1")
        self.source = source or PadSource()
        self.batch_tokens, self.pool_tokens, self.fill_rows = batch_tokens, pool_tokens, max(fill_rows, batch_tokens)
        head_rows = batch_tokens if lm_head_rows is None else lm_head_rows
        self.target = {key: head_rows if key[0] == "lm_head" else pool_tokens for key in weights}
        self.pools: dict[Key, deque[_Batch]] = {key: deque() for key in weights}
        self.level = dict.fromkeys(weights, 0)
        self._refilling = {key for key, target in self.target.items() if target > 0}
        total = sum(w.in_features * w.out_features for w in weights.values())
        self.token_share = {key: w.in_features * w.out_features / total for key, w in weights.items()}
        self.pads_made = self.pads_consumed = self.on_demand = self.on_demand_rows = 0
        self.tokens_made = 0.0            # rows made, each weighted by its share of a token's GEMM work
        self.fill_s = self.on_demand_s = 0.0
        self.error: Exception | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = None
        if background and pool_tokens + head_rows > 0:
            self._thread = threading.Thread(target=self._fill_loop, name="tsqp-pad-pool", daemon=True)
            self._thread.start()

    # ---- making pads -------------------------------------------------------------------------------
    def make(self, key: Key, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh pad block of `rows` rows for (op, layer), as the pool keeps it (make_block)."""
        return make_block(self.source, self.weights[key], rows)

    def _fill_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    key = self._neediest()
                    while key is None and not self._closed:
                        self._cond.wait()
                        key = self._neediest()
                    if self._closed:
                        return
                    rows = min(self.fill_rows, self.target[key] - self.level[key])
                self._add_batch(key, rows)
        except Exception as e:        # surfaced by the next take(), never lost
            with self._cond:
                self.error = e
                self._cond.notify_all()

    def _add_batch(self, key: Key, rows: int) -> None:
        """Make `rows` rows for key in one GEMM and put them in its pool."""
        t0 = time.perf_counter()
        r, u = self.make(key, rows)
        with self._cond:
            self.fill_s += time.perf_counter() - t0
            self.pools[key].append(_Batch(r, u))
            self.level[key] += rows
            if self.level[key] >= self.target[key]:
                self._refilling.discard(key)
            self.pads_made += rows
            self.tokens_made += rows * self.token_share[key]
            self._cond.notify_all()

    def fill_now(self) -> None:
        """Refill every pool that is due to its target on the calling thread, as the filler would (for a pool
        made with background=False: pads ready, and no filler sharing the cores while they are used)."""
        if self._thread is not None:
            raise RuntimeError("fill_now is for a pool without a filler thread (background=False)")
        while True:
            with self._cond:
                key = self._neediest()
                if key is None:
                    return
                rows = min(self.fill_rows, self.target[key] - self.level[key])
            self._add_batch(key, rows)

    def _neediest(self) -> Key | None:
        """The pool furthest below its target (forward order breaks ties) among those being refilled: a
        pool starts a refill once it lacks a whole batch (or all of a target smaller than a batch) and
        refills up to its target, so refills run in whole batches (a GEMM over a batch costs little more
        than one over a row). None when no pool needs rows."""
        best, best_fill = None, 1.0
        for key, target in self.target.items():
            level = self.level[key]
            if key not in self._refilling and self._due(key):
                self._refilling.add(key)
            if key in self._refilling and level / target < best_fill:
                best, best_fill = key, level / target
        return best

    def _due(self, key: Key) -> bool:
        """The pool lacks a whole batch (or all of a target smaller than a batch): a refill starts."""
        target = self.target[key]
        return target - self.level[key] >= min(self.batch_tokens, target) > 0

    # ---- using pads --------------------------------------------------------------------------------
    def take(self, key: Key, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` unused pad rows for (op, layer) as int64: (R [rows, in], U [rows, out], see make)."""
        r, u = self.take_limbs(key, rows)
        return ring.from_limbs(r), ring.from_limbs(u)

    def take_limbs(self, key: Key, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`rows` unused pad rows for (op, layer) as the pool keeps them: (R's limbs uint8 [5, rows, in], U's
        uint8 [5, rows, out], see make; rows contiguous, planes a block apart)."""
        spans = self._hand_out(key, rows)
        rs, us = [b.r[:, a:a + n] for b, a, n in spans], [b.u[:, a:a + n] for b, a, n in spans]
        if len(spans) == 1:
            return rs[0], us[0]
        return torch.cat(rs, 1), torch.cat(us, 1)

    def take_row(self, key: Key) -> PadRow:
        """One unused pad row for (op, layer), where its block holds it (a decode step's: nothing sliced)."""
        (batch, row, _), = self._hand_out(key, 1)
        return PadRow(batch, row)

    def _hand_out(self, key: Key, rows: int) -> list[tuple[_Batch, int, int]]:
        """`rows` unused rows as (block, first row, rows) spans, each row handed out once: from the pool first,
        oldest block first; whatever it lacks is made now (an on-demand event)."""
        spans, got = [], 0
        with self._cond:
            if self.error is not None:
                raise RuntimeError("the pad pool's filler failed") from self.error
            pool = self.pools[key]
            while got < rows and pool:
                batch = pool[0]
                n = min(batch.left, rows - got)
                spans.append((batch, batch.start, n))
                batch.start += n
                got += n
                if not batch.left:
                    pool.popleft()
            self.level[key] -= got
            self.pads_consumed += rows
            if self._due(key):
                self._cond.notify_all()     # now due a refill: wake the filler (only then: a woken filler
                # scans every pool holding the lock and the GIL, on every decode step's 65 calls)
        if got < rows:
            t0 = time.perf_counter()
            made = _Batch(*self.make(key, rows - got))
            made.start = rows - got
            spans.append((made, 0, rows - got))
            with self._cond:
                self.on_demand += 1
                self.on_demand_rows += rows - got
                self.on_demand_s += time.perf_counter() - t0
        return spans

    def wait_full(self, timeout_s: float | None = None) -> bool:
        """Block until no pool is being refilled (True: each is at its target, or lacks less than a batch)
        or the timeout passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.error is not None or self._neediest() is None, timeout_s) \
                and self.error is None

    @property
    def bytes_held(self) -> int:
        with self._cond:
            return sum(b.r[:, b.start:].nbytes + b.u[:, b.start:].nbytes for pool in self.pools.values() for b in pool)

    @property
    def bytes_per_token(self) -> int:
        """The pool's bytes for one token of pads: one row of R and of U for every (op, layer)."""
        return sum(ring.LIMBS * (w.in_features + w.out_features) for w in self.weights.values())

    def stats(self) -> dict:
        """Figures for JSON: rows made in the background and consumed, on-demand events and rows, the fill
        rate in tokens/s (a token = one row of every (op, layer), rows weighted by GEMM size), bytes held."""
        held = self.bytes_held
        with self._cond:
            return {"pads_made": self.pads_made, "pads_consumed": self.pads_consumed,
                    "on_demand": self.on_demand, "on_demand_rows": self.on_demand_rows,
                    "on_demand_s": self.on_demand_s, "fill_s": self.fill_s,
                    "fill_tokens_per_s": self.tokens_made / self.fill_s if self.fill_s else 0.0,
                    "pool_tokens": self.pool_tokens,
                    "blocks_issued": self.source.blocks_issued, "bytes_held": held,
                    "bytes_per_token": self.bytes_per_token,
                    "filler_error": None if self.error is None else repr(self.error)}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for pool in self.pools.values():
            pool.clear()
