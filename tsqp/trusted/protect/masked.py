"""Protected offload: every linear op runs on the server over one-time-padded integers and is checked.

`ProtectedOffload` implements the offload interface (tsqp/offload.py) from the runner's OWN float weights,
quantized with tsqp/quant.py; nothing model-related is taken from the server side. Per linear request:
  X (float [T, in]) -> Xq int64, sx (16-bit per row)      quant.quantize_rows
  B = Xq + R mod 2^40, R a fresh pad's rows               pads.PadPool.take -> (R, U = R W^T mod 2^40)
  send B as uint8 limbs [5, T, in]; the server returns Z = B W^T mod 2^40, int64 [T, out]
  Y = lift(Z - U mod 2^40)  exact: |Xq W^T| <= 32767 * quant.weight_max(in) * in < 2^39
  Freivalds check of (Xq, Y), then y = Y * sx[t] * sw[o] (quant.dequantize)
"embed" is a local lookup (the server never sees token ids); attention ops are refused: masks over Z_2^40
only commute with a fixed public matrix. `QuantizedOffload` computes the same integers in-process with no
masks (float64 GEMM, exact below 2^53): the oracle the protected run must equal bit for bit.
"""
from __future__ import annotations

import time

import torch

from ... import quant, ring
from ...config import ModelConfig
from ...stats import Stats
from ..offload import Done
from .freivalds import Freivalds, VerificationError
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
    a request of several rows (a prefill) is padded with zero rows up to a multiple of it, so the server
    learns the prompt's length only to within a bucket (padded rows are masked, computed and checked like
    the others, then dropped; decode steps are one row each). A server's
    stated fingerprint is checked with `expect_fingerprint` before the first request. close() closes
    `inner` too."""

    def __init__(self, inner, cfg: ModelConfig, weights, verify: bool = True,
                 pool_tokens: int = 64, batch_tokens: int = 16, lm_head_rows: int | None = None,
                 stats: Stats | None = None, background: bool = True, length_bucket: int = 1):
        super().__init__(cfg, weights, stats if stats is not None else getattr(inner, "stats", None))
        if length_bucket < 1:
            raise ValueError(f"length_bucket must be at least 1, got {length_bucket}")
        self.inner, self.verify, self.length_bucket = inner, verify, length_bucket
        self.ring_weights = self.quantized.ring_weights
        self.checks = {key: Freivalds(w.q) for key, w in self.qweights.items()} if verify else {}
        self.pool = PadPool(self.ring_weights, pool_tokens, batch_tokens, lm_head_rows, PadSource(), background)
        self.failure: VerificationError | None = None
        self.scratch = Scratch()
        self.checked_rows = 0
        self.verify_s = 0.0

    def submit(self, op: str, layer: int | None, *xs: torch.Tensor):
        if self.failure is not None:
            raise VerificationError(self.failure.op, self.failure.layer,
                                    "an earlier check failed; this session is over") from self.failure
        if op == "embed":
            return self._embed(xs[0])
        key = self._key(op, layer, xs)
        T = xs[0].shape[0]
        with self.stats.timer("mask"):
            xq, sx = quant.quantize_rows(xs[0])                                          # [T, in]
            if T > 1 and T % self.length_bucket:                                          # pad to the bucket
                xq = torch.cat([xq, xq.new_zeros(self.length_bucket - T % self.length_bucket, xq.shape[1])])
                T = xq.shape[0]
            r, u = self.pool.take(key, T)
            limbs = self.inner.empty((ring.LIMBS, T, xq.shape[1]), torch.uint8)          # [5, T, in]
            ring.to_limbs((xq + r).bitwise_and_(ring.MASK), out=limbs)
        return MaskedPending(self, key, self.inner.submit(op, layer, limbs), xq, sx, u)

    def expect_fingerprint(self, stated: str) -> None:
        """Compare the server's stated quantized-weights fingerprint with ours before the first request:
        a server holding other weights would fail every check, this says why up front."""
        if stated != self.fingerprint:
            raise VerificationError("fingerprint", None, f"the server's quantized weights differ "
                                    f"(server {stated[:16]}..., runner {self.fingerprint[:16]}...)")

    def report(self) -> dict:
        """The protection's own figures, for JSON."""
        return {"verify": self.verify, "checked_rows": self.checked_rows, "verify_s": self.verify_s,
                "fingerprint": self.fingerprint, "pool": self.pool.stats()}

    def close(self) -> None:
        self.pool.close()
        self.inner.close()


class Scratch:
    """Two int64 buffers that each result's unmasking and check reuse, grown to the largest result seen: a
    large temporary made afresh is page-faulted in on every use (glibc maps it anew), which cost the runner
    as much as its arithmetic (`scripts/protect_host_cost.py`). Results are finished one at a time, and
    nothing made here outlives `_finish` (the dequantized output is a fresh tensor)."""

    def __init__(self):
        self.flat = [torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)]

    def take(self, i: int, shape: tuple[int, int]) -> torch.Tensor:
        n = shape[0] * shape[1]
        if self.flat[i].numel() < n:
            self.flat[i] = torch.empty(n, dtype=torch.int64)
        return self.flat[i][:n].view(shape)


class MaskedPending:
    """One masked request in flight; result() unmasks, checks and dequantizes once."""

    def __init__(self, owner: ProtectedOffload, key, pending, xq, sx, u):
        self.owner, self.key, self.pending = owner, key, pending
        self.xq, self.sx, self.u = xq, sx, u
        self.value = None

    def result(self) -> torch.Tensor:
        if self.value is None:
            self.value = self._finish(self.pending.result())
        return self.value

    def _finish(self, z: torch.Tensor) -> torch.Tensor:
        owner, (op, layer) = self.owner, self.key
        T, out = self.u.shape
        try:
            if z.dtype != torch.int64 or tuple(z.shape) != (T, out):
                raise VerificationError(op, layer, f"expected int64 [{T}, {out}], got {z.dtype} {tuple(z.shape)}")
            with owner.stats.timer("unmask"):
                if z.numel() and not 0 <= int(z.min()) <= int(z.max()) < ring.MOD:   # & MASK would disarm it
                    raise VerificationError(op, layer, "a value lies outside [0, 2^40)")
                # z may sit in memory the server can still write: y is read from it once, and only
                # this private y is checked and used
                y = ring.lift(torch.sub(z, self.u, out=owner.scratch.take(0, (T, out))))    # [T, out] signed
            if owner.verify:
                t0 = time.perf_counter()
                with owner.stats.timer("verify"):
                    owner.checks[self.key].verify(self.xq, y, op, layer, owner.scratch.take(1, (T, out)))
                owner.verify_s += time.perf_counter() - t0
                owner.checked_rows += T
        except VerificationError as e:
            owner.failure = e
            raise
        return quant.dequantize(y[:self.sx.shape[0]], self.sx, owner.qweights[self.key].scale)   # padding dropped

    def release(self) -> None:
        self.pending.release()
