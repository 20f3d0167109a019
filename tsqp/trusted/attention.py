"""How one layer's attention and O projection are split between the runner and the server: one small class
per policy, chosen once when the model is built, so `TrustedModel.forward` never tests the policy.

  linear  TrustedAttention    softmax(Q K^T) V here, over the trusted KV cache; the server computes O only
  seed    SplitAttention      the prototype's split: Q K^T and P V on the server, scale/mask/softmax here
  flash   OffloadedAttention  fused attention + O on the server: the rotated Q and the cache's K and V go
                              with each request (the cache itself stays here)

Each is called as a generator, like the forward pass: it yields its offloaded requests and returns O's
output [T, D].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig


def causal_mask(start: int, T: int, device: torch.device) -> torch.Tensor | None:
    """Queries at start..start+T-1 over keys 0..start+T-1: [T, S] bool; None where SDPA needs none (T == 1)."""
    if T == 1:
        return None
    qpos = torch.arange(start, start + T, device=device)[:, None]
    return torch.arange(start + T, device=device)[None, :] <= qpos                          # [T, S]


class TrustedAttention:
    """linear: attention on the trusted side; the KV cache holds `dtype` (the attention math's dtype)."""

    def __init__(self, cfg: ModelConfig, offload, timer, dtype: torch.dtype, device: torch.device):
        self.cfg, self.offload, self.timer, self.device = cfg, offload, timer, device
        self.dtype = dtype           # of the rotated queries and of the KV cache

    def query(self, T: int) -> torch.Tensor:
        """Where RoPE writes the queries: [T, H, hd]."""
        return torch.empty(T, self.cfg.num_heads, self.cfg.head_dim, dtype=self.dtype, device=self.device)

    def __call__(self, q: torch.Tensor, spans: list, layer: int):
        """q [N, H, hd]: every span's queries, span after span; each attends over its own cache."""
        N, H, hd = q.shape
        attn = self.offload.empty((N, H * hd))                                               # [N, H*hd] wire
        with self.timer("attention"):
            row = 0
            for s in spans:
                self.attend(q[row:row + s.length], s.cache, layer, s.start,
                            attn[row:row + s.length].view(s.length, H, hd))
                row += s.length
        return (yield self.offload.submit("o", layer, attn))                                 # [N, D]

    def attend(self, q: torch.Tensor, cache, layer: int, start: int, out: torch.Tensor) -> None:
        """One sequence: q [T, H, hd] at positions start.. over its cache -> out [T, H, hd]."""
        T = q.shape[0]
        S = start + T
        k, v = cache.k[layer, :, :S], cache.v[layer, :, :S]                                   # [KV, S, hd]
        y = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None],                                        # [1, H, T, hd]
            attn_mask=None if start == 0 else causal_mask(start, T, self.device),
            is_causal=start == 0 and T > 1, enable_gqa=True)
        out.copy_(y[0].transpose(0, 1))                                                      # [T, H, hd]


class SplitAttention(TrustedAttention):
    """seed: Q K^T and P V on the server, scale, mask and softmax here."""

    def __call__(self, q: torch.Tensor, spans: list, layer: int):
        (span,) = spans                        # one sequence: its scores and probabilities go out whole
        cache, start = span.cache, span.start
        T, H, hd = q.shape
        S, KV = start + T, self.cfg.num_kv_heads
        attn = self.offload.empty((T, H * hd))                                               # [T, H*hd] wire
        q_wire = self.offload.empty((H, T, hd))
        k_wire = self.offload.empty((KV, S, hd))
        with self.timer("attention"):
            q_wire.copy_(q.transpose(0, 1))
            k_wire.copy_(cache.k[layer, :, :S])
        scores = yield self.offload.submit("qk", layer, q_wire, k_wire)                      # [H, T, S]
        probs = self.offload.empty((H, T, S))
        v_wire = self.offload.empty((KV, S, hd))
        with self.timer("attention"):
            s = scores.float() / math.sqrt(hd)
            mask = causal_mask(start, T, self.device)
            if mask is not None:
                s.masked_fill_(~mask, float("-inf"))
            probs.copy_(torch.softmax(s, dim=-1))
            v_wire.copy_(cache.v[layer, :, :S])
        y = yield self.offload.submit("av", layer, probs, v_wire)                            # [H, T, hd]
        with self.timer("attention"):
            attn.view(T, H, hd).copy_(y.transpose(0, 1))
        return (yield self.offload.submit("o", layer, attn))                                 # [T, D]


class OffloadedAttention(TrustedAttention):
    """flash: K and V travel in the wire dtype, so the cache keeps them so, and RoPE writes the queries
    straight into a wire buffer."""

    def __init__(self, cfg: ModelConfig, offload, timer, dtype: torch.dtype, device: torch.device):
        super().__init__(cfg, offload, timer, offload.dtype, device)     # the asked-for dtype does not apply

    def query(self, T: int) -> torch.Tensor:
        return self.offload.empty((T, self.cfg.num_heads, self.cfg.head_dim), self.dtype)

    def __call__(self, q: torch.Tensor, spans: list, layer: int):
        (span,) = spans
        cache, start = span.cache, span.start
        S = start + q.shape[0]
        k, v = cache.k[layer, :, :S], cache.v[layer, :, :S]                                  # [KV, S, hd]
        return (yield self.offload.submit("attn_o", layer, q, k, v))                         # [T, D]


ATTENTION = {"linear": TrustedAttention, "seed": SplitAttention, "flash": OffloadedAttention}
POLICIES = tuple(ATTENTION)
