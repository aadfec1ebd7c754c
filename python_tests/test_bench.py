"""The benchmarks time what they name: their eager compositions compute what the ops compute,
and the GPU benchmark's code path runs end to end (on the CPU here, at a tiny shape)."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from bench import bench_ops, cases, eager
from dyrate_ext.results import read_results
from dyrate_ext.testing import LlavaShape

TINY = LlavaShape(
    layers=4, heads=4, kv_heads=4, head_dim=16, system=3, image=40, instruction=5, response=2
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_composition_matches_ops(dtype):
    c = cases.make_case(3, dtype, shape=TINY, pruned_layers=3)
    ours = dyrate_ext.attention_stats(c.query, c.key, c.types, c.scale)
    theirs = eager.attention_stats(c.query, c.key, c.types, c.scale)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    keep = eager.keep_count_from_rate(c.types, cases.RATE)
    assert torch.equal(keep, dyrate_ext.keep_count_from_rate(c.types, cases.RATE))
    idx, n = dyrate_ext.select_keep(ours[1], c.types, keep)
    e_idx, e_n = eager.select_keep(ours[1], c.types, keep)
    assert torch.equal(idx, e_idx) and torch.equal(n, e_n)

    res = dyrate_ext.prune_kv(c.layers, c.types, query=c.query, key=c.key, rate=cases.RATE)
    layers, types, length = eager.prune_kv_at_rate(
        c.pristine, c.pristine_types, c.query, c.key, cases.RATE, c.scale
    )
    assert torch.equal(res.new_length, length) and torch.equal(res.token_type, types)
    assert all(torch.equal(x, y) for x, y in zip(res.layers, layers))
    assert cases.moved_bytes(c, res.keep_index, res.new_length) <= cases.gathered_bytes(
        c, res.new_length
    )


def test_op_benchmark_code_path_at_a_tiny_shape():
    rows = bench_ops.bench_case(
        2, torch.float32, bw=1e10, iters=1, device="cpu", shape=TINY, pruned_layers=2
    )
    ops = [r["op"] for r in rows]
    assert ops == [
        "attention_stats",
        "attention_stats_from_probs",
        "select_keep",
        "compact_ (4 tensors)",
        "prune_kv",
    ]
    assert all(r["ours_ms"] > 0 and r["eager_ms"] > 0 and r["bytes"] > 0 for r in rows)
    compact = rows[3]
    assert compact["bytes"] <= compact["eager_bytes"]  # in place moves at most what a gather does
    quick = bench_ops.bench_case(
        1, torch.float32, bw=1e10, iters=1, device="cpu", shape=TINY, pruned_layers=2, quick=True
    )
    assert [r["op"] for r in quick] == ["prune_kv"]


def test_op_benchmark_quick_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_ops, "SHAPE", TINY)
    monkeypatch.setattr(bench_ops, "PRUNED_LAYERS", 2)
    out = tmp_path / "ops.json"
    assert (
        bench_ops.main(["--quick", "--iters", "1", "--dtypes", "float32", "--out", str(out)]) == 0
    )
    data = read_results(out)
    assert data["meta"]["quick"] is True and data["meta"]["copy_GBps"] > 0
    assert [r["op"] for r in data["rows"]] == ["prune_kv"]
    assert "| prune_kv | float32 |" in out.with_suffix(".md").read_text()
