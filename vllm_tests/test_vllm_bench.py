"""A smoke run of bench/vllm_e2e.py (`make bench-vllm`) at tiny size: every policy, every
concurrency, and the kept image tokens each policy should leave."""

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
