"""The benchmarks time what they name: their eager compositions compute what the ops compute,
and the GPU benchmark's code path runs end to end (on the CPU here, at a tiny shape)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dyrate_ext
from dyrate_ext.testing import LlavaShape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_gpu
import cases
import eager

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


def test_gpu_benchmark_code_path_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("bench/gpu_check.sh runs the real thing on a GPU")
    rows = bench_gpu.bench_case(
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
    assert "|" in bench_gpu.markdown(
        {
            "device": "cpu",
            "date": "today",
            "torch": torch.__version__,
            "cuda": None,
            "copy_GBps": 10.0,
            "iters": 1,
        },
        rows,
    )
