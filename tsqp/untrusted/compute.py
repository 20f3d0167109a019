"""The untrusted side's math: embedding, fused Q/K/V, O, fused gate/up, down, LM head (and, for the
`seed` policy, Q K^T and P V). Weights stay resident on the device; inputs and outputs are host tensors
(views of a shared-memory arena or of received frames)."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..ops import MATMUL_OPS
from ..weights import layer_names


class Compute:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: str):
        self.cfg, self.device = cfg, torch.device(device)
        self.dtype = weights["model.embed_tokens.weight"].dtype
        to = dict(device=self.device)
        self.embed = weights["model.embed_tokens.weight"].to(**to)
        self.lm_head = self.embed if cfg.tie_word_embeddings else weights["lm_head.weight"].to(**to)
        self.layers = []
        for i in range(cfg.num_layers):
            n = layer_names(i)
            self.layers.append({
                "qkv": torch.cat([weights[n["q"]], weights[n["k"]], weights[n["v"]]]).to(**to),  # [Q+2KV, D]
                "o": weights[n["o"]].to(**to),                                                 # [D, Q]
                "gate_up": torch.cat([weights[n["gate"]], weights[n["up"]]]).to(**to),         # [2I, D]
                "down": weights[n["down"]].to(**to),                                           # [D, I]
            })
        # [in, out] views, made once: a call then creates no tensor but its output's
        self.lm_head_t = self.lm_head.T
        self.layers_t = [{op: w.T for op, w in layer.items()} for layer in self.layers]
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def forward(self, op: str, layer: int | None, *xs: torch.Tensor) -> torch.Tensor:
        """Device tensors in, device tensor out."""
        if op == "embed":
            return self.embed[xs[0]]                                    # [T, D]
        if op == "lm_head":
            return xs[0] @ self.lm_head_t                               # [T, V]
        if op == "qk":   # q [H, T, hd], k [KV, S, hd] -> [H, T, S]
            q, k = xs
            g = q.shape[0] // k.shape[0]
            return q @ k.repeat_interleave(g, 0).transpose(1, 2)
        if op == "av":   # p [H, T, S], v [KV, S, hd] -> [H, T, hd]
            p, v = xs
            g = p.shape[0] // v.shape[0]
            return p @ v.repeat_interleave(g, 0)
        if op == "attn_o":   # q [T, H, hd], k/v [KV, S, hd]; queries are positions S-T..S-1
            q, k, v = xs
            T, H, hd = q.shape
            S = k.shape[1]
            mask = None
            if 1 < T < S:
                mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
            y = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                               is_causal=T == S and T > 1, enable_gqa=True)  # [1, H, T, hd]
            return y[0].transpose(0, 1).reshape(T, H * hd) @ self.layers_t[layer]["o"]     # [T, D]
        return xs[0] @ self.layers_t[layer][op]                       # [T, out]

    def launch(self, op: str, layer: int | None, inputs: list[torch.Tensor], out: torch.Tensor | None = None):
        """Start one op on host tensors; the result lands in `out` (host) when given. Returns (result, finish):
        finish() waits for the device and returns the compute seconds (copies included), measured here.
        On CUDA the copies and the kernels are queued on one stream, so the caller may work meanwhile."""
        if not self.cuda:
            y, seconds = self.run(op, layer, inputs, out)
            return y, lambda: seconds
        with torch.cuda.stream(self.stream):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            xs = [x.to(self.device, non_blocking=True) for x in inputs]   # DMA when the host memory is pinned
            y = self.forward(op, layer, *xs)
            if out is None:
                out = torch.empty(y.shape, dtype=y.dtype)  # pageable: frames mode copies it anyway
            out.copy_(y, non_blocking=True)
            end.record()

        def finish() -> float:
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return out, finish

    def run(self, op: str, layer: int | None, inputs: list[torch.Tensor],
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """One op, waited for: (result, compute seconds measured with the device synchronised)."""
        if self.cuda:
            y, finish = self.launch(op, layer, inputs, out)
            return y, finish()
        t0 = time.perf_counter()
        if out is not None and op in MATMUL_OPS:      # a plain x @ W: straight into `out`
            y = torch.matmul(inputs[0], self.lm_head_t if op == "lm_head" else self.layers_t[layer][op], out=out)
        else:
            y = self.forward(op, layer, *inputs)
            y = y if out is None else out.copy_(y)
        return y, time.perf_counter() - t0
