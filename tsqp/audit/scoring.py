"""Scoring the attacks against the ground truth: counts, 95% Wilson intervals, chance levels, and the two
statistics the masked-input tests use (chi-square survival, normal two-sided p).

The chance level of an attack is what its own guesses score against prompts they were not made from: the
guesses of sequence i against the truth of sequence i + k (k = 1 .. SHIFTS, cyclically; pairs of the same
prompt skipped). It is measured, never assumed: it holds the attack's habits (a language prior that favours
" the", a hub of the vocabulary that random rows fall next to) and the text's (common tokens, repeated
openings), which a uniform guess (`chance_uniform`: 1/V per position, a random set of the same size) leaves
out. `chance` is the mean over the shifts, `chance_max` the best shift. An attack is AT CHANCE when its hits
are not significantly more frequent than on the unrelated pairings: one-sided Fisher exact test of hits/n
against the pairings' pooled hits/N, p >= alpha (a report judges all its metrics as one family, Bonferroni).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Z95 = 1.959963984540054


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval for a proportion hits/n ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if hits == 0 else max(0.0, centre - half)), (1.0 if hits == n else min(1.0, centre + half))


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof): the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def normal_two_sided(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def fisher_greater(hits: int, n: int, other_hits: int, other_n: int) -> float:
    """One-sided Fisher exact test: P(at least `hits` of the hits fall among the first n trials) when
    hits + other_hits successes are spread at random over n + other_n trials (hypergeometric tail)."""
    total, k = n + other_n, hits + other_hits
    if not n or not k or not hits:
        return 1.0

    def log_comb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    denominator = log_comb(total, n)
    tail = [log_comb(k, x) + log_comb(total - k, n - x) - denominator
            for x in range(hits, min(k, n) + 1) if n - x <= total - k]
    top = max(tail)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in tail))


SHIFTS = 32        # unrelated pairings measured per attack for its chance level


@dataclass
class Rate:
    """hits out of n tried; what a uniform guess would get (`uniform_hits`); the chance level measured on
    unrelated pairings (`chance`, `chance_max`: fractions, None when fewer than two prompts were scored)."""
    hits: int = 0
    n: int = 0
    uniform_hits: float = 0.0
    chance: float | None = None
    chance_max: float | None = None
    chance_hits: int = 0               # pooled over the unrelated pairings ...
    chance_n: int = 0                  # ... out of this many tried

    def add(self, hits: int, n: int, uniform_hits: float) -> None:
        self.hits += hits
        self.n += n
        self.uniform_hits += uniform_hits

    @property
    def rate(self) -> float | None:
        return self.hits / self.n if self.n else None

    @property
    def chance_uniform(self) -> float | None:
        return self.uniform_hits / self.n if self.n else None

    def p_above_chance(self) -> float | None:
        """Fisher's one-sided p that the hits are no more frequent than on unrelated pairings (None: none)."""
        if not self.n or not self.chance_n:
            return None
        return fisher_greater(self.hits, self.n, self.chance_hits, self.chance_n)

    def to_dict(self, alpha: float = 1e-3) -> dict:
        p = self.p_above_chance()
        lo, hi = wilson(self.hits, self.n)
        return {"hits": self.hits, "tried": self.n, "rate": self.rate, "ci95": [lo, hi] if self.n else None,
                "chance": self.chance if self.chance is not None else self.chance_uniform,
                "chance_max": self.chance_max, "chance_uniform": self.chance_uniform,
                "chance_method": "unrelated pairings" if self.chance is not None else "uniform guess",
                "p_above_chance": p, "at_chance": None if p is None else p >= alpha}


def exact(guess: list[int | None], truth: list[int], vocab: int) -> tuple[int, int, float]:
    """(hits, tried, chance hits) for position-by-position guesses from position 0: a None guess is a miss;
    positions past the end of a shorter guess were not tried."""
    truth = truth[:len(guess)]
    hits = sum(1 for g, t in zip(guess, truth) if g is not None and g == t)
    return hits, len(truth), len(truth) / vocab


def set_recall(guess: set[int], truth: list[int], vocab: int) -> tuple[int, int, float]:
    """(hits, tried, chance hits): distinct true tokens found in the guessed set; chance is what a random
    set of the same size would find."""
    true = set(truth)
    return len(true & guess), len(true), len(true) * min(len(guess), vocab) / vocab
