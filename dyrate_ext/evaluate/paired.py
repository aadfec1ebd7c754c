"""CIDEr against the FastV curve at equal cost, with a paired per-picture standard error.

    from dyrate_ext.evaluate.paired import attach_vs_fastv
    attach_vs_fastv(rows)        # rows: every Row of one caption set
    rows[i].vs_fastv["flops"]    # {"delta", "se", "n", "lo", "hi", "weight", "curve"} or None

FastV at its best k: every family "FastV k=K" of the table (REFERENCE_PREFIX) is a curve, its
r sweep plus the NoPrune row as its r = 0 point (100 % in every currency, nothing removed), and
a policy is compared with the curve that is best (highest interpolated CIDEr) at the policy's
own cost; "curve" names it. For a policy of cost c (its % of
NoPrune in one currency of `dyrate_ext.costs.CURRENCIES`), the curve's points sorted by cost in
that currency give the two settings lo, hi with cost(lo) <= c <= cost(hi), and for every
picture j

    fastv_j = (1 - w) cider_j(lo) + w cider_j(hi),   w = (c - cost(lo)) / (cost(hi) - cost(lo))
    d_j     = cider_j(policy) - fastv_j

(linear in cost; w = 0 when the two costs are equal). delta is the mean of d_j over the n
pictures (as corpus CIDEr is the mean of the per-picture scores, delta is also the policy's
CIDEr minus the curve's interpolated CIDEr), se = std(d) / sqrt(n) with the sample standard
deviation (n - 1 degrees of freedom; None for n < 2). Pairing by picture removes the
between-picture spread both runs share, so se is much smaller than an unpaired one.

A cost outside every curve's range [its cheapest point, 100 %] (or nan) gives None: FastV was
not measured there, and extrapolating would invent it. So does a set without FastV rows.
A row of a curve sits on one of its points: delta 0 against that curve, and <= 0 against the
best one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from ..costs import CURRENCIES
from .runner import CURRENCY_LABELS, Row

__all__ = [
    "REFERENCE_FAMILY",
    "REFERENCE_PREFIX",
    "CurvePoint",
    "Paired",
    "attach_vs_fastv",
    "best_difference",
    "bracket",
    "curve_of",
    "curve_range",
    "curves_of",
    "format_paired",
    "mean_se",
    "paired_difference",
    "paired_note",
]

REFERENCE_PREFIX = "FastV k="
"""The families (one per k) whose curves (plus the NoPrune point) every policy is compared with."""

REFERENCE_FAMILY = "FastV k=2"
"""The default family of `curve_of`."""

NOPRUNE_FAMILY = "NoPrune"


@dataclass(frozen=True)
class CurvePoint:
    """One setting of the reference curve: its name, cost (% of NoPrune) and per-picture CIDEr."""

    name: str
    cost: float
    cider: Mapping[int, float]


@dataclass(frozen=True)
class Paired:
    """A policy's CIDEr minus the curve's at its cost: the mean `delta` over `n` pictures, its
    paired standard error `se` (None for n < 2), and the bracketing settings `lo`, `hi` with
    the interpolation weight `weight` of `hi`, on the curve of family `curve`."""

    delta: float
    se: float | None
    n: int
    lo: str
    hi: str
    weight: float
    curve: str = REFERENCE_FAMILY


def mean_se(diffs: Sequence[float]) -> tuple[float, float | None]:
    """(mean, std / sqrt(n)) of `diffs`, std with n - 1 degrees of freedom (None for n < 2)."""
    n = len(diffs)
    if n == 0:
        raise ValueError("no differences to average")
    mean = math.fsum(diffs) / n
    if n < 2:
        return mean, None
    var = math.fsum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n)


def bracket(costs: Sequence[float], x: float) -> tuple[int, int, float] | None:
    """(i, j, w) with costs[i] <= x <= costs[j], j = i + 1 (or i = j at a lone point), and the
    weight w of j, (x - costs[i]) / (costs[j] - costs[i]) (0 for equal costs); `costs` sorted
    ascending. None when x is nan or outside [costs[0], costs[-1]]."""
    if not costs or math.isnan(x) or not costs[0] <= x <= costs[-1]:
        return None
    if len(costs) == 1:
        return 0, 0, 0.0
    for i in range(len(costs) - 1):
        lo, hi = costs[i], costs[i + 1]
        if lo <= x <= hi:
            return i, i + 1, 0.0 if hi == lo else (x - lo) / (hi - lo)
    return None  # unreachable for sorted costs


def paired_difference(
    scores: Mapping[int, float], cost: float, curve: Sequence[CurvePoint]
) -> Paired | None:
    """The policy with per-picture CIDEr `scores` at `cost` against `curve` (any order): see
    the module docstring. None outside the curve's range. Every picture of `scores` must have a
    score in every curve point (ValueError otherwise)."""
    points = sorted(curve, key=lambda p: p.cost)
    found = bracket([p.cost for p in points], cost)
    if found is None:
        return None
    i, j, w = found
    lo, hi = points[i], points[j]
    missing = [k for k in scores if k not in lo.cider or k not in hi.cider]
    if missing:
        raise ValueError(f"picture {missing[0]} has no CIDEr in {lo.name} or {hi.name}")
    diffs = [s - ((1.0 - w) * lo.cider[k] + w * hi.cider[k]) for k, s in scores.items()]
    delta, se = mean_se(diffs)
    return Paired(delta, se, len(diffs), lo.name, hi.name, w)


def curve_of(
    rows: Sequence[Row], currency: str, family: str = REFERENCE_FAMILY
) -> list[CurvePoint]:
    """The curve of `family` in a table's rows in `currency`: that family's rows and the
    NoPrune row (empty without a row of the family)."""
    ref = [r for r in rows if r.family == family]
    if not ref:
        return []
    ref += [r for r in rows if r.family == NOPRUNE_FAMILY]
    return [CurvePoint(r.name, r.cost_percent(currency), r.cider_per_image) for r in ref]


def curves_of(rows: Sequence[Row], currency: str) -> dict[str, list[CurvePoint]]:
    """Every FastV family's curve (`curve_of`), by family name, in the rows' order."""
    families = dict.fromkeys(r.family for r in rows if r.family.startswith(REFERENCE_PREFIX))
    return {f: curve_of(rows, currency, f) for f in families}


def best_difference(
    scores: Mapping[int, float], cost: float, curves: Mapping[str, Sequence[CurvePoint]]
) -> Paired | None:
    """`paired_difference` against the curve that is best at `cost` (the smallest delta: the
    highest interpolated CIDEr); None when `cost` is outside every curve's range."""
    found = []
    for family, curve in curves.items():
        p = paired_difference(scores, cost, curve)
        if p is not None:
            found.append(replace(p, curve=family))
    return min(found, key=lambda p: p.delta, default=None)


def curve_range(curve: Sequence[CurvePoint]) -> tuple[float, float] | None:
    """(cheapest, dearest) cost of a curve, None for an empty one."""
    if not curve:
        return None
    costs = [p.cost for p in curve]
    return min(costs), max(costs)


def attach_vs_fastv(rows: Sequence[Row]) -> None:
    """Set every row's `vs_fastv` to {currency: asdict(Paired) or None} for each currency of
    CURRENCIES, against FastV at its best k among these rows (one caption set)."""
    curves = {c: curves_of(rows, c) for c in CURRENCIES}
    for r in rows:
        result: dict[str, Any] = {}
        for c in CURRENCIES:
            p = best_difference(r.cider_per_image, r.cost_percent(c), curves[c])
            result[c] = None if p is None else asdict(p)
        r.vs_fastv = result


def format_paired(value: Mapping[str, Any] | None) -> str:
    """A markdown cell: "+1.2 ± 0.8", "outside" (None: outside the curve's range), "± -" for a
    single picture."""
    if value is None:
        return "outside"
    se = value.get("se")
    return f"{value['delta']:+.1f} ± {'-' if se is None else f'{se:.1f}'}"


def paired_note(rows: Sequence[Row], currencies: Sequence[str]) -> str:
    """The sentence under a table that explains its Δ columns and the curve's range."""
    spans = []
    for c in currencies:
        points = [p for curve in curves_of(rows, c).values() for p in curve]
        span = curve_range(points)
        if span is not None:
            spans.append(f"{CURRENCY_LABELS[c]} {span[0]:.1f}-{span[1]:.1f} %")
    if not spans:
        return "Δ vs FastV: no FastV rows in this table, so no comparison."
    return (
        "Δ vs FastV: CIDEr minus FastV's at its best k (each k's r sweep and NoPrune, "
        "interpolated linearly at the row's cost; the k whose curve is highest there), ± the "
        "paired per-picture standard error; 'outside': the cost lies outside every curve's "
        f"range ({'; '.join(spans)}), so no comparison."
    )
