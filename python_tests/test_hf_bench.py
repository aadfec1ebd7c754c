"""bench/e2e.py --engine hf: the generate() path of the end-to-end benchmark (tiny smoke run).

Every policy runs through model.generate() under dyrate_ext.hf.pruning, plus a vanilla
model.generate() row per batch size; the cache bytes the PruningCache holds stay within 1.25x
of its live slots plus the reallocation headroom, fall below vanilla generate()'s DynamicCache
for the pruning policies, and the keep counts / FLOPs equal the reference loop's run.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("PIL")

import e2e


def tiny(engine: str) -> dict:
    return e2e.run_e2e(e2e.tiny_config(engine=engine), progress=False)


def test_generate_path_rows():
    hf = tiny("hf")
    loop = tiny("loop")
    rows = {(r["batch"], r["policy"]): r for r in hf["rows"]}
    names = [r["policy"] for r in hf["rows"] if r["batch"] == 1]
    assert names[0] == "NoPrune" and names[-1] == "generate()" and len(names) == 7
    for r in loop["rows"]:
        h = rows[(r["batch"], r["policy"])]
        assert h["mean_kept_image"] == r["mean_kept_image"] and h["flops"] == r["flops"]
        assert h["peak_live_kv_mib"] == r["peak_live_kv_mib"]
        assert h["tokens_per_s"] > 0
    for batch in (1, 3):
        vanilla = rows[(batch, "generate()")]
        for name in names[:-1]:
            row = rows[(batch, name)]
            assert 1.0 <= row["held_vs_live_kv"] <= 1.25
            if name.startswith(("FastV(k=2", "VTW")):
                assert row["allocated_kv_mib"] < vanilla["allocated_kv_mib"]
        # NoPrune's cache holds what vanilla generate()'s holds, plus the growth headroom.
        noprune = rows[(batch, "NoPrune")]
        assert (
            vanilla["allocated_kv_mib"]
            <= noprune["allocated_kv_mib"]
            <= (1.25 * vanilla["allocated_kv_mib"])
        )
