"""dyrate_ext.evaluate.paired on hand-made numbers: the standard error, the interpolation at
equal cost, out-of-range costs and the attachment to a table's rows."""

from __future__ import annotations

import math

import pytest

from dyrate_ext.evaluate.paired import (
    CurvePoint,
    attach_vs_fastv,
    bracket,
    curve_of,
    format_paired,
    mean_se,
    paired_difference,
    paired_note,
)
from dyrate_ext.evaluate.runner import Row


def test_mean_se_by_hand():
    # diffs 1, 2, 3, 6: mean 3, squared deviations 4, 1, 0, 9 -> var 14 / 3, se sqrt(14/3 / 4).
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0
    assert se == pytest.approx(math.sqrt(14 / 12))
    assert mean_se([2.0, 2.0, 2.0]) == (2.0, 0.0)
    assert mean_se([5.0]) == (5.0, None)
    with pytest.raises(ValueError, match="no differences"):
        mean_se([])


def test_bracket():
    costs = [60.0, 80.0, 100.0]
    assert bracket(costs, 70.0) == (0, 1, 0.5)
    assert bracket(costs, 95.0) == (1, 2, pytest.approx(0.75))
    assert bracket(costs, 60.0) == (0, 1, 0.0)
    assert bracket(costs, 80.0) == (0, 1, 1.0)
    assert bracket(costs, 100.0) == (1, 2, 1.0)
    for outside in (59.9, 100.1, math.nan):
        assert bracket(costs, outside) is None
    assert bracket([50.0, 50.0, 100.0], 50.0) == (0, 1, 0.0)  # equal costs: weight 0
    assert bracket([100.0], 100.0) == (0, 0, 0.0)
    assert bracket([], 100.0) is None


CURVE = [  # FastV r = 0.5 and 0.25 and NoPrune, three pictures; given out of order
    CurvePoint("FastV(k=2 r=0.25)", 90.0, {1: 40.0, 2: 60.0, 3: 80.0}),
    CurvePoint("NoPrune", 100.0, {1: 50.0, 2: 70.0, 3: 90.0}),
    CurvePoint("FastV(k=2 r=0.5)", 80.0, {1: 20.0, 2: 40.0, 3: 30.0}),
]


def test_interpolation_per_picture():
    # At 85 %: halfway between r=0.5 (80 %) and r=0.25 (90 %): FastV 30, 50, 55 per picture.
    policy = {1: 33.0, 2: 50.0, 3: 61.0}  # differences 3, 0, 6: mean 3, var 9, se sqrt(3)
    p = paired_difference(policy, 85.0, CURVE)
    assert p is not None
    assert (p.lo, p.hi, p.weight, p.n) == ("FastV(k=2 r=0.5)", "FastV(k=2 r=0.25)", 0.5, 3)
    assert p.delta == pytest.approx(3.0) and p.se == pytest.approx(math.sqrt(3.0))
    # The mean difference is the corpus difference against the interpolated corpus CIDEr.
    corpus = {c.cost: sum(c.cider.values()) / 3 for c in CURVE}
    interpolated = 0.5 * corpus[80.0] + 0.5 * corpus[90.0]
    assert p.delta == pytest.approx(sum(policy.values()) / 3 - interpolated)
    # At 97.5 %: three quarters of the way from r=0.25 to NoPrune: 47.5, 67.5, 87.5.
    q = paired_difference({1: 47.5, 2: 67.5, 3: 87.5}, 97.5, CURVE)
    assert q is not None and q.delta == pytest.approx(0.0) and q.se == pytest.approx(0.0)
    assert (q.lo, q.hi, q.weight) == ("FastV(k=2 r=0.25)", "NoPrune", pytest.approx(0.75))


def test_a_curve_point_against_itself_is_exactly_zero():
    for point in CURVE:
        p = paired_difference(point.cider, point.cost, CURVE)
        assert p is not None and (p.delta, p.se) == (0.0, 0.0)


def test_outside_the_curve_is_none():
    scores = {1: 1.0, 2: 2.0, 3: 3.0}
    assert paired_difference(scores, 79.0, CURVE) is None  # cheaper than any FastV setting
    assert paired_difference(scores, 100.5, CURVE) is None
    assert paired_difference(scores, math.nan, CURVE) is None
    assert paired_difference(scores, 90.0, []) is None
    with pytest.raises(ValueError, match="picture 4"):
        paired_difference({4: 1.0}, 85.0, CURVE)


def row(name: str, family: str, cost: float, cider: dict[int, float], **costs: float) -> Row:
    fields = {f"{c}_percent": costs.get(c, cost) for c in ("paper_flops", "kv_read", "peak_kv")}
    return Row(
        name, family, "", cider=sum(cider.values()) / len(cider), bleu4=0.0,
        fact_precision=None, fact_recall=None, flops_percent=cost, **fields,
        gflops_per_caption=0.0, kv_read_mb_per_caption=0.0, peak_kv_mb_per_caption=0.0,
        kept_image_tokens=0.0, image_tokens=0.0, mean_tokens=0.0, prefill_ms_per_image=0.0,
        decode_ms_per_step=0.0, cider_per_image=cider,
    )  # fmt: skip


def test_attach_to_a_table():
    rows = [
        row("NoPrune", "NoPrune", 100.0, {1: 50.0, 2: 70.0}),
        row("NoPrune, blank image", "NoPrune, blank image", 100.0, {1: 10.0, 2: 20.0}),
        row("FastV(k=2 r=0.5)", "FastV k=2", 80.0, {1: 20.0, 2: 40.0}, kv_read=60.0),
        row("FastV(k=3 r=0.5)", "FastV k=3", 85.0, {1: 0.0, 2: 0.0}),  # not on the curve
        row("VTW(k=1)", "VTW", 55.0, {1: 5.0, 2: 5.0}, kv_read=70.0),
    ]
    attach_vs_fastv(rows)
    curve = curve_of(rows, "flops")
    assert [p.name for p in curve] == ["FastV(k=2 r=0.5)", "NoPrune"]
    assert rows[0].vs_fastv["flops"]["delta"] == 0.0
    blank = rows[1].vs_fastv["peak_kv_bytes"]
    assert blank["delta"] == pytest.approx(-45.0) and blank["se"] == pytest.approx(5.0)
    # FastV k=3 at 85 %: a quarter from (20, 40) to (50, 70): 27.5, 47.5.
    assert rows[3].vs_fastv["flops"]["delta"] == pytest.approx(-37.5)
    # Its KV read (85 %) is 0.625 of the way from FastV (60 %) to NoPrune: 38.75, 58.75.
    assert rows[3].vs_fastv["kv_read_bytes"]["delta"] == pytest.approx(-48.75)
    assert rows[3].vs_fastv["kv_read_bytes"]["weight"] == pytest.approx(0.625)
    # VTW: outside the FLOPs range (55 < 80), inside the KV-read one (60..100): 70 % is a
    # quarter from FastV(20, 40) to NoPrune(50, 70): 27.5, 47.5.
    assert rows[4].vs_fastv["flops"] is None
    assert rows[4].vs_fastv["kv_read_bytes"]["delta"] == pytest.approx(-32.5)
    assert format_paired(rows[4].vs_fastv["flops"]) == "outside"
    assert format_paired(rows[1].vs_fastv["flops"]) == "-45.0 ± 5.0"
    assert format_paired({"delta": 1.25, "se": None}) == "+1.2 ± -"
    note = paired_note(rows, ("flops", "kv_read_bytes"))
    assert "KV-cache FLOPs 80.0-100.0 %" in note and "decode KV bytes read 60.0-100.0 %" in note
    # Against its own curve FastV k=3 sits on a point (delta 0); the k=2 curve is higher there.
    assert rows[3].vs_fastv["flops"]["curve"] == "FastV k=2"
    rest = [r for r in rows if not r.family.startswith("FastV")]
    attach_vs_fastv(rest)
    assert all(v is None for r in rest for v in r.vs_fastv.values())
    assert "no FastV rows" in paired_note(rest, ("flops",))


def test_fastv_at_its_best_k():
    """Each row is compared with the FastV k whose curve is highest at its cost."""
    rows = [
        row("NoPrune", "NoPrune", 100.0, {1: 50.0, 2: 70.0}),
        row("FastV(k=1 r=0.5)", "FastV k=1", 60.0, {1: 40.0, 2: 60.0}),
        row("FastV(k=2 r=0.5)", "FastV k=2", 70.0, {1: 20.0, 2: 30.0}),
        row("DyRate", "DyRate", 80.0, {1: 45.0, 2: 65.0}),
        row("DyRate cheap", "DyRate", 65.0, {1: 45.0, 2: 65.0}),
    ]
    attach_vs_fastv(rows)
    # At 80 %: k=1's curve is half way from (40, 60) to (50, 70): 45, 65 -> delta 0; k=2's is a
    # third from (20, 30) to (50, 70): 30, 43.3 -> +18.3. The best curve (k=1) is the one used.
    at80 = rows[3].vs_fastv["flops"]
    assert at80["curve"] == "FastV k=1" and at80["delta"] == pytest.approx(0.0)
    # At 65 %: only k=1's curve reaches it (k=2's starts at 70 %): an eighth of the way from
    # (40, 60) to (50, 70): 41.25, 61.25.
    at65 = rows[4].vs_fastv["flops"]
    assert at65["curve"] == "FastV k=1" and at65["delta"] == pytest.approx(3.75)
    assert rows[2].vs_fastv["flops"]["delta"] < 0  # FastV k=2 is below the k=1 curve
