"""Scoring the attacks against the ground truth: counts, 95% Wilson intervals, chance levels, and the two
statistics the masked-input tests use (chi-square survival, normal two-sided p)."""
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


@dataclass
class Rate:
    """hits out of n tried, and what guessing would get (`chance`, a fraction)."""
    hits: int = 0
    n: int = 0
    chance_hits: float = 0.0

    def add(self, hits: int, n: int, chance_hits: float) -> None:
        self.hits += hits
        self.n += n
        self.chance_hits += chance_hits

    @property
    def rate(self) -> float | None:
        return self.hits / self.n if self.n else None

    @property
    def chance(self) -> float | None:
        return self.chance_hits / self.n if self.n else None

    def to_dict(self) -> dict:
        lo, hi = wilson(self.hits, self.n)
        return {"hits": self.hits, "tried": self.n, "rate": self.rate, "ci95": [lo, hi] if self.n else None,
                "chance": self.chance}


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
