"""Smoke runs of bench/vllm_e2e.py and bench/vllm_kv.py (`make bench-vllm`) at tiny size: every
policy, every concurrency, the kept image tokens each policy should leave, the KV bytes held
and the concurrency a fixed KV budget holds."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_vllm_bench_smoke(engines, tmp_path):
    engines.close()  # the benchmark starts its own engines
    sys.path.insert(0, str(BENCH))
    try:
        import vllm_e2e
    finally:
        sys.path.remove(str(BENCH))
    config = vllm_e2e.tiny_config()
    results = vllm_e2e.run(config, tmp_path, progress=False)
    rows = {(r["policy"], r["concurrency"]): r for r in results["rows"]}
    names = {name for name, _ in rows}
    assert {"NoPrune", "FastV(k=2, r=0.5)", "VTW(k=2)"} <= names and len(names) == 6
    for (name, c), r in rows.items():
        assert r["prefill_s"] > 0 and r["requests_per_s"] > 0, (name, c)
    assert rows[("NoPrune", 1)]["kept_image"] is None
    assert rows[("FastV(k=2, r=0.5)", 2)]["kept_image"] == 32  # 64 image tokens, r = 0.5
    assert rows[("VTW(k=2)", 1)]["kept_image"] == 0
    text = vllm_e2e.report(results)
    assert "Decode throughput" in text and "c=2" in text


def test_vllm_kv_bench_smoke(engines, tmp_path):
    """bench/vllm_kv.py at tiny size: every policy gets a concurrency, no policy holds more KV
    bytes than NoPrune nor runs fewer requests in its budget, FastV and VTW hold fewer and
    VTW runs more."""
    engines.close()
    sys.path.insert(0, str(BENCH))
    try:
        import vllm_kv
    finally:
        sys.path.remove(str(BENCH))
    results = vllm_kv.run(vllm_kv.tiny_config(), tmp_path, progress=False)
    rows = {r["policy"]: r for r in results["rows"]}
    noprune, fastv = rows["NoPrune"], rows["FastV(k=2, r=0.5)"]
    assert noprune["groups"] == 1 and fastv["groups"] > 1
    assert noprune["max_concurrency"] >= 3  # the budget is NoPrune's for 3 requests
    for name, r in rows.items():
        assert r["max_concurrency"] >= noprune["max_concurrency"], name
        assert r["requests_per_s"] > 0, name
        assert r["held_end_bytes"] <= noprune["held_end_bytes"], name
    # 64 image tokens, blocks of 32: FastV frees one block per pruned group, VTW two
    assert fastv["held_end_bytes"] < noprune["held_end_bytes"]
    assert rows["VTW(k=2)"]["held_end_vs_noprune"] < fastv["held_end_vs_noprune"]
    assert rows["VTW(k=2)"]["max_concurrency"] > noprune["max_concurrency"]
    assert "concurrent requests" in vllm_kv.report(results)
