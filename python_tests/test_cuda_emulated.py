"""What only the emulated CUDA kernels can show (tools/simt_emu): other launch plans than the
op suite's 132 SMs, bitwise determinism under other thread and block interleavings, values the
CUDA kernels bound instead of checking, rows past select_keep's shared-memory staging, and the
whole prune pipeline. The op tests themselves run on the emulator through the `backend`
fixture (python_tests/test_*.py); this file adds the emulator-only cases.

The emulator runs the real kernel sources, compiled for the host, block by block with emulated
barriers, warp collectives and memory checks (see tools/simt_emu/simt.h); it says nothing about
speed. python_tests/test_cuda_ops.py covers the real device.
"""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import (
    DTYPES,
    STATS_SHAPES,
    Backend,
    check_attention_stats,
    check_select_keep,
    randn,
    random_token_type,
)

pytestmark = pytest.mark.emulated


def stats_case(shape, dtype, gen, p_empty=0.15):
    b, hq, hkv, qn, length, d, causal = shape
    q = randn((b, hq, qn, d), gen, dtype)
    k = randn((b, hkv, length, d), gen, dtype)
    types = random_token_type(b, length, gen, p_empty)
    return q, k, types, (max(d, 1)) ** -0.5, causal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_attention_stats_one_sm(emu, shape, dtype, gen):
    """A device of one SM: the plan keeps each key sequence in few chunks (the op suite runs
    the plan of 132 SMs)."""
    emu.set_sm_count(1)
    q, k, types, scale, causal = stats_case(shape, dtype, gen)
    check_attention_stats(Backend("emulated", emu), q, k, types, scale, causal)


def test_attention_stats_empty_rows_and_out_of_range_types(emu, gen):
    q = randn((2, 4, 3, 8), gen)
    k = randn((2, 2, 10, 8), gen)
    types = random_token_type(2, 10, gen, p_empty=0.0)
    types[1] = -1
    types[0, :8] = -1  # row 0 of sample 0 sees only empty slots
    mass, score = emu.attention_stats(q, k, types, 0.3, 4, True)
    cpu = dyrate_ext.attention_stats(q, k, types, 0.3)
    assert torch.isfinite(mass).all() and torch.isfinite(score).all()
    torch.testing.assert_close(mass, cpu[0])
    torch.testing.assert_close(score, cpu[1])
    # The CUDA kernels never read type values back to the host: 7 and -5 are empty slots.
    bad = types.clone()
    bad[0, 9] = 7
    bad[0, 8] = -5
    fixed = bad.clone()
    fixed[0, 8:] = -1
    m_bad, s_bad = emu.attention_stats(q, k, bad, 0.3, 4, True)
    m_ok, s_ok = emu.attention_stats(q, k, fixed, 0.3, 4, True)
    assert torch.equal(m_bad, m_ok) and torch.equal(s_bad, s_ok)


def test_attention_stats_many_types(emu, gen):
    q = randn((1, 2, 2, 16), gen)
    k = randn((1, 2, 60, 16), gen)
    types = random_token_type(1, 60, gen, 0.1, num_types=11)
    out = emu.attention_stats(q, k, types, 0.25, 11, False)
    cpu = dyrate_ext.attention_stats(q, k, types, 0.25, num_types=11, causal=False)
    torch.testing.assert_close(out[0], cpu[0])
    torch.testing.assert_close(out[1], cpu[1])


@pytest.mark.parametrize("shape", [(2, 8, 2, 3, 37, 19, True), (1, 4, 2, 10, 30, 16, True)])
def test_attention_stats_bitwise_deterministic(emu, shape, gen):
    q, k, types, scale, causal = stats_case(shape, torch.float16, gen)
    first = emu.attention_stats(q, k, types, scale, 4, causal)
    for seed in (2, 3):
        emu.set_seed(seed)  # another interleaving of the threads
        again = emu.attention_stats(q, k, types, scale, 4, causal)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_attention_stats_long_chunk_restages_types(emu, gen):
    """One SM (3 blocks) and three kv rows: a chunk holds the whole key sequence, 4500 slots, so
    the q.k kernel stages the chunk's token types in shared memory three times (kStatsTypeTile
    = 2048 slots at a time); Q = 1 merges from kept logits, Q = 9 recomputes q.k."""
    emu.set_sm_count(1)
    plan = emu.plan_attention_stats(3, 2, 1, 1, 4500, 16, 2, True, 1, 3)
    assert plan["chunks"] == 1 and plan["chunk_len"] >= 4500
    for qn in (1, 9):
        q, k, types, scale, causal = stats_case((3, 2, 1, qn, 4500, 16, True), torch.half, gen)
        types[:, 2040:2060] = 2  # a run of another type across the first tile border
        check_attention_stats(Backend("emulated", emu), q, k, types, scale, causal)


@pytest.mark.parametrize("hq, hkv, qn", [(40, 8, 8), (37, 37, 1), (3, 1, 8)])
def test_attention_stats_merge_head_batches(emu, hq, hkv, qn, gen):
    """The merge of kept logits takes the rows of 256 / Q heads at a time and splits each
    batch's heads over four threads per slot: H_q * Q past 256 rows (two batches), a head count
    that does not split evenly, and fewer heads than threads per slot."""
    q, k, types, scale, causal = stats_case((2, hq, hkv, qn, 70, 8, True), torch.float32, gen)
    check_attention_stats(Backend("emulated", emu), q, k, types, scale, causal)
    first = emu.attention_stats(q, k, types, scale, 4, causal)
    emu.set_seed(5)
    again = emu.attention_stats(q, k, types, scale, 4, causal)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_select_keep_32k(emu, gen):
    """A row four times past the shared-memory staging limit: every pass reads global memory."""
    length = 32768
    types = torch.ones(1, length, dtype=torch.int8)
    types[0, :100] = 0
    types[0, -50:] = 2
    score = torch.randint(0, 1000, (1, length), generator=gen).float() / 7  # ties
    for keep in (0, 1, 777, 16000, 32617, 40000):
        check_select_keep(Backend("emulated", emu), score, types, [keep])


def compact_plan(types, gen):
    score = torch.rand(types.shape, generator=gen)
    n_img = (types == 1).sum(1)
    counts = (n_img.float() * torch.rand(types.shape[0], generator=gen)).long()
    return dyrate_ext.select_keep(score, types, counts)


def test_compact_bad_plan_values_stay_in_bounds(emu, gen):
    """Out-of-range keep_index entries are skipped and new_length is clamped, without a crash."""
    x = randn((2, 2, 20, 8), gen)
    before = x.clone()
    idx = torch.full((2, 20), -1, dtype=torch.long)
    idx[0, :5] = torch.tensor([0, 3, 99, 7, -4])
    idx[1, :20] = torch.arange(20)
    n = torch.tensor([5, 1000])
    emu.compact_([x], idx, n)
    assert torch.equal(x[0, :, 1], before[0, :, 3]) and torch.equal(x[0, :, 3], before[0, :, 7])
    assert torch.equal(x[0, :, 2], before[0, :, 2]) and torch.equal(x[0, :, 4], before[0, :, 4])
    assert torch.equal(x[1], before[1])
    types = random_token_type(2, 20, gen)
    emu.compact_token_type_(types, idx, n)


def test_prune_pipeline_matches_cpu(emu, gen):
    """stats -> select -> compact on the emulator equals the same pipeline on the CPU kernels."""
    b, h, length, d = 2, 4, 90, 16
    types = random_token_type(b, length, gen, 0.05)
    q = randn((b, h, 1, d), gen, torch.float16)
    cache = [randn((b, h, length, d), gen, torch.float16) for _ in range(4)]
    cache_cpu = [t.clone() for t in cache]
    types_cpu = types.clone()
    counts = ref.keep_count_from_rate(types, 0.5)
    _, score = emu.attention_stats(q, cache[0], types, d**-0.5, 4, True)
    idx, n = emu.select_keep(score, types, counts, 1)
    emu.compact_(cache, idx, n)
    emu.compact_token_type_(types, idx, n)
    cpu_stats = dyrate_ext.attention_stats(q, cache_cpu[0], types_cpu, d**-0.5)
    torch.testing.assert_close(score, cpu_stats[1])
    # The CPU pipeline selects on the emulator's score: equal inputs, so exact equality below.
    res = dyrate_ext.prune_kv(
        cache_cpu, types_cpu, token_score=score, keep_count=counts, narrow=False
    )
    assert torch.equal(n, res.new_length) and torch.equal(idx, res.keep_index)
    assert torch.equal(types, types_cpu)
    for a, c in zip(cache, cache_cpu):
        assert torch.equal(a, c)
