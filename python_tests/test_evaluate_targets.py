"""DyRate's targets checked on hand-made evaluation rows (dyrate_ext.evaluate.targets)."""

from __future__ import annotations

from dyrate_ext.evaluate.targets import check_targets, targets_markdown


def _row(name, family, cider, paper=100.0, kept=64.0, flops=None, kv=None):
    def paired(v):
        return None if v is None else {"delta": v[0], "se": v[1]}

    return {
        "name": name,
        "family": family,
        "cider": cider,
        "paper_flops_percent": paper,
        "kept_image_tokens": kept,
        "vs_fastv": {"flops": paired(flops), "kv_read_bytes": paired(kv)},
    }


def _table(dyrate_kept: float, **dy):
    return [
        _row("NoPrune", "NoPrune", 100.0),
        _row("FastV(k=2 r=0.5)", "FastV k=2", 90.0, paper=60.0),
        _row("VTW(k=2)", "VTW", 20.0, paper=30.0),
        _row("DyRate(a)", "DyRate", kept=dyrate_kept, **dy),
    ]


def test_each_target_on_hand_made_rows():
    tables = {
        "embedded test[:9] redundant": _table(
            10.0, cider=97.5, paper=39.0, flops=(-1.0, 1.5), kv=(3.0, 1.5)
        ),
        "embedded test[:9] dense": _table(12.0, cider=96.0, paper=39.0, flops=(-2.0, 1.5)),
    }
    red, dense = check_targets(tables)
    assert red.met == {"flops": ["DyRate(a)"], "kv_read": ["DyRate(a)"], "paper": ["DyRate(a)"]}
    # dense: -2.0 < -1 SE; KV outside the curve; 96 < 97 % of NoPrune; keeps 12 > 10.
    assert dense.met == {"flops": [], "kv_read": [], "paper": [], "dense": ["DyRate(a)"]}
    md = targets_markdown({"small": [red, dense]})
    assert "| small | embedded test[:9] redundant | yes: DyRate(a) |" in md
    assert md.count("**no**") == 3 and "| - |" in md


def test_boundaries():
    """Exactly 2 SEs above holds; below FastV's curve never holds the KV target; paper style
    just above 40 % or not above VTW fails."""
    kv_edge = _table(5.0, cider=99.0, paper=40.5, kv=(3.0, 1.5))
    below = _table(5.0, cider=10.0, paper=20.0, kv=(-0.0, 0.0))
    (a,) = check_targets({"s redundant": kv_edge})
    (b,) = check_targets({"s redundant": below})
    assert a.met["kv_read"] == ["DyRate(a)"] and a.met["paper"] == []
    assert b.met == {"flops": [], "kv_read": [], "paper": []}
