"""The attacks a curious server can run on what it recorded, holding only the public checkpoint.

Each attack reads one `views.Sequence` (a prompt's prefill and its decode steps as the server saw them) and
returns a `Guess`: a token per prompt position and per decode step (None where it has none), and/or a set
of tokens it believes the prompt holds.

- direct          token ids read from the embedding requests (none under --protect: the runner embeds; then
                  every position is a miss, 0 ids seen).
- layer0_cosine   layer 0's qkv input is RMSNorm(E[t]) * g0 row by row: the nearest vocabulary entry by
                  |cosine|, for each prefill row and each decode step's single row.
- layer0_span     for rows mixed across positions (M X): a vocabulary entry whose layer-0 vector lies in the
                  row span of the received block (relative residual after projection near 0) is present.
- vocab_match     "vocabulary matching" at layer L: position by position, the attacker extends its own KV
                  cache with the tokens it recovered, computes layer L's input for candidate tokens at the
                  next position and keeps the candidate nearest the received row (relative L2 distance:
                  cosine is blind at deep layers, where a few huge activations dominate every row). The
                  candidates: a shortlist, the top-k of the public model's own next-token prior on the
                  recovered prefix, in stages (e.g. 8 then 64) until one matches. Position 0 depends on its
                  token alone, so its candidates' rows are computed once for all sequences, in the order of the
                  prior after a document-start token, in larger stages. At layer 0 the whole vocabulary.
- returned_logits the logits the server returns: their argmax is the next token under greedy decoding.
                  Integer (ring) results are lifted to signed and each output multiplied by the largest |w| of
                  its public weight row (symmetric per-channel quantization divides by it).

Rows that arrived as ring limbs (views.as_rows) have an unknown scale: vocabulary matching then compares
directions (the relative residual after the best scaling of each candidate) instead of distances.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .replay import Context, PublicModel
from .views import Sequence


@dataclass
class Guess:
    prompt: list[int | None] | None = None       # per prompt position from 0 (shorter: the later positions
                                                  # were not tried); None: the attack gives no positions
    prompt_set: set[int] | None = None            # tokens believed present; None: use set(prompt)
    decode: list[int | None] | None = None        # per decode step (the token that step fed in)
    confident: list[bool] | None = None           # per prompt position then decode step: a near-exact match
    info: dict = field(default_factory=dict)      # what the attack measured (distances, shortlist hits, ...)

    def prompt_tokens(self) -> set[int] | None:
        if self.prompt_set is not None:
            return self.prompt_set
        return None if self.prompt is None else {t for t in self.prompt if t is not None}


def nearest(rows: torch.Tensor, table_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [n, D] -> (index of the row of table_unit [V, D] (unit rows) with the largest |cosine|, that
    |cosine|). The absolute value: a row scaled by any factor, negative too, still names its token."""
    cos = (F.normalize(rows.float(), dim=-1) @ table_unit.T).abs_()                      # [n, V]
    best = cos.max(dim=-1)
    return best.indices, best.values


# ---- direct ---------------------------------------------------------------------------------------------
def direct(seq: Sequence) -> Guess:
    def ids_of(p):
        calls = p.calls_of("embed")
        ok = [c for c in calls if c.input_refs[0].dtype in ("int64", "int32")]
        return torch.cat([c.input(0) for c in ok]).tolist() if ok else None

    prompt = ids_of(seq.prefill)
    decode = [ids_of(p) for p in seq.decode]
    seen = len(prompt or []) + sum(len(d or []) for d in decode)
    if prompt is None:                       # no ids crossed: the attack names no token, every position a miss
        return Guess(prompt=[None] * seq.prompt_len, decode=[None] * len(seq.decode), info={"ids_seen": seen})
    return Guess(prompt=prompt, decode=[d[0] if d else None for d in decode] if any(decode) else None,
                 info={"ids_seen": seen})


# ---- layer 0 --------------------------------------------------------------------------------------------
class Layer0:
    """Layer 0's input for every vocabulary entry (unit rows), computed once from the public weights."""

    def __init__(self, model: PublicModel):
        self.table = model.layer0_table()                                                  # [V, D]
        self.unit = F.normalize(self.table, dim=-1)

    def rows(self, p) -> torch.Tensor | None:
        r = p.rows("qkv", 0)
        return None if r is None or not r.is_floating_point() else r.float()

    def cosine(self, seq: Sequence) -> Guess:
        prompt_rows = self.rows(seq.prefill)
        prompt = cos = None
        if prompt_rows is not None:
            idx, cos = nearest(prompt_rows, self.unit)
            prompt = idx.tolist()
        steps = [self.rows(p) for p in seq.decode]
        found = [r[-1:] for r in steps if r is not None]
        ids = iter(nearest(torch.cat(found), self.unit)[0].tolist() if found else [])     # one pass over the table
        decode = [next(ids) if r is not None else None for r in steps]
        return Guess(prompt=prompt, decode=decode or None,
                     info={"min_cosine": float(cos.min()) if cos is not None else None})

    def span(self, seq: Sequence, threshold: float = 0.2) -> Guess:
        """Tokens whose layer-0 vector lies in the row span of the received prefill block."""
        found: set[int] = set()
        blocks = [b.float() for b in seq.prefill.row_blocks("qkv", 0) if b.is_floating_point()]
        if not blocks:
            return Guess()
        worst_rank = 0.0
        for block in blocks:                      # each call's block was mixed on its own (chunks)
            residual, rank = span_residuals(block, self.unit)
            worst_rank = max(worst_rank, rank / block.shape[1])
            order = torch.argsort(residual)[:rank]                      # at most `rank` tokens can be present
            found |= {int(t) for t in order if residual[t] < threshold}
        return Guess(prompt_set=found, info={"span_fraction_of_width": worst_rank})


def span_residuals(block: torch.Tensor, unit: torch.Tensor) -> tuple[torch.Tensor, int]:
    """block [T, D] -> (relative residual of each unit row of `unit` after projection onto the block's row
    span [V], that span's rank). Near 0: the candidate is (numerically) a combination of the rows."""
    _, s, vh = torch.linalg.svd(block.double(), full_matrices=False)                      # vh [T, D]
    rank = int((s > s[0] * 1e-6).sum()) if s.numel() and s[0] > 0 else 0
    basis = vh[:rank].float()                                                             # [r, D]
    inside = (unit @ basis.T).pow(2).sum(-1)                                              # [V]
    return (1 - inside).clamp_min(0).sqrt(), rank


# ---- vocabulary matching at a deeper layer --------------------------------------------------------------
@dataclass
class VocabSettings:
    stages: tuple[int, ...] = (8, 64)     # shortlist sizes tried in turn (top-k of the attacker's prior)
    first_stages: tuple[int, ...] = (64, 1024, 4096)   # the same at position 0, where rows are shared
    accept: float = 0.05                  # a match: relative distance below this ...
    margin: float = 3.0                   # ... and the runner-up at least this many times farther
    max_positions: int | None = None      # prompt positions per sequence (None: all); decode steps need all
    start_token: int | None = None        # document start for the position-0 prior (e.g. <|endoftext|>)


def relative_distance(candidates: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """||c - x|| / ||x|| for each candidate row c [n, D] against the received row x [D]."""
    return (candidates - row).norm(dim=-1) / row.norm().clamp_min(1e-30)


def scaled_distance(candidates: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """min over a of ||a c - x|| / ||x|| = sqrt(1 - cos^2(c, x)): for rows of an unknown scale (integers)."""
    cos = F.normalize(candidates, dim=-1) @ F.normalize(row, dim=0)
    return (1 - cos.double().pow(2)).clamp_min(0).sqrt().float()


class FirstPosition:
    """A layer's input at position 0 depends on the token alone, so the candidates' rows there are computed
    once, in the order of the document-start prior, and shared by every sequence (an attacker would keep
    them for the whole vocabulary: a property of the public model)."""

    def __init__(self, model: PublicModel, start_token: int | None):
        self.model = model
        self.ranked = torch.argsort(Context(model, 1).prior(start_token), descending=True)
        self.done: dict[int, torch.Tensor] = {}

    def rows(self, layer: int, k: int) -> torch.Tensor:
        """Layer `layer`'s input at position 0 for the prior's top k tokens: [k, D] float32."""
        have = self.done.get(layer, torch.zeros(0, self.model.cfg.hidden_size))
        if have.shape[0] < k:
            more = Context(self.model, 1).candidates_at(layer, self.ranked[have.shape[0]:k])
            have = self.done[layer] = torch.cat((have, more))
        return have[:k]


def pick(stages, distances_for, settings: VocabSettings) -> tuple[int, bool, int]:
    """Try shortlists of growing size until one candidate matches: (index in the ranking of the nearest
    candidate, whether it matched, candidates tried). A match is near-exact and unambiguous: distance below
    `accept` with the runner-up `margin` times farther. distances_for(lo, hi) -> distances of ranked
    candidates lo..hi-1."""
    dists, done = torch.empty(0), 0
    for k in stages:
        if k > done:
            new = distances_for(done, k)
            dists, done = torch.cat((dists, new)), done + new.numel()
        top = torch.topk(dists, min(2, dists.numel()), largest=False)
        best = float(top.values[0])
        runner_up = float(top.values[1]) if dists.numel() > 1 else float("inf")
        matched = best < settings.accept and runner_up >= settings.margin * best
        if matched:
            break
    return int(top.indices[0]), matched, done


def vocab_match(seq: Sequence, model: PublicModel, layer: int, settings: VocabSettings,
                layer0: Layer0 | None = None, first: FirstPosition | None = None) -> Guess:
    """Recover the sequence position by position from layer `layer`'s rows alone (see the module doc)."""
    prompt_rows = seq.prefill.rows("qkv", layer)
    if prompt_rows is None or not prompt_rows.is_floating_point():
        return Guess()
    n_prompt = prompt_rows.shape[0]
    limit = n_prompt if settings.max_positions is None else min(n_prompt, settings.max_positions)
    if layer == 0:        # no context reaches layer 0's input: the whole vocabulary at once
        guess = (layer0 or Layer0(model)).cosine(seq)
        guess.prompt = guess.prompt[:limit]
        guess.decode = guess.decode if limit == n_prompt else None
        return guess
    measure = scaled_distance if seq.prefill.ring_rows("qkv", layer) else relative_distance
    targets = list(prompt_rows.float()[:limit])                   # one received row per position, in order
    if limit == n_prompt:                                         # decode steps continue the same context
        for p in seq.decode:
            r = p.rows("qkv", layer)
            if r is None or not r.is_floating_point():
                break
            targets.append(r.float()[-1])
    first = first or FirstPosition(model, settings.start_token)
    ctx = Context(model, max(len(targets), 1))
    recovered, matched, tried_total = [], [], 0
    prior = None                                   # the attacker's next-token logits after its recovered prefix
    for position, row in enumerate(targets):
        if position == 0:                          # shared rows, ranked by the document-start prior
            ranked = first.ranked
            stages = [min(k, ranked.numel()) for k in settings.first_stages]

            def distances(lo, hi, row=row):
                return measure(first.rows(layer, hi)[lo:], row)
        else:                                      # the shortlist: the prior's top-k
            ranked = torch.argsort(prior, descending=True)
            stages = settings.stages

            def distances(lo, hi, row=row, ranked=ranked):
                return measure(ctx.candidates_at(layer, ranked[lo:hi]), row)
        i, ok, tried = pick(stages, distances, settings)
        token = int(ranked[i])
        matched.append(ok)
        tried_total += tried
        recovered.append(token)
        if position + 1 < len(targets):
            prior = ctx.append(token)
    decode = recovered[n_prompt:] if limit == n_prompt else None
    return Guess(prompt=recovered[:limit], decode=decode, confident=matched,
                 info={"positions": len(targets), "matched": sum(matched), "candidates_tried": tried_total})


# ---- what the server returns ----------------------------------------------------------------------------
def returned_logits(seq: Sequence, head_scale: torch.Tensor | None = None) -> Guess:
    """Decode step k fed the token chosen from pass k's logits (the prefill is pass 0): greedy = argmax.
    head_scale [V]: per-output scale for integer results (max |w| of each row of the public LM head)."""
    decode = []
    for p in seq.passes[:len(seq.decode)]:
        logits = p.logits()
        if logits is not None and head_scale is not None and p.calls_of("lm_head")[-1].output_ref.dtype == "int64":
            logits = logits * head_scale
        decode.append(int(logits[-1].float().argmax()) if logits is not None and logits.is_floating_point()
                      else None)
    return Guess(decode=decode)
