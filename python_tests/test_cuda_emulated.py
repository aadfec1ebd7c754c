"""The CUDA kernels and their glue, run on the host by the SIMT emulator (tools/simt_emu).

This is the check of the CUDA code that needs no GPU: the real kernel sources, compiled for the
host, executed block by block with emulated barriers and warp collectives, on CPU tensors, and
compared with the CPU kernels and the float64 reference. The emulator randomises the thread
order between barriers and fails on collectives reached by only part of a warp, so missing
barriers and divergent shuffles show up here. It says nothing about speed or about the memory
model beyond barriers; python_tests/test_cuda_ops.py covers the real device.

Marked slow: the first run compiles the emulated extension (about a minute on two cores).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOL, assert_close_to_reference

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import randn, random_token_type, special_scores

pytestmark = [pytest.mark.slow, pytest.mark.emulated]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# (B, H_q, H_kv, Q, L, D, causal): B=1, odd sizes, GQA, stored-logits and recompute paths.
STATS_SHAPES = [
    (1, 1, 1, 1, 1, 1, True),
    (1, 4, 4, 1, 33, 8, True),
    (2, 8, 2, 3, 37, 19, True),
    (3, 6, 3, 5, 64, 16, False),
    (2, 4, 1, 7, 7, 33, True),
    (1, 8, 2, 1, 129, 128, True),
    (1, 4, 4, 1, 650, 80, True),
    (2, 4, 2, 9, 41, 7, True),  # Q > 8: pass 2 recomputes q.k
    (1, 2, 1, 12, 12, 64, True),  # Q == L
    (1, 2, 2, 1, 20, 0, True),  # D == 0: uniform softmax
]


def stats_case(shape, dtype, gen, p_empty=0.15):
    b, hq, hkv, qn, length, d, causal = shape
    q = randn((b, hq, qn, d), gen, dtype)
    k = randn((b, hkv, length, d), gen, dtype)
    types = random_token_type(b, length, gen, p_empty)
    return q, k, types, (max(d, 1)) ** -0.5, causal


def check_stats(out, q, k, types, scale, causal, dtype):
    mass, score = out
    cpu_mass, cpu_score = dyrate_ext.attention_stats(q, k, types, scale, causal=causal)
    mass64, score64 = ref.attention_stats(q.double(), k.double(), types, scale, causal=causal)
    eager = (None, None)
    if dtype != torch.float32:
        eager = ref.attention_stats(q, k, types, scale, causal=causal)
    assert mass.shape == cpu_mass.shape and score.shape == cpu_score.shape
    assert_close_to_reference(mass, mass64, eager[0], dtype, "type_mass")
    assert_close_to_reference(score, score64, eager[1], dtype, "token_score")
    torch.testing.assert_close(mass, cpu_mass, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(score, cpu_score, atol=2e-6, rtol=1e-5)
    never = ~ref.allowed_mask(types, q.shape[2], causal).any(dim=1)
    assert (score[never] == 0).all()


@pytest.mark.parametrize("sm_count", [1, 132])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_attention_stats(emu, shape, dtype, sm_count, gen):
    emu.set_sm_count(sm_count)  # 1 SM: one chunk per row; 132: many chunks per row
    q, k, types, scale, causal = stats_case(shape, dtype, gen)
    out = emu.attention_stats(q, k, types, scale, 4, causal)
    check_stats(out, q, k, types, scale, causal, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_stats_misaligned_and_strided(emu, dtype, gen):
    """k sliced so 16-byte loads are impossible (scalar path); q with a non-contiguous layout."""
    big_k = randn((2, 3, 50, 66), gen, dtype)
    k = big_k[:, 1:3, 3:48, 1:65]  # offset of one element: misaligned
    q = randn((2, 5, 4, 64), gen, dtype).transpose(1, 2)[:, :4]  # [2, 4, 5, 64] strided
    types = random_token_type(2, 45, gen, 0.1)
    out = emu.attention_stats(q, k, types, 0.125, 4, True)
    check_stats(out, q, k, types, 0.125, True, dtype)


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


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 41), (3, 8, 1, 650), (1, 2, 3, 257)])
def test_stats_from_probs(emu, shape, dtype, gen):
    b, h, qn, length = shape
    probs = torch.softmax(torch.randn(b, h, qn, length, generator=gen), -1).to(dtype)
    types = random_token_type(b, length, gen, 0.1)
    mass, score = emu.attention_stats_from_probs(probs, types, 4)
    cpu_mass, cpu_score = dyrate_ext.attention_stats_from_probs(probs, types)
    mass64, score64 = ref.stats_from_probs(probs.double(), types)
    atol, rtol = TOL.get(dtype, TOL[torch.float32])
    torch.testing.assert_close(mass.double(), mass64, atol=atol, rtol=rtol)
    torch.testing.assert_close(score.double(), score64, atol=atol, rtol=rtol)
    torch.testing.assert_close(mass, cpu_mass, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(score, cpu_score, atol=2e-6, rtol=1e-5)


def test_stats_from_probs_strided(emu, gen):
    probs = torch.rand(3, 4, 6, 40, generator=gen).transpose(1, 2)  # [3, 6, 4, 40] strided
    types = random_token_type(3, 40, gen, 0.2)
    out = emu.attention_stats_from_probs(probs, types, 4)
    cpu = dyrate_ext.attention_stats_from_probs(probs, types)
    torch.testing.assert_close(out[0], cpu[0])
    torch.testing.assert_close(out[1], cpu[1])


def select_case(b, length, gen, ties=False, p_empty=0.1):
    types = random_token_type(b, length, gen, p_empty)
    score = torch.rand(b, length, generator=gen)
    if ties:
        score = (score * 4).floor() / 4  # few distinct values: many ties
    return score, types


def check_select(emu, score, types, counts, target=1):
    idx, n = emu.select_keep(score, types, counts, target)
    cpu_idx, cpu_n = dyrate_ext.select_keep(score, types, counts, target)
    assert torch.equal(n, cpu_n) and torch.equal(idx, cpu_idx)
    if not score.isnan().any():  # the reference's Python sort has no order for NaN
        ref_idx, ref_n = ref.select_keep(score, types, counts, target)
        assert torch.equal(n, ref_n) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("b,length", [(1, 1), (1, 7), (3, 33), (2, 650), (4, 129), (1, 1500)])
def test_select_keep(emu, b, length, ties, gen):
    score, types = select_case(b, length, gen, ties)
    n_img = (types == 1).sum(1)
    for counts in (
        torch.zeros(b, dtype=torch.long),
        n_img,
        n_img + 5,
        (n_img.float() * torch.rand(b, generator=gen)).long(),
        torch.minimum(n_img, torch.ones(b, dtype=torch.long)),
    ):
        check_select(emu, score, types, counts)


def test_select_keep_special_values(emu, gen):
    """NaN ranks as -inf (and ties with it), -0 ties with +0, infinities order correctly."""
    length = 64
    score, types = special_scores(gen, length)
    for keep in range(0, length - 2):
        check_select(emu, score, types, torch.tensor([keep, length - 3 - keep]))
    no_nan = score.nan_to_num(nan=-float("inf"))
    for keep in range(0, length - 2, 5):
        check_select(emu, no_nan, types, torch.tensor([keep, length - 3 - keep]))


def test_select_keep_other_target_and_strided(emu, gen):
    score, types = select_case(3, 90, gen)
    score_t = score.t().contiguous().t()  # column-major: stride (1, 3)
    check_select(emu, score_t, types, torch.tensor([5, 0, 100]), target=2)
    check_select(emu, score, types, torch.tensor([3, 7, 11]), target=9)  # no slot of type 9


def test_select_keep_negative_count_is_zero(emu, gen):
    score, types = select_case(2, 40, gen)
    idx, n = emu.select_keep(score, types, torch.tensor([-3, 2]), 1)
    ref_idx, ref_n = ref.select_keep(score, types, torch.tensor([0, 2]))
    assert torch.equal(idx, ref_idx) and torch.equal(n, ref_n)


def test_select_keep_32k(emu, gen):
    length = 32768
    types = torch.ones(1, length, dtype=torch.int8)
    types[0, :100] = 0
    types[0, -50:] = 2
    score = torch.randint(0, 1000, (1, length), generator=gen).float() / 7  # ties
    for keep in (0, 1, 777, 16000, 32617, 40000):
        check_select(emu, score, types, torch.tensor([keep]))


def compact_plan(types, gen):
    score = torch.rand(types.shape, generator=gen)
    n_img = (types == 1).sum(1)
    counts = (n_img.float() * torch.rand(types.shape[0], generator=gen)).long()
    return dyrate_ext.select_keep(score, types, counts)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]
)
@pytest.mark.parametrize(
    "b,h,length,d", [(1, 1, 1, 1), (2, 3, 37, 7), (3, 4, 129, 128), (1, 2, 650, 80), (2, 1, 300, 3)]
)
def test_compact(emu, b, h, length, d, dtype, gen):
    types = random_token_type(b, length, gen, p_empty=0.1)
    idx, n = compact_plan(types, gen)
    if dtype == torch.int8:
        x = torch.randint(-100, 100, (b, h, length, d), generator=gen, dtype=torch.int8)
    else:
        x = randn((b, h, length, d), gen, dtype)
    expected = ref.compact(x, idx, n)
    emu.compact_([x], idx, n)
    assert torch.equal(x, expected)  # includes the untouched tail


def test_compact_strided_misaligned_and_many_tensors(emu, gen):
    """Every copy width (16 down to 1 byte), views of larger buffers, and more tensors than one
    launch's table holds (64)."""
    types = random_token_type(2, 70, gen)
    idx, n = compact_plan(types, gen)
    big = randn((2, 6, 70, 24), gen)
    tensors = [
        big[:, 1:5, :, 4:20],  # 16-byte words, strided
        big[:, :, :, 1:23],  # 4-byte words (misaligned by one float)
        randn((2, 3, 70, 9), gen, torch.float16),  # 2-byte words
        torch.randint(0, 100, (2, 2, 70, 5), generator=gen, dtype=torch.int8),  # bytes
        randn((2, 2, 70, 4), gen, torch.float16),  # 8-byte rows
    ]
    tensors += [randn((2, 1 + i % 3, 70, 8), gen, torch.bfloat16) for i in range(70)]
    # big's two views overlap in memory; compact them in two calls so each reference is exact.
    first, rest = tensors[:1], tensors[1:]
    for group in (first, rest):
        expected = [ref.compact(t, idx, n) for t in group]
        emu.compact_(group, idx, n)
        for t, e in zip(group, expected):
            assert torch.equal(t, e)


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


@pytest.mark.parametrize("b,length", [(1, 1), (3, 37), (2, 650), (1, 1000)])
def test_compact_token_type(emu, b, length, gen):
    types = random_token_type(b, length, gen, p_empty=0.1)
    idx, n = compact_plan(types, gen)
    expected = ref.compact_token_type(types, idx, n)
    strided = torch.zeros(length, b, dtype=torch.int8).t()  # stride (1, b)
    strided.copy_(types)
    emu.compact_token_type_(types, idx, n)
    emu.compact_token_type_(strided, idx, n)
    assert torch.equal(types, expected) and torch.equal(strided, expected)


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


@pytest.mark.parametrize("case", range(5))
def test_compact_refuses_overlap(emu, case, gen):
    """The CUDA glue shares the CPU's overlap checks: refused, both tensors named, unwritten."""
    from test_compact import overlap_cases

    types = random_token_type(2, 40, gen)
    idx, n = compact_plan(types, gen)
    tensors, match = overlap_cases(gen)[case]
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=match):
        emu.compact_(tensors, idx, n)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))
