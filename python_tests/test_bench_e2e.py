"""Smoke test of the end-to-end benchmark (bench/e2e.py) and its report at tiny sizes.

Every policy runs at every batch size; ratios to NoPrune are 1 for NoPrune; pruning lowers
the live KV cache, the FLOPs and the bytes the loop's buffers hold; the report writes its
tables and replaces the README section between its markers.
"""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from bench import e2e, e2e_report


def test_e2e_smoke(tmp_path, monkeypatch):
    result = e2e.run_e2e(e2e.tiny_config(image_size=56), progress=False)  # 16 image tokens
    rows = result["rows"]
    assert [(r["batch"], r["policy"]) for r in rows][:2] == [
        (1, "NoPrune"),
        (1, "FastV(k=2, r=0.5)"),
    ]
    assert len(rows) == 12 and {r["batch"] for r in rows} == {1, 3}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0 and r["decode_steps"] == 2
        if r["policy"] == "NoPrune":
            assert r["tokens_per_s_vs_noprune"] == 1.0 and r["flops_pct"] == 100.0
            base = r
        else:
            assert r["flops_pct"] < 100.0
            assert r["peak_live_kv_mib"] < base["peak_live_kv_mib"]
            # The loop's buffers follow the live slots too: pruning never holds more.
            assert r["allocated_kv_mib"] <= base["allocated_kv_mib"]
            if r["policy"].startswith(("FastV(k=2", "VTW")):
                assert r["allocated_kv_mib"] < base["allocated_kv_mib"]
        assert r["engine"] == "loop" and 1.0 <= r["held_vs_live_kv"] <= 1.25
    vtw = next(r for r in rows if r["policy"].startswith("VTW") and r["batch"] == 3)
    assert vtw["mean_kept_image"] == 0.0

    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(result))
    monkeypatch.setattr(sys, "argv", ["e2e_report.py", str(path)])
    e2e_report.main()
    text = (tmp_path / "e2e.md").read_text()
    assert "| policy | B=1 | B=3 |" in text and "(1.00x)" in text
