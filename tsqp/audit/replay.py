"""The attacker's own copy of the public model: the LLaMA forward pass written from the model's public
definition (not the runner's code, and none of the runner's state), used to compute what a candidate token
would look like at a layer's input. Linear layers run in the wire dtype as the server runs them; norms,
RoPE, attention and residuals in float32, as a runner would.

`Context` is the attacker's KV cache over the tokens it has recovered so far; `candidates_at(layer, ids)`
computes, for each candidate id at the next position, that layer's attention input (RMSNorm(h) * g) as the
runner would send it, all candidates in one batch that shares the prefix's cache.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..weights import layer_names


def rms_normalize(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h [n, D] float32 -> weight * h / rms(h), float32."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies [hd/2] (float64), with Llama-3 scaling when the config has it."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = cfg.rope_scaling
    if not s:
        return inv
    old_len, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)      # 0: long waves, 1: short waves
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    return torch.where((wavelen <= old_len / low) & (wavelen >= old_len / high),
                       (1 - smooth) * inv / factor + smooth * inv, scaled)


class PublicModel:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], wire: torch.dtype):
        """weights: `tsqp.weights.load(...)`'s dict (any dtype); wire: the dtype of the recorded activations."""
        self.cfg, self.wire = cfg, wire
        self.embed = weights["model.embed_tokens.weight"].to(wire)                         # [V, D]
        head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"].to(wire)
        self.head_t = head.T                                                                # [D, V]
        self.final_norm = weights["model.norm.weight"].float()
        self.layers = []
        for i in range(cfg.num_layers):
            n = layer_names(i)
            self.layers.append({
                "qkv_t": torch.cat([weights[n["q"]], weights[n["k"]], weights[n["v"]]]).to(wire).T,  # [D, Q+2KV]
                "o_t": weights[n["o"]].to(wire).T, "down_t": weights[n["down"]].to(wire).T,
                "gate_up_t": torch.cat([weights[n["gate"]], weights[n["up"]]]).to(wire).T,     # [D, 2I]
                "attn_norm": weights[n["attn_norm"]].float(), "mlp_norm": weights[n["mlp_norm"]].float()})
        self.inv_freq = inverse_frequencies(cfg).float()

    # ---- building blocks ----------------------------------------------------------------------------
    def layer_input(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual h [n, D] float32 -> what the runner sends to layer `layer`'s qkv: [n, D] wire dtype."""
        return rms_normalize(h, self.layers[layer]["attn_norm"], self.cfg.rms_norm_eps).to(self.wire)

    def rope(self, x: torch.Tensor, position: int) -> torch.Tensor:
        """x [n, heads, hd] float32 at one position -> rotate-half RoPE."""
        angle = position * self.inv_freq                                                     # [hd/2]
        cos, sin = torch.cat((angle.cos(), angle.cos())), torch.cat((angle.sin(), angle.sin()))  # [hd]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rotated * sin

    def mlp(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h [n, D] float32 -> h + MLP(RMSNorm(h)), float32."""
        w, I = self.layers[layer], self.cfg.intermediate_size
        gate_up = rms_normalize(h, w["mlp_norm"], self.cfg.rms_norm_eps).to(self.wire) @ w["gate_up_t"]  # [n, 2I]
        act = F.silu(gate_up[:, :I]) * gate_up[:, I:]                                       # wire dtype, as sent
        return h + (act @ w["down_t"]).float()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [n, D] -> next-token logits [n, V] float32."""
        return (rms_normalize(h, self.final_norm, self.cfg.rms_norm_eps).to(self.wire) @ self.head_t).float()

    def layer0_table(self) -> torch.Tensor:
        """Layer 0's input for every vocabulary entry at any position: RMSNorm(E[t]) * g0, [V, D] float32."""
        return self.layer_input(self.embed.float(), 0).float()


class Context:
    """The attacker's KV cache over its recovered tokens (float32, [L, KV, max_len, hd])."""

    def __init__(self, model: PublicModel, max_len: int):
        cfg = model.cfg
        self.model, self.length = model, 0
        shape = (cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)

    def _attend(self, h: torch.Tensor, layer: int, commit: bool) -> torch.Tensor:
        """One attention block for n rows that are all candidates for position `self.length`, each attending
        to the cached prefix and to itself. h [n, D] -> h + attention output. commit: n == 1, append K/V."""
        m, cfg, w = self.model, self.model.cfg, self.model.layers[layer]
        n, H, KV, hd, S = h.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.length
        qkv = (m.layer_input(h, layer) @ w["qkv_t"]).float()                               # [n, Q+2KV]
        qk = m.rope(qkv[:, :(H + KV) * hd].view(n, H + KV, hd), S)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, (H + KV) * hd:].view(n, KV, hd)              # [n, heads, hd]
        g = H // KV
        q = q.view(n, KV, g, hd).permute(1, 2, 0, 3)                                         # [KV, g, n, hd]
        scale = 1.0 / math.sqrt(hd)
        prefix = q @ self.k[layer, :, :S].transpose(1, 2)[:, None] * scale                  # [KV, g, n, S]
        own = (q * k.permute(1, 0, 2)[:, None]).sum(-1, keepdim=True) * scale              # [KV, g, n, 1]
        p = torch.softmax(torch.cat((prefix, own), -1), -1)
        out = p[..., :S] @ self.v[layer, :, :S][:, None] + p[..., S:] * v.permute(1, 0, 2)[:, None]  # [KV, g, n, hd]
        if commit:
            self.k[layer, :, S], self.v[layer, :, S] = k[0], v[0]
        attn = out.permute(2, 0, 1, 3).reshape(n, H * hd).to(m.wire)                         # [n, H*hd]
        return h + (attn @ w["o_t"]).float()

    def candidates_at(self, layer: int, ids: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """ids [n] candidates for the next position -> layer `layer`'s input for each, [n, D] float32."""
        rows = []
        for part in torch.split(ids, batch):
            h = self.model.embed[part].float()                                              # [b, D]
            for i in range(layer):
                h = self.model.mlp(self._attend(h, i, commit=False), i)
            rows.append(self.model.layer_input(h, layer).float())
        return torch.cat(rows)

    def append(self, token: int) -> torch.Tensor:
        """Extend the prefix by one token; returns the next position's logits [V] float32 (the language prior)."""
        if self.length >= self.k.shape[2]:
            raise ValueError(f"context full ({self.length} positions)")
        h = self.model.embed[torch.tensor([token])].float()
        for i in range(self.model.cfg.num_layers):
            h = self.model.mlp(self._attend(h, i, commit=True), i)
        self.length += 1
        return self.model.logits(h)[0]

    def prior(self, start_token: int | None) -> torch.Tensor:
        """Logits for position 0 of a text: the model's next token after a document start token, computed in
        a throw-away context (the text itself begins at position 0)."""
        if start_token is None:
            return torch.zeros(self.model.embed.shape[0])
        scratch = Context(self.model, 1)
        return scratch.append(start_token)
