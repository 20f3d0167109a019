"""Tests a mask must pass, for every input claimed to be masked: an input of a non-float dtype (e.g. uint8
limbs; the embedding request's int64 ids excepted) or one whose header says "masked": true.

- Uniformity: the bytes of a session's masked inputs, per byte lane (byte i of every element; for ring limbs
  uint8 [5, T, in], limb i), are chi-square tested against uniform over 256 values (or, when the header gives
  "modulus": q, the values binned into 256 equal ranges of [0, q)); per session, and pooled over all sessions.
- Independence: two recordings of the same prompt are compared call by call: the fraction of equal bytes
  must be 1/256 and the bytes uncorrelated (Pearson r * sqrt(n) ~ N(0, 1)).
A test passes when its p-value is at least `alpha` (default 0.001). A report runs many tests (sessions x
lanes, pairs): `family` passes each at alpha / (number of tests) (Bonferroni), so that a sound mask fails
any of them with probability at most alpha.
"""
from __future__ import annotations

import math

import torch

from .. import ring
from .recording import FLOAT_DTYPES, RecordedCall, RecordedSession
from .scoring import chi2_sf, normal_two_sided

ALPHA = 1e-3


def masked_inputs(call: RecordedCall) -> list[int]:
    """Indices of a call's inputs that are claimed masked."""
    if call.header.get("masked") is True:
        return list(range(len(call.input_refs)))
    return [i for i, r in enumerate(call.input_refs)
            if r.dtype not in FLOAT_DTYPES and not (call.op == "embed" and r.dtype in ("int64", "int32"))]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, itemsize] uint8: each element's bytes (native order)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).reshape(t.numel(), t.element_size())


def lane_counts(session: RecordedSession) -> dict[tuple[str, int], torch.Tensor]:
    """(dtype, lane) -> counts of the 256 byte values [256] over a session's masked inputs."""
    counts: dict[tuple[str, int], torch.Tensor] = {}
    for call in session.calls:
        modulus = call.header.get("modulus")
        for i in masked_inputs(call):
            t, ref = call.input(i), call.input_refs[i]
            if isinstance(modulus, int) and modulus > 0 and not t.is_floating_point():
                lanes = [(t.reshape(-1).to(torch.float64) * 256 / modulus).floor().clamp(0, 255).long()]
                keys = [(f"{ref.dtype} mod {modulus}", 0)]
            elif ref.dtype == "uint8" and t.dim() == 3 and t.shape[0] == ring.LIMBS:      # ring limbs [5, T, in]
                lanes = [t[j].reshape(-1).long() for j in range(ring.LIMBS)]
                keys = [("uint8 limbs", j) for j in range(ring.LIMBS)]
            else:
                b = as_bytes(t)
                lanes = [b[:, j].long() for j in range(b.shape[1])]
                keys = [(ref.dtype, j) for j in range(b.shape[1])]
            for key, values in zip(keys, lanes):
                counts[key] = counts.get(key, torch.zeros(256, dtype=torch.float64)) + \
                    torch.bincount(values, minlength=256).double()
    return counts


def chi_square_rows(label: str, counts: dict[tuple[str, int], torch.Tensor], alpha: float) -> list[dict]:
    rows = []
    for (dtype, lane), c in sorted(counts.items()):
        n = float(c.sum())
        expected = n / 256
        stat = float(((c - expected) ** 2 / expected).sum())
        p = chi2_sf(stat, 255)
        rows.append({"session": label, "dtype": dtype, "lane": lane, "values": int(n),
                     "chi2": stat, "dof": 255, "p": p, "alpha": alpha, "pass": p >= alpha})
    return rows


def uniformity(session: RecordedSession, alpha: float = ALPHA) -> list[dict]:
    """One chi-square test per (dtype, byte lane) over all of a session's masked inputs of that dtype."""
    return chi_square_rows(session.label, lane_counts(session), alpha)


def family(rows: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Judge every row at alpha / len(rows): the chance that any of them fails for a sound mask <= alpha."""
    each = alpha / max(len(rows), 1)
    return [{**r, "alpha": each, "pass": r["p"] >= each} for r in rows]


def uniformity_all(sessions: list[RecordedSession], alpha: float = ALPHA) -> list[dict]:
    """Per session and pooled over all sessions ("all"), one family of tests."""
    pooled: dict[tuple[str, int], torch.Tensor] = {}
    rows = []
    for s in sessions:
        counts = lane_counts(s)
        rows += chi_square_rows(s.label, counts, alpha)
        for key, c in counts.items():
            pooled[key] = pooled.get(key, torch.zeros(256, dtype=torch.float64)) + c
    if len(sessions) > 1:
        rows += chi_square_rows("all", pooled, alpha)
    return family(rows, alpha)


def structure(session: RecordedSession) -> tuple:
    """The sequence of (op, layer, input shapes): two runs of one prompt under one protection share it."""
    return tuple((c.op, c.layer, tuple(r.shape for r in c.input_refs)) for c in session.calls)


def independence(a: RecordedSession, b: RecordedSession, alpha: float = ALPHA) -> dict | None:
    """Compare the masked inputs of two recordings of the same prompt, call by call (None: nothing masked)."""
    equal, total, sum_x, sum_y, sum_xx, sum_yy, sum_xy = 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for ca, cb in zip(a.calls, b.calls):
        if (ca.op, ca.layer) != (cb.op, cb.layer):
            break
        for i in masked_inputs(ca):
            if i >= len(cb.input_refs) or ca.input_refs[i].shape != cb.input_refs[i].shape:
                continue
            x = as_bytes(ca.input(i)).reshape(-1).double()
            y = as_bytes(cb.input(i)).reshape(-1).double()
            equal += int((x == y).sum())
            total += x.numel()
            sum_x, sum_y = sum_x + float(x.sum()), sum_y + float(y.sum())
            sum_xx, sum_yy, sum_xy = sum_xx + float(x @ x), sum_yy + float(y @ y), sum_xy + float(x @ y)
    if total == 0:
        return None
    p_eq = 1 / 256
    z_equal = (equal - total * p_eq) / math.sqrt(total * p_eq * (1 - p_eq))
    cov = sum_xy / total - (sum_x / total) * (sum_y / total)
    var_x, var_y = sum_xx / total - (sum_x / total) ** 2, sum_yy / total - (sum_y / total) ** 2
    r = cov / math.sqrt(var_x * var_y) if var_x > 0 and var_y > 0 else 1.0
    p_equal, p_corr = normal_two_sided(z_equal), normal_two_sided(r * math.sqrt(total))
    return {"sessions": [a.label, b.label], "bytes": total, "equal_fraction": equal / total,
            "p_equal": p_equal, "correlation": r, "p_correlation": p_corr, "p": min(p_equal, p_corr),
            "alpha": alpha, "pass": p_equal >= alpha and p_corr >= alpha}


def same_prompt_pairs(sessions: list[RecordedSession], prompt_of: dict[str, tuple] | None) -> list[tuple]:
    """Pairs of sessions to compare: same prompt by the ground truth when given, else the same call structure
    (each session in at most one pair, in order)."""
    groups: dict = {}
    for s in sessions:
        key = prompt_of.get(s.label) if prompt_of else None
        groups.setdefault(key if key is not None else ("structure", structure(s)), []).append(s)
    pairs = []
    for members in groups.values():
        pairs += [(members[i], members[i + 1]) for i in range(0, len(members) - 1, 2)]
    return pairs
