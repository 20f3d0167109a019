"""`tsqp audit DIR --model M [--json PATH]`: attack a recording (`tsqp serve --record DIR`) as the curious
server would, with the public checkpoint only, and print what it recovers of the prompts and the generated
tokens (exact position accuracy and set recall, 95% Wilson intervals, chance levels measured on unrelated
prompts, a verdict: at chance or above it), plus the tests any input claimed masked must pass."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console

DOCUMENT_START = ("<|endoftext|>", "<|begin_of_text|>", "<s>")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("audit", help="attack a server recording (tsqp serve --record DIR): what does the "
                                            "server learn about the prompts?")
    p.add_argument("dir", help="the recording folder (or one session folder in it)")
    p.add_argument("--model", default=os.environ.get("LLAMA_MODEL_PATH"),
                   help="the public checkpoint the server ran: a model directory or random:PRESET "
                        "(env LLAMA_MODEL_PATH)")
    p.add_argument("--json", default=None, help="write the figures, settings and every guess here")
    p.add_argument("--truth", default=None,
                   help="the runner's ground truth to score against: JSON lines {session, prompt_ids, "
                        "generated_ids} (default DIR/truth.jsonl when present; without it guesses are reported "
                        "unscored)")
    p.add_argument("--layers", default=None,
                   help="comma list of layers for vocabulary matching (default: 0, the middle and the last)")
    p.add_argument("--shortlist", default="8,64",
                   help="vocabulary matching: candidate shortlist sizes tried in turn, top-k of the model's own "
                        "prior (default 8,64; a GPU attacker can afford the whole vocabulary)")
    p.add_argument("--first-shortlist", default="64,1024,4096",
                   help="the same at position 0, whose rows are computed once for all sequences (default "
                        "64,1024,4096; 'all' for the whole vocabulary)")
    p.add_argument("--vocab-sequences", type=int, default=None,
                   help="vocabulary matching on the first N sequences only (it is the costly attack)")
    p.add_argument("--vocab-positions", type=int, default=None,
                   help="vocabulary matching on the first N prompt positions only (decode steps need them all)")
    p.add_argument("--start-token", default="auto",
                   help="token id whose next-token prior ranks position 0's candidates (default: the "
                        "tokenizer's document start, e.g. <|endoftext|>, else the config's BOS)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def document_start(model: str, cfg) -> int | None:
    """The id of a document-start token from the model folder's tokenizer.json, else the config's BOS."""
    file = Path(model) / "tokenizer.json"
    if file.is_file():
        added = {t.get("content"): t.get("id") for t in json.loads(file.read_text()).get("added_tokens", [])}
        for name in DOCUMENT_START:
            if isinstance(added.get(name), int):
                return added[name]
    return cfg.bos_token_id


def sizes(flag: str, text: str, vocab: int) -> tuple[int, ...]:
    """'8,64' -> (8, 64); 'all' stands for the whole vocabulary."""
    try:
        found = tuple(sorted(vocab if k.strip() == "all" else int(k) for k in text.split(",") if k.strip()))
    except ValueError:
        found = ()
    if not found or any(k < 1 for k in found):
        raise ValueError(f"{flag} {text}: give positive sizes, e.g. 8,64 (or all)")
    return tuple(min(k, vocab) for k in found)


def main(args) -> dict:
    import torch

    from tsqp import weights as W
    from tsqp.audit import attacks as A
    from tsqp.audit import recording
    from tsqp.audit.report import AuditSettings, load_truth, markdown, masked_summary, masked_table, rich_table, \
        run_audit, stderr_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model:
        raise ValueError("--model is required (the public checkpoint the server ran), or set LLAMA_MODEL_PATH")
    sessions = recording.load(args.dir)
    truth_file = Path(args.truth) if args.truth else Path(args.dir) / "truth.jsonl"
    if args.truth and not truth_file.is_file():
        raise ValueError(f"--truth {truth_file}: not found")
    truth = load_truth(truth_file) if truth_file.is_file() else None
    cfg, weights = W.load(args.model, torch.float32)
    start = document_start(args.model, cfg) if args.start_token == "auto" else int(args.start_token)
    stages = sizes("--shortlist", args.shortlist, cfg.vocab_size)
    first_stages = sizes("--first-shortlist", args.first_shortlist, cfg.vocab_size)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",") if x.strip()]
    for layer in layers or []:
        if not 0 <= layer < cfg.num_layers:
            raise ValueError(f"--layers: layer {layer} outside 0..{cfg.num_layers - 1}")
    settings = AuditSettings(layers=layers, vocab_sequences=args.vocab_sequences,
                             vocab=A.VocabSettings(stages=stages, first_stages=first_stages, max_positions=args.vocab_positions,
                                                   start_token=start))
    report = run_audit(sessions, cfg, weights, truth, settings, progress=stderr_progress)
    report["recording"], report["model"] = str(Path(args.dir).resolve()), args.model
    console = Console(highlight=False)
    c = report["counts"]
    console.print(f"{c['sessions']} session(s), {c['sequences']} sequence(s), {c['prompt_tokens']} prompt tokens, "
                  f"{c['decode_steps']} decode steps; vocabulary matching on {report['vocab_sequences']} "
                  f"sequence(s) at layers {report['vocab_layers']}"
                  + ("" if truth else "; no ground truth: guesses unscored (see --json)"))
    console.print(rich_table(report))
    for a in report["attacks"]:
        m = a.get("near_exact_matches")
        if m and m["positions"]:
            console.print(f"{a['attack']}: {m['matched']} of {m['positions']} positions matched near-exactly "
                          f"(relative distance < {settings.vocab.accept}, runner-up {settings.vocab.margin}x "
                          f"farther), {m['correct']} of them the right token; "
                          f"the others' token was outside the shortlist or followed a wrong one")
    console.print(masked_table(report))
    for line in masked_summary(report["masked"]):
        console.print(line)
    report["markdown"] = markdown(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        console.print(f"wrote {args.json}")
    return report
