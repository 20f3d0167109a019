"""Run every attack over a recording and score it against the ground truth (when one is given): the figures
of `tsqp audit`, as a dict (the --json file), a rich table and a markdown table.

The ground truth is what the runner knew (never the server): a JSON-lines file with one line per sequence,
{"session": LABEL, "prompt_ids": [...], "generated_ids": [...]}, several lines for one session in order.
Decode step k fed generated_ids[k]. Without it the attacks still run and their guesses are reported.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from . import attacks as A
from . import masked as MK
from .recording import TORCH_DTYPES, RecordedSession
from .replay import PublicModel
from .scoring import SHIFTS, Rate, exact, set_recall
from .views import sequences

METRICS = ("prompt_exact", "prompt_set", "generated_exact", "generated_set")
CHANCE_ALPHA = 0.01      # family-wise: all of a report's at-chance verdicts together (scoring.py)


@dataclass
class AuditSettings:
    layers: list[int] | None = None          # vocabulary matching layers (default: 0, the middle, the last)
    vocab: A.VocabSettings = field(default_factory=A.VocabSettings)
    vocab_sequences: int | None = None       # run vocabulary matching on the first N sequences (None: all)
    span_threshold: float = 0.2


def load_truth(path: str | Path) -> dict[str, list[dict]]:
    truth: dict[str, list[dict]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        if not isinstance(d.get("session"), str) or not isinstance(d.get("prompt_ids"), list):
            raise ValueError(f"{path}:{n}: needs 'session' (a label) and 'prompt_ids' (a list)")
        truth.setdefault(d["session"], []).append(d)
    return truth


def wire_dtype(session: RecordedSession) -> torch.dtype | None:
    """The dtype of the activations the server received (its weights' dtype)."""
    for call in session.calls:
        if call.op == "qkv" and call.input_refs and call.input_refs[0].is_float:
            return TORCH_DTYPES[call.input_refs[0].dtype]
    return None


def tally(guess: A.Guess, truth: dict, n_decode: int, vocab: int) -> dict[str, tuple[int, int, float]]:
    """One guess against one truth: metric -> (hits, tried, uniform-guess hits)."""
    out = {}
    prompt, fed = truth["prompt_ids"], list(truth.get("generated_ids", []))[:n_decode]
    if guess.prompt is not None:
        out["prompt_exact"] = exact(guess.prompt, prompt, vocab)
    tokens = guess.prompt_tokens()
    if tokens is not None:     # a positional guess that stopped early is scored on the positions it tried
        tried = prompt if guess.prompt_set is not None else prompt[:len(guess.prompt)]
        out["prompt_set"] = set_recall(tokens, tried, vocab)
    if guess.decode is not None and fed:
        out["generated_exact"] = exact(guess.decode, fed, vocab)
        out["generated_set"] = set_recall({t for t in guess.decode if t is not None}, fed, vocab)
    return out


class Scorer:
    """Per attack, the four rates, each with its chance level (scoring.py: unrelated pairings)."""

    def __init__(self, vocab: int, shifts: int = SHIFTS):
        self.vocab, self.shifts = vocab, shifts
        self.scored: dict[str, list[tuple[A.Guess, dict, int]]] = {}
        self.confident: dict[str, dict] = {}

    def add(self, attack: str, guess: A.Guess, truth: dict | None, n_decode: int) -> None:
        scored = self.scored.setdefault(attack, [])
        if truth is None:
            return
        scored.append((guess, truth, n_decode))
        if guess.confident is not None:       # how often a near-exact match named the right token
            prompt, fed = truth["prompt_ids"], list(truth.get("generated_ids", []))[:n_decode]
            confident = self.confident.setdefault(attack, {"positions": 0, "matched": 0, "correct": 0})
            tokens = (guess.prompt or []) + (guess.decode or [])
            true = prompt[:len(guess.prompt or [])] + fed
            for ok, g, t in zip(guess.confident, tokens, true):
                confident["positions"] += 1
                confident["matched"] += ok
                confident["correct"] += ok and g == t

    def rates(self, attack: str) -> dict[str, Rate]:
        scored = self.scored.get(attack, [])
        rates = {m: Rate() for m in METRICS}
        for guess, truth, n_decode in scored:
            for m, counts in tally(guess, truth, n_decode, self.vocab).items():
                rates[m].add(*counts)
        n = len(scored)
        pooled = {m: [0, 0] for m in METRICS}
        best: dict[str, float] = {}
        for k in range(1, min(self.shifts, n - 1) + 1):
            shifted = {m: Rate() for m in METRICS}
            for i, (guess, _, n_decode) in enumerate(scored):
                other = scored[(i + k) % n][1]
                if other["prompt_ids"] == scored[i][1]["prompt_ids"]:
                    continue                      # the same prompt run again is not unrelated text
                for m, counts in tally(guess, other, n_decode, self.vocab).items():
                    shifted[m].add(*counts)
            for m, r in shifted.items():
                if r.n:
                    pooled[m][0] += r.hits
                    pooled[m][1] += r.n
                    best[m] = max(best.get(m, 0.0), r.rate)
        for m, r in rates.items():
            if pooled[m][1]:
                r.chance_hits, r.chance_n = pooled[m]
                r.chance, r.chance_max = pooled[m][0] / pooled[m][1], best[m]
        return rates


ATTACK_TEXT = {
    "direct": "token ids in the embedding requests",
    "layer0_cosine": "layer 0 input vs RMSNorm(E[t])*g0, cosine per row (prefill rows; decode steps)",
    "layer0_span": "layer 0: vocabulary vectors in the received block's row span",
    "returned_logits": "argmax of the returned logits (greedy decoding; ring results lifted and rescaled)",
}


def run_audit(sessions: list[RecordedSession], model_cfg, weights: dict, truth: dict | None,
              settings: AuditSettings = AuditSettings(), progress=None) -> dict:
    """sessions: recording.load(DIR); weights: the public checkpoint (tsqp.weights.load). Returns the report."""
    log = progress or (lambda msg: None)
    t0 = time.perf_counter()
    models: dict[torch.dtype, PublicModel] = {}
    layer0s: dict[torch.dtype, A.Layer0] = {}
    firsts: dict[torch.dtype, A.FirstPosition] = {}
    head_scales: dict[torch.dtype, torch.Tensor] = {}
    cfg = model_cfg
    layers = settings.layers if settings.layers is not None else \
        sorted({0, cfg.num_layers // 2, cfg.num_layers - 1})
    scorer = Scorer(cfg.vocab_size)
    guesses, counts = [], {"sessions": len(sessions), "sequences": 0, "prompt_tokens": 0, "decode_steps": 0}
    vocab_done = 0
    for s_i, session in enumerate(sessions):
        wire = wire_dtype(session) or torch.float32
        if wire not in models:
            models[wire] = PublicModel(cfg, weights, wire)
            layer0s[wire] = A.Layer0(models[wire])
            firsts[wire] = A.FirstPosition(models[wire], settings.vocab.start_token)
            head_scales[wire] = models[wire].head_t.float().abs().amax(0)                       # [V]
        model, layer0 = models[wire], layer0s[wire]
        for seq in sequences(session):
            counts["sequences"] += 1
            counts["prompt_tokens"] += seq.prompt_len
            counts["decode_steps"] += len(seq.decode)
            true = (truth or {}).get(session.label, [])
            true = true[seq.index] if seq.index < len(true) else None
            found = {"direct": A.direct(seq), "layer0_cosine": layer0.cosine(seq),
                     "layer0_span": layer0.span(seq, settings.span_threshold),
                     "returned_logits": A.returned_logits(seq, head_scales[wire])}
            if settings.vocab_sequences is None or vocab_done < settings.vocab_sequences:
                vocab_done += 1
                for layer in layers:
                    found[f"vocab_L{layer}"] = A.vocab_match(seq, model, layer, settings.vocab, layer0, firsts[wire])
                log(f"session {s_i + 1}/{len(sessions)} ({session.label}): vocabulary matching at layers "
                    f"{layers} done, {time.perf_counter() - t0:.0f} s")
            for name, g in found.items():
                scorer.add(name, g, true, len(seq.decode))
            guesses.append({"session": session.label, "sequence": seq.index,
                            **{name: {"prompt": g.prompt, "decode": g.decode,
                                      "prompt_set": sorted(g.prompt_set) if g.prompt_set is not None else None,
                                      "info": g.info} for name, g in found.items()}})
    masked_claimed = sum(len(MK.masked_inputs(c)) for s in sessions for c in s.calls)
    uniformity = MK.uniformity_all(sessions) if masked_claimed else []
    prompt_of = {label: tuple(seqs[0]["prompt_ids"]) for label, seqs in (truth or {}).items()} or None
    independence = MK.family([r for a, b in MK.same_prompt_pairs(sessions, prompt_of)
                              if (r := MK.independence(a, b)) is not None]) if masked_claimed else []
    all_rates = {name: scorer.rates(name) for name in scorer.scored}
    judged = sum(1 for rates in all_rates.values() for r in rates.values() if r.n and r.chance_n)
    chance_alpha = CHANCE_ALPHA / max(judged, 1)
    attacks_out = []
    for name, rates in all_rates.items():
        text = ATTACK_TEXT.get(name) or (f"vocabulary matching at layer {name.removeprefix('vocab_L')}, "
                                         f"shortlists {list(settings.vocab.stages)} from the model's prior")
        attacks_out.append({"attack": name, "what": text, **{m: rates[m].to_dict(chance_alpha) for m in METRICS},
                            **({"near_exact_matches": scorer.confident[name]} if name in scorer.confident else {})})
    return {"counts": counts, "scored": truth is not None, "vocab_size": cfg.vocab_size,
            "chance": {"method": f"each attack's guesses scored against the prompts {SHIFTS} cyclic shifts away "
                                 f"(same prompt skipped)", "alpha_each": chance_alpha,
                       "alpha_family": CHANCE_ALPHA},
            "vocab_layers": layers, "vocab_sequences": vocab_done,
            "settings": {**asdict(settings.vocab), "span_threshold": settings.span_threshold},
            "attacks": attacks_out,
            "masked": {"claimed_masked_inputs": masked_claimed, "uniformity": uniformity,
                       "independence": independence},
            "guesses": guesses, "seconds": time.perf_counter() - t0}


# ---- rendering ---------------------------------------------------------------------------------------------
def cell(rate: dict) -> str:
    if not rate["tried"]:
        return "-"
    lo, hi = rate["ci95"]
    return f"{100 * rate['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {rate['tried']}; chance " \
           f"{100 * rate['chance']:.2g}%"


SHORT = {"prompt_exact": "prompt exact", "prompt_set": "prompt set", "generated_exact": "generated exact",
         "generated_set": "generated set"}


def verdict(a: dict) -> str:
    """'at chance' when every scored metric is; else which are above it."""
    above = [SHORT[m] for m in METRICS if a[m]["tried"] and a[m].get("at_chance") is False]
    judged = [m for m in METRICS if a[m]["tried"] and a[m].get("at_chance") is not None]
    if not judged:
        return "-"
    return "at chance" if not above else "ABOVE chance: " + ", ".join(above)


HEADERS = ("attack", "prompt: exact position", "prompt: set recall", "generated: exact", "generated: set recall",
           "verdict")


def rows(report: dict) -> list[tuple[str, ...]]:
    return [(a["attack"], *(cell(a[m]) for m in METRICS), verdict(a)) for a in report["attacks"]]


def rich_table(report: dict, title: str = "tsqp audit: what the server learns") -> Table:
    t = Table(title=title, show_header=True)
    for h in HEADERS:
        t.add_column(h, justify="left" if h == "attack" else "right")
    for r in rows(report):
        t.add_row(*r)
    return t


def masked_summary(m: dict) -> list[str]:
    """One line per family of tests: how many, how many pass at which per-test level, the smallest p."""
    lines = []
    for name, tests in (("uniformity", m["uniformity"]), ("independence", m["independence"])):
        if tests:
            passed = sum(r["pass"] for r in tests)
            lines.append(f"{name}: {passed} of {len(tests)} tests pass (each at p >= {tests[0]['alpha']:.2g}, "
                         f"family-wise {MK.ALPHA:g}); smallest p {min(r['p'] for r in tests):.3g}")
    return lines


def masked_table(report: dict, max_rows: int = 24) -> Table:
    """The masked-input tests; with many sessions, the pooled ones and the failures (summary: masked_summary)."""
    t = Table(title="masked inputs", show_header=True)
    for h in ("test", "what", "statistic", "p", "verdict"):
        t.add_column(h)
    m = report["masked"]
    if not m["claimed_masked_inputs"]:
        t.add_row("-", "no input is claimed masked: every activation crossed in the clear", "-", "-", "-")
    uniformity, independence = m["uniformity"], m["independence"]
    if len(uniformity) + len(independence) > max_rows:
        uniformity = [u for u in uniformity if u["session"] == "all" or not u["pass"]]
        independence = [r for r in independence if not r["pass"]][:max_rows]
    for u in uniformity:
        t.add_row("uniformity", f"{u['session']} {u['dtype']} lane {u['lane']} ({u['values']} values)",
                  f"chi2 {u['chi2']:.1f} / {u['dof']} dof", f"{u['p']:.3g}", "pass" if u["pass"] else "FAIL")
    for r in independence:
        t.add_row("independence", " vs ".join(r["sessions"]) + f" ({r['bytes']} bytes)",
                  f"equal {r['equal_fraction']:.4f}, r {r['correlation']:.4f}",
                  f"{r['p']:.3g}", "pass" if r["pass"] else "FAIL")
    return t


def markdown(report: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    return "\n".join(lines)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
