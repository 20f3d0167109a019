"""The trusted runner's math: RMSNorm, RoPE, attention, SiLU, residuals, the KV cache and control flow.

Every heavy linear step goes through an `Offload` (offload.py), in-process or remote; this module imports
nothing from transport or server. A forward pass over one chunk of tokens is a generator that yields
each offloaded request and is resumed with its result, so several chunks can be interleaved: while the
server computes chunk i+1's step, the runner does chunk i's non-linear math (see `run_interleaved`).
"""
from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..weights import layer_names
from .attention import ATTENTION, POLICIES


class Rope:
    """Rotary tables (rotate-half convention), with Llama-3 frequency scaling when configured."""

    def __init__(self, cfg: ModelConfig):
        hd = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        s = cfg.rope_scaling
        if s:
            old_len = s["original_max_position_embeddings"]
            low_wavelen = old_len / s["low_freq_factor"]
            high_wavelen = old_len / s["high_freq_factor"]
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
            smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv_freq = torch.where(medium, smoothed, scaled)
        self.inv_freq = inv_freq.float()
        self.cos = self.sin = torch.empty(0, hd)

    def tables(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start..start+T-1: [T, hd/2] each."""
        if start + T > self.cos.shape[0]:
            n = max(start + T, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)   # [n, hd/2]
            self.cos, self.sin = freqs.cos(), freqs.sin()
        return self.cos[start:start + T], self.sin[start:start + T]


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, hd/2] cos, sin -> [T, 1, hd] (cos, cos) and (-sin, sin), so that RoPE is two full-width passes."""
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, n, hd] in any dtype and strides (e.g. Q and K of the qkv result together); cos, sin: [T, 1, hd]
    from `rope_tables`. Returns rotate-half RoPE of x, float32 [T, n, hd] contiguous:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). One float32 copy and contiguous full-width passes
    run ~2x faster than half-width mixed-dtype ops on strided bf16 views, and round once, not twice."""
    y = x.to(torch.float32, copy=True)                                          # never x itself
    half = y.shape[-1] // 2
    rot = torch.cat((y[..., half:], y[..., :half]), -1)                         # (x2, x1)
    return y.mul_(cos).addcmul_(rot, sin)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """x: [T, D] float32; writes weight * x / rms(x) into `out` (the wire buffer), casting once.
    vecdot sums squares without a [T, D] temporary; the scaling stays in float32 in place."""
    inv = torch.linalg.vecdot(x, x)[:, None].div_(x.shape[-1]).add_(eps).rsqrt_()   # [T, 1]
    return out.copy_(torch.mul(x, inv).mul_(weight))


def add_rmsnorm_(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> torch.Tensor:
    """The residual step and the next norm: h += y (h float32 [T, D], in place); out = RMSNorm(h). Returns h."""
    h += y
    rmsnorm(h, weight, eps, out)
    return h


def rope_qkv_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
    """qkv [T, Q+2KV] -> q [T, H, hd] = RoPE(Q), k [T, KV, hd] = RoPE(K), v [T, KV, hd] = V (any strides:
    k and v are usually views of the KV cache)."""
    T, H, hd = q.shape
    qk = apply_rope(qkv[:, :(H + k.shape[1]) * hd].view(T, -1, hd), cos, sin)           # [T, H+KV, hd]
    q.copy_(qk[:, :H])
    k.copy_(qk[:, H:])
    v.copy_(qkv[:, qk.shape[1] * hd:].view(v.shape))


def silu_mul_(gate_up: torch.Tensor, out: torch.Tensor) -> None:
    """gate_up [T, 2I] -> out [T, I] = SiLU(gate) * up, in the wire dtype as the reference model does."""
    I = out.shape[-1]
    torch.mul(F.silu(gate_up[:, :I]), gate_up[:, I:], out=out)


# The same steps for torch.compile: each becomes one vectorised loop over its inputs (float32 inside,
# rounded once), where eager torch makes several passes through memory with temporaries.
def _add_rmsnorm_fused(h, y, weight, eps: float, out):
    s = h + y       # returned, not written into h: inductor 2.13 fails on a graph that writes two inputs
    out.copy_(s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight)
    return s


def _rope_qkv_fused(qkv, cos, sin, q, k, v):
    T, H, hd = q.shape
    x = qkv[:, :(H + k.shape[1]) * hd].view(T, -1, hd).float()                           # [T, H+KV, hd]
    half = hd // 2
    r = x * cos + torch.cat((x[..., half:], x[..., :half]), -1) * sin
    q.copy_(r[:, :H])
    k.copy_(r[:, H:])
    v.copy_(qkv[:, x.shape[1] * hd:].view(v.shape))


def _silu_mul_fused(gate_up, out):
    I = out.shape[-1]
    out.copy_(F.silu(gate_up[:, :I].float()) * gate_up[:, I:].float())


EAGER = {"add_rmsnorm": add_rmsnorm_, "rope_qkv": rope_qkv_, "silu_mul": silu_mul_}
FUSED = {"add_rmsnorm": _add_rmsnorm_fused, "rope_qkv": _rope_qkv_fused, "silu_mul": _silu_mul_fused}


class Elementwise:
    """The trusted side's elementwise steps between two offloaded calls: eager torch, or each fused into one
    loop by torch.compile (`--compile`: needs a C++ compiler at run time; a second prompt length compiles
    once more, for any length). A decode step (one row) runs eagerly either way: its tensors are tiny and a
    compiled call's guards would cost more than the fusion saves. If compiling fails, eager is used."""

    def __init__(self, fused: bool = False):
        self.fused = fused
        self.steps = {name: torch.compile(f) for name, f in FUSED.items()} if fused else EAGER

    def call(self, name: str, *args):
        """args[0] has a row per token."""
        if args[0].shape[0] == 1:
            return EAGER[name](*args)
        try:
            return self.steps[name](*args)
        except Exception as e:      # e.g. no C++ compiler inside the enclave: say so once, go on eagerly
            if not self.fused:
                raise
            print(f"WARNING: --compile failed ({type(e).__name__}: {str(e)[:200]}); using eager torch",
                  file=sys.stderr, flush=True)
            self.__init__(fused=False)
            return self.steps[name](*args)


class KVCache:
    """Keys (after RoPE) and values, kept on the trusted side only."""

    def __init__(self, cfg: ModelConfig, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)   # [L, KV, maxT, hd]
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len, self.length = max_len, 0


@dataclass
class Span:
    """One sequence's rows in a batched forward: `length` tokens at positions start.. of its own cache."""
    cache: KVCache
    start: int
    length: int


class TrustedModel:
    """The runner's side of the model. policy (attention.py): linear - attention here (default); seed - Q K^T
    and P V on the server, softmax here; flash - fused attention + O on the server."""

    device = torch.device("cpu")    # the runner's own; `tsqp bench`'s no-split reference runs it on the GPU

    def __init__(self, cfg: ModelConfig, norms: dict[str, torch.Tensor], offload, policy: str = "linear",
                 stats=None, attn_dtype: torch.dtype = torch.float32, fused: bool = False):
        if policy not in ATTENTION:
            raise ValueError(f"unknown policy '{policy}'; choose one of {', '.join(POLICIES)}")
        self.cfg, self.offload, self.policy = cfg, offload, policy
        self.norms = {k: v.to(self.device, torch.float32) for k, v in norms.items()}
        self.rope = Rope(cfg)
        self.timer = stats.timer if stats is not None else (lambda name: nullcontext())
        self.attention = ATTENTION[policy](cfg, offload, self.timer, attn_dtype, self.device)
        self.ew = Elementwise(fused)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(self.cfg, max_len, self.attention.dtype, self.device)

    # ---- one batch of rows ---------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, cache: KVCache, start: int, want_logits: bool = True,
                all_positions: bool = False):
        """Generator over one chunk: ids [T] at positions start..start+T-1. Yields pending requests,
        returns the last position's logits [V] (float32), every position's [T, V] (all_positions), or None."""
        T = ids.shape[0]
        rows = None if not want_logits else list(range(T)) if all_positions else [T - 1]
        logits = yield from self.forward_spans(ids, [Span(cache, start, T)], rows)
        return None if logits is None else logits if all_positions else logits[0]

    def forward_spans(self, ids: torch.Tensor, spans: list["Span"], logit_rows: list[int] | None):
        """Generator over one batch: ids [N] holds every span's tokens, span after span; each span is one
        sequence's rows at its own positions in its own KV cache. Every offloaded op is one request carrying
        all N rows; attention runs per span. Returns the logits [R, V] (float32) of logit_rows (indices into
        the N rows), or None."""
        cfg, N = self.cfg, ids.shape[0]
        if sum(s.length for s in spans) != N:
            raise ValueError(f"the spans hold {sum(s.length for s in spans)} rows, the batch {N}")
        for s in spans:
            if s.start + s.length > s.cache.max_len:
                raise ValueError(f"positions up to {s.start + s.length} exceed the KV cache of {s.cache.max_len}")
        if len(spans) > 1 and self.policy != "linear":
            raise ValueError(f"a batch of several sequences needs --policy linear, not {self.policy}")
        h = (yield self.offload.submit("embed", None, ids)).to(torch.float32, copy=True)  # [N, D] residual
        with self.timer("rope"):
            cos, sin = rope_tables(*(t.to(self.device) for t in self._rope_rows(spans)))    # [N, 1, hd]
        x = self._norm(h, self.norms[layer_names(0)["attn_norm"]])
        for layer in range(cfg.num_layers):
            n = layer_names(layer)
            qkv = (yield self.offload.submit("qkv", layer, x))                             # [N, Q+2KV]
            q = self.attention.query(N)                                                    # [N, H, hd]
            with self.timer("rope"):
                k, v = self._kv_targets(spans, layer, N)                                   # [N, KV, hd]
                self.ew.call("rope_qkv", qkv, cos, sin, q, k, v)
                if len(spans) > 1:                 # one rope pass over all rows, then each span's K/V home
                    self._store_kv(spans, layer, k, v)
            o = yield from self.attention(q, spans, layer)                                 # [N, D]
            h, x = self._add_norm(h, o, self.norms[n["mlp_norm"]])                          # h + o
            gate_up = (yield self.offload.submit("gate_up", layer, x))                     # [N, 2I]
            act = self.offload.empty((N, cfg.intermediate_size))
            with self.timer("silu"):
                self.ew.call("silu_mul", gate_up, act)
            down = yield self.offload.submit("down", layer, act)                           # [N, D]
            if layer + 1 < cfg.num_layers:
                h, x = self._add_norm(h, down, self.norms[layer_names(layer + 1)["attn_norm"]])  # h + down
            else:
                h += down
        for s in spans:
            s.cache.length = max(s.cache.length, s.start + s.length)
        if logit_rows is None:
            return None
        x = self._norm(h if len(logit_rows) == N else h[logit_rows], self.norms["model.norm.weight"])
        return (yield self.offload.submit("lm_head", None, x)).to(torch.float32, copy=True)      # [R, V]

    def _rope_rows(self, spans: list["Span"]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, hd/2] for every row's own position."""
        if len(spans) == 1:
            return self.rope.tables(spans[0].start, spans[0].length)
        parts = [self.rope.tables(s.start, s.length) for s in spans]
        return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])

    def _kv_targets(self, spans: list["Span"], layer: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where RoPE writes K and V [N, KV, hd]: the one span's cache itself, or scratch for several."""
        if len(spans) == 1:
            s = spans[0]
            return (s.cache.k[layer, :, s.start:s.start + N].transpose(0, 1),
                    s.cache.v[layer, :, s.start:s.start + N].transpose(0, 1))
        shape = (N, self.cfg.num_kv_heads, self.cfg.head_dim)
        return (torch.empty(shape, dtype=self.attention.dtype, device=self.device),
                torch.empty(shape, dtype=self.attention.dtype, device=self.device))

    @staticmethod
    def _store_kv(spans: list["Span"], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        row = 0
        for s in spans:
            end = row + s.length
            s.cache.k[layer, :, s.start:s.start + s.length].copy_(k[row:end].transpose(0, 1))
            s.cache.v[layer, :, s.start:s.start + s.length].copy_(v[row:end].transpose(0, 1))
            row = end

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = self.offload.empty(tuple(h.shape))
        with self.timer("rmsnorm"):
            rmsnorm(h, weight, self.cfg.rms_norm_eps, out)
        return out

    def _add_norm(self, h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + y, RMSNorm(h + y) in a wire buffer); h may be updated in place."""
        out = self.offload.empty(tuple(h.shape))
        with self.timer("rmsnorm"):
            h = self.ew.call("add_rmsnorm", h, y, weight, self.cfg.rms_norm_eps, out)
        return h, out

    # ---- whole prompts and single tokens -------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, cache: KVCache, chunks: int = 1) -> torch.Tensor:
        """ids [T] -> last position's logits [V]. With chunks > 1 the prompt is split and the chunks are
        interleaved so that runner and server work at the same time (causal attention allows it). An offload
        that pads requests to a length bucket (`length_bucket`, protected offload) has the chunks cut at
        whole buckets and is told the requests are a prefill's (`prefilling`): every request size it sends
        then follows from the prompt's length in buckets, not from the length itself."""
        start = cache.length
        parts = ids.split(chunk_sizes(ids.shape[0], chunks, getattr(self.offload, "length_bucket", 1)))
        offsets = [start + sum(len(p) for p in parts[:i]) for i in range(len(parts))]
        gens = [self.forward(p, cache, o, want_logits=(i == len(parts) - 1))
                for i, (p, o) in enumerate(zip(parts, offsets))]
        with getattr(self.offload, "prefilling", nullcontext)():
            return run_interleaved(gens)[-1]

    def score(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """ids [T] -> every position's logits [T, V] (teacher-forced evaluation: row i predicts ids[i+1])."""
        return run_interleaved([self.forward(ids, cache, cache.length, all_positions=True)])[-1]

    def decode(self, token: int, cache: KVCache) -> torch.Tensor:
        ids = torch.tensor([token], device=self.device)
        return run_interleaved([self.forward(ids, cache, cache.length)])[-1]


def chunk_sizes(T: int, chunks: int, bucket: int = 1) -> list[int]:
    """The sizes of a T-token prompt's chunks (none empty). With a bucket > 1, each chunk but the last holds
    whole buckets and how many follows from ceil(T / bucket) alone; the last holds the rest (>= 1 token), so
    once it is padded to whole buckets every size depends on T only through ceil(T / bucket)."""
    if bucket <= 1:
        return even_split(T, chunks)
    sizes = [b * bucket for b in even_split(-(-T // bucket), chunks)[:-1]]
    return sizes + [T - sum(sizes)]


def even_split(n: int, parts: int) -> list[int]:
    """n into at most `parts` nonempty sizes that differ by at most one, larger first (torch.tensor_split's)."""
    size, extra = divmod(n, parts)
    return [size + (i < extra) for i in range(parts) if size + (i < extra)]


def run_interleaved(gens: list) -> list:
    """Drive chunk generators round-robin: each waits for its pending request and runs to its next one.
    The order keeps chunk i's K/V in the cache before chunk i+1 attends at the same layer."""
    pending = [g.send(None) for g in gens]
    results = [None] * len(gens)
    active = list(range(len(gens)))
    while active:
        for i in list(active):
            done = pending[i]
            try:
                pending[i] = gens[i].send(done.result())
            except StopIteration as stop:
                results[i] = stop.value
                active.remove(i)
            done.release()     # the chunk has consumed that result by the time it yields again
    return results
