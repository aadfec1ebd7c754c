"""bench/e2e.py --engine both: both engines interleaved in one run (tiny smoke run).

Every policy runs through the reference loop and through model.generate() under
dyrate_ext.hf.pruning, plus a vanilla model.generate() row per batch size; the keep counts,
FLOPs and live cache are the same in both engines, `hf_vs_loop` is the ratio of their decode
throughputs, the cache bytes held stay within 1.25x of the live slots and fall below vanilla
generate()'s DynamicCache for the pruning policies, and the report has both engines' tables.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from bench import e2e, e2e_report


def test_e2e_both_engines_smoke():
    result = e2e.run_e2e(e2e.tiny_config(engine="both"), progress=False)
    rows = {(r["engine"], r["batch"], r["policy"]): r for r in result["rows"]}
    names = [r["policy"] for r in result["rows"] if r["batch"] == 1 and r["engine"] == "loop"]
    assert names[0] == "NoPrune" and len(names) == 6
    for batch in (1, 3):
        vanilla = rows[("vanilla", batch, "generate()")]
        for name in names:
            loop, hf = rows[("loop", batch, name)], rows[("hf", batch, name)]
            # One state machine: the same keep counts, FLOPs and live cache in both engines.
            assert hf["mean_kept_image"] == loop["mean_kept_image"] and hf["flops"] == loop["flops"]
            assert hf["peak_live_kv_mib"] == loop["peak_live_kv_mib"]
            assert hf["tokens_per_s"] > 0 and hf["hf_vs_loop"] > 0
            # The median of the back-to-back pairs' ratios (one run each here).
            assert len(hf["hf_vs_loop_runs"]) == 1 and hf["hf_vs_loop"] == hf["hf_vs_loop_runs"][0]
            assert abs(hf["hf_vs_loop"] / (hf["tokens_per_s"] / loop["tokens_per_s"]) - 1) < 1e-9
            assert 1.0 <= hf["held_vs_live_kv"] <= 1.25
            if name.startswith(("FastV(k=2", "VTW")):
                assert hf["allocated_kv_mib"] < vanilla["allocated_kv_mib"]
        # NoPrune's cache holds what vanilla generate()'s holds, plus the growth headroom.
        noprune = rows[("hf", batch, "NoPrune")]
        assert (
            vanilla["allocated_kv_mib"]
            <= noprune["allocated_kv_mib"]
            <= (1.25 * vanilla["allocated_kv_mib"])
        )
    text = e2e_report.markdown(result)
    assert "generate() vs the reference loop" in text and text.count("**Engine:") == 2
