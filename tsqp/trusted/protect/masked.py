"""Protected offload: every linear op runs on the server over one-time-padded integers and is checked.

`ProtectedOffload` implements the offload interface (tsqp/offload.py) from the runner's OWN float weights,
quantized with tsqp/quant.py; nothing model-related is taken from the server side. Per linear request (blocks.py does the per-row work, a cache-sized block of rows at a time):
  X (float [T, in]) -> Xq, sx (16-bit per row)            quant.quantize_block
  B = Xq + R mod 2^40, R a fresh pad's rows               pads.PadPool.take -> (R, U = R W^T - 2^39 mod 2^40)
  send B as uint8 limbs [5, T, in], keep X . ws's parts   the Freivalds check's input side
  the server returns Z = B W^T mod 2^40, int64 [T, out]
  Y = (Z - U mod 2^40) - 2^39  exact: |Xq W^T| <= 32767 * quant.weight_max(in) * in < 2^39
  y = Y * sx[t] * sw[o] (quant.dequantize_into), and Y . s mod p must equal X . ws for every row
"embed" is a local lookup (the server never sees token ids); attention ops are refused: masks over Z_2^40
only commute with a fixed public matrix. `QuantizedOffload` computes the same integers in-process with no
masks (float64 GEMM, exact below 2^53): the oracle the protected run must equal bit for bit.
"""
from __future__ import annotations

import contextlib
import time

import torch

from ... import quant, ring
from ...config import ModelConfig
from ...stats import Stats
from ..offload import Done
from . import blocks, fast
from .deferred import DeferredChecks
from .freivalds import Freivalds, VerificationError, failing_rows
from .pads import PadPool, PadSource

POLICY_MESSAGE = "--protect needs --policy linear: attention stays on the trusted side"


class UnsupportedOp(ValueError):
    """An op that cannot be offloaded under protection."""


class QuantizedModel:
    """The runner's own model as protection uses it, read-only and shareable between sessions: the embedding
    table, the quantized weights, their fingerprint and their ring form (each session adds its own secrets:
    pads and Freivalds vectors)."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.embedding = weights["model.embed_tokens.weight"].to("cpu", torch.float32)   # [V, D], trusted
        self.qweights = quant.quantize_model(cfg, weights)
        self.fingerprint = quant.fingerprint(self.qweights)
        self._ring = None

    @property
    def ring_weights(self) -> dict:
        if self._ring is None:
            self._ring = {key: ring.RingWeight(w.q) for key, w in self.qweights.items()}
        return self._ring


class _QuantizedBase:
    """What both offloads share: the runner's quantized weights, the local embedding, op checks. `weights`:
    the float checkpoint, or a QuantizedModel made from it once for many sessions."""

    def __init__(self, cfg: ModelConfig, weights, stats: Stats | None):
        self.cfg = cfg
        self.dtype = torch.float32
        self.stats = stats if stats is not None else Stats()
        self.quantized = weights if isinstance(weights, QuantizedModel) else QuantizedModel(cfg, weights)
        self.embedding, self.qweights, self.fingerprint = \
            self.quantized.embedding, self.quantized.qweights, self.quantized.fingerprint

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype)

    def _key(self, op: str, layer: int | None, xs: tuple) -> tuple[str, int | None]:
        if op not in quant.LINEAR_OPS:
            raise UnsupportedOp(f"op '{op}' cannot be protected. {POLICY_MESSAGE}")
        key = (op, None if op == "lm_head" else layer)
        if key not in self.qweights:
            raise UnsupportedOp(f"no weights for op '{op}' layer {layer}")
        w = self.qweights[key].q
        if len(xs) != 1 or xs[0].dim() != 2 or xs[0].shape[1] != w.shape[1]:
            raise ValueError(f"op '{op}' takes one input [T, {w.shape[1]}], got {[tuple(x.shape) for x in xs]}")
        return key

    def _embed(self, ids: torch.Tensor) -> Done:
        return Done(self.embedding[ids])                                               # [T, D]

    def close(self) -> None:
        pass


class QuantizedOffload(_QuantizedBase):
    """The same quantized linear layers computed here, unmasked: Y = Xq Wq^T as a float64 GEMM, exact
    because every partial sum is an integer below 2^39 < 2^53."""

    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], stats: Stats | None = None):
        super().__init__(cfg, weights, stats)
        self.wt64 = {key: w.q.t().to(torch.float64) for key, w in self.qweights.items()}   # [in, out]

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor) -> Done:
        if op == "embed":
            return self._embed(xs[0])
        key = self._key(op, layer, xs)
        self.stats.rpc_calls += 1
        xq, sx = quant.quantize_rows(xs[0])
        y = (xq.to(torch.float64) @ self.wt64[key]).to(torch.int64)                     # [T, out] exact
        return Done(quant.dequantize(y, sx, self.qweights[key].scale))


class ProtectedOffload(_QuantizedBase):
    """Masked, verified offload through `inner` (an offload whose server answers limb requests:
    inner.submit(op, layer, uint8 [5, T, in]) -> int64 [T, out] = B W^T mod 2^40).

    verify: run the Freivalds checks (a failed one raises VerificationError and ends the session: every
    later submit raises too). pool_tokens / batch_tokens / lm_head_rows: see pads.PadPool. length_bucket:
    a request of several rows, and any request made while `prefilling()`, is padded with zero rows up to a
    multiple of it; with the model's prefill (which cuts chunks at whole buckets, model.chunk_sizes) the server
    learns the prompt's length only to within a bucket (padded rows are masked, computed and checked like
    the others, then dropped; decode steps are one row each). deferred_checks (with verify): a one-row
    result is used at once and checked while the runner waits for the next reply; an LM-head result runs
    every check before it (deferred.py). A server's stated fingerprint is checked with `expect_fingerprint`
    before the first request. close() closes `inner` too."""

    def __init__(self, inner, cfg: ModelConfig, weights, verify: bool = True,
                 pool_tokens: int = 64, batch_tokens: int = 16, lm_head_rows: int | None = None,
                 stats: Stats | None = None, background: bool = True, length_bucket: int = 1,
                 deferred_checks: bool = False):
        super().__init__(cfg, weights, stats if stats is not None else getattr(inner, "stats", None))
        if length_bucket < 1:
            raise ValueError(f"length_bucket must be at least 1, got {length_bucket}")
        self.inner, self.verify, self.length_bucket = inner, verify, length_bucket
        self.ring_weights = self.quantized.ring_weights
        self.checks = {key: Freivalds(w.q) for key, w in self.qweights.items()} if verify else {}
        self.pool = PadPool(self.ring_weights, pool_tokens, batch_tokens, lm_head_rows, PadSource(), background)
        self.failure: VerificationError | None = None
        self.deferred = DeferredChecks() if verify and deferred_checks else None
        self.scratch = blocks.Scratch()
        self.results = blocks.Results()
        self.checked_rows = 0
        self.verify_s = 0.0
        self._prefilling = False

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor):
        self._raise_if_over()
        if op == "embed":
            return self._embed(xs[0])
        try:
            return self._submit(op, layer, xs)
        except Exception:              # a result not yet checked may be why (a non-finite input), and a server
            self.settle()              # that fails after altering one must not escape its check: its failure
            raise                      # is the error

    def _raise_if_over(self) -> None:
        if self.failure is not None:
            raise VerificationError(self.failure.op, self.failure.layer,
                                    f"an earlier result failed ({self.failure}); this session is over") \
                from self.failure

    def _submit(self, op: str, layer: int | None, xs: tuple):
        key = self._key(op, layer, xs)
        x = xs[0]
        if not x.shape[0]:                                 # nothing to send (what QuantizedOffload gives)
            return Done(torch.empty((0, self.qweights[key].q.shape[0])))
        t0 = time.perf_counter()
        T = x.shape[0]
        # pad to the bucket: a request of several rows, and a prefill's one-row request but the LM head's
        # (a prefill asks it for the last row alone, whatever the prompt's length)
        if T % self.length_bucket and (T > 1 or self._prefilling and op != "lm_head"):
            T += self.length_bucket - T % self.length_bucket
        limbs = self.inner.empty((ring.LIMBS, T, x.shape[1]), torch.uint8)               # [5, T, in]
        # a decode step's one row, compiled: the pool's row where it lies (a PadRow), scale and side as numbers
        one_row = T == 1 and fast.usable(x) and limbs.is_contiguous()
        # a decode step's deferred check: the torch chains check later from a copy of the quantized row (and
        # of Y + 2^39); the compiled row passes compute both sides in their loops and defer the comparison
        quantized = self.deferred.buffer((T, x.shape[1]), torch.float32) \
            if self.deferred is not None and T == 1 and not one_row else None
        try:
            with blocks.one_thread_for(T):
                if one_row:
                    r = u = self.pool.take_row(key)
                else:
                    r, u = self.pool.take_limbs(key, T)
                padded = torch.cat([x, x.new_zeros(T - x.shape[0], x.shape[1])]) if T > x.shape[0] else x
                sx, input_parts, check_s = blocks.mask(padded, r, limbs, None if quantized is not None else
                                                       self.checks.get(key), self.scratch, quantized)
        except BaseException:          # refused (non-finite input, the pool's failure): nothing is sent, and
            discard = getattr(self.inner, "discard", None)       # the inner's buffer (shared memory) goes back
            if discard is not None:
                discard(limbs)
            raise
        self._count_check(check_s)
        self.stats.add_time("mask", time.perf_counter() - t0 - check_s)
        kept = sx if isinstance(sx, float) else sx[:x.shape[0]]
        return MaskedPending(self, key, self.inner.submit(op, layer, limbs), (T, self.qweights[key].q.shape[0]),
                             kept, input_parts, u, quantized)

    def settle(self) -> None:
        """Run every deferred check now; a failed one ends the session (raised as VerificationError)."""
        if self.deferred is None or not len(self.deferred):
            return
        t0 = time.perf_counter()
        try:
            with blocks.one_thread_for(1):
                self.deferred.run()
        except Exception as e:
            self.failure = self.failure or (e if isinstance(e, VerificationError) else
                                            VerificationError("check", None, f"a deferred check raised "
                                                                             f"{type(e).__name__}: {e}"))
            raise self.failure from None
        except BaseException as e:     # interrupted: the checks not run are gone, so the session is over too
            self.failure = self.failure or VerificationError("check", None, f"interrupted ({type(e).__name__}) "
                                                                            f"before every result was checked")
            raise
        finally:
            self._count_check(time.perf_counter() - t0)

    @contextlib.contextmanager
    def prefilling(self):
        """Requests made meanwhile are a prefill's: a one-row one (a one-token prompt, or chunk; not the LM
        head's, which is one row for any prompt) is padded to the bucket too. Outside, a one-row request is a
        decode step's, which every token makes alike."""
        self._prefilling = True
        try:
            yield
        finally:
            self._prefilling = False

    def expect_fingerprint(self, stated: str) -> None:
        """Compare the server's stated quantized-weights fingerprint with ours before the first request:
        a server holding other weights would fail every check, this says why up front."""
        if stated != self.fingerprint:
            raise VerificationError("fingerprint", None, f"the server's quantized weights differ "
                                    f"(server {stated[:16]}..., runner {self.fingerprint[:16]}...)")

    def _count_check(self, seconds: float) -> None:
        if self.verify:
            self.stats.add_time("verify", seconds)
            self.verify_s += seconds

    def report(self) -> dict:
        """The protection's own figures, for JSON."""
        deferred = self.deferred is not None
        return {"verify": self.verify, "deferred_checks": deferred,
                "checked_rows": self.checked_rows + (self.deferred.rows if deferred else 0),
                "verify_s": self.verify_s, "deferred_check_s": self.deferred.seconds if deferred else 0.0,
                "fingerprint": self.fingerprint, "pool": self.pool.stats(),
                "passes": fast.KERNEL}

    def close(self) -> None:
        self.pool.close()
        self.inner.close()


class MaskedPending:
    """One masked request in flight; result() unmasks, checks and dequantizes once."""

    def __init__(self, owner: ProtectedOffload, key, pending, shape: tuple[int, int], sx, input_parts, u,
                 quantized=None):
        self.owner, self.key, self.pending, self.shape = owner, key, pending, shape       # shape: Z's [T, out]
        # sx: float32 [kept rows], or one row's float; input_parts: None unverified or deferred; u: U's limbs
        # uint8 [5, T, out] or a pads.PadRow (a decode step's, blocks.mask)
        self.sx, self.input_parts, self.u = sx, input_parts, u
        self.kept = 1 if isinstance(sx, float) else sx.shape[0]
        self.quantized = quantized                                   # the input's integers for a deferred check
        self.value = None
        self.released = False

    def result(self) -> torch.Tensor:
        if self.released:
            raise RuntimeError(f"result() of op {self.key[0]} after its release(): its buffer serves later requests")
        self.owner._raise_if_over()            # a value kept from before a failure (a deferred one unchecked)
        if self.value is None:
            self.owner.settle()             # deferred checks, while the server works on this request
            z = self.pending.result()
            with blocks.one_thread_for(self.shape[0]):
                self.value = self._finish(z)
        return self.value

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        owner, (op, layer) = self.owner, self.key
        T, out = self.shape
        try:
            if z.dtype != torch.int64 or z.shape != (T, out) or not z.is_cpu:
                raise VerificationError(op, layer, f"expected int64 [{T}, {out}] on the CPU, got {z.dtype} "
                                                   f"{tuple(z.shape)} on {z.device}")
            t0 = time.perf_counter()
            deferred = owner.deferred is not None and T == 1        # used now, checked at the next wait
            copies = self.quantized is not None                       # checked from copies (torch chains)
            offsets = owner.deferred.buffer((T, out), torch.int64) if copies else None
            try:
                y, output_parts, check_s = blocks.finish(z, self.u, self.sx, owner.qweights[self.key].scale,
                                                         None if copies else owner.checks.get(self.key),
                                                         owner.scratch, owner.results.take((self.kept, out)),
                                                         offsets)
            except blocks.OutOfRange as e:
                raise VerificationError(op, layer, str(e)) from None
            owner.stats.add_time("unmask", time.perf_counter() - t0 - check_s)
            owner._count_check(check_s)
            if copies:
                owner.deferred.add(self.key, owner.checks[self.key], self.quantized, offsets)
            elif deferred:
                owner.deferred.add_sides(self.key, self.input_parts, output_parts)
            elif owner.verify:
                t1 = time.perf_counter()
                ok = owner.checks[self.key].passes(output_parts, self.input_parts)
                owner._count_check(time.perf_counter() - t1)
                failing_rows(ok, op, layer)                       # before y is handed to anyone
                owner.checked_rows += T
            if op == "lm_head":                 # logits only once every result they rest on passed
                owner.settle()
        except Exception as e:         # whatever stopped a result from being checked ends the session
            owner.failure = e if isinstance(e, VerificationError) else \
                VerificationError(op, layer, f"finishing the result raised {type(e).__name__}: {e}")
            raise
        return y

    def release(self) -> None:
        """The caller is done with the result (the offload interface's contract): its buffer serves a later
        request."""
        self.pending.release()
        self.released = True
        if self.value is not None:
            self.owner.results.give(self.value)
            self.value = None
