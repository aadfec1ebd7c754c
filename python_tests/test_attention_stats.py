"""attention_stats and attention_stats_from_probs against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPES, assert_close_to_reference

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import LlavaShape, llava_token_type, randn, random_token_type

# (B, H_q, H_kv, Q, L, D, causal): B=1, odd sizes, GQA, several query rows, Q == L.
SHAPES = [
    (1, 1, 1, 1, 1, 1, True),
    (1, 4, 4, 1, 33, 8, True),
    (2, 8, 2, 3, 37, 19, True),
    (3, 6, 3, 5, 64, 16, False),
    (2, 4, 1, 7, 7, 33, True),
    (1, 32, 8, 1, 129, 128, True),
]
SLOW_SHAPES = [(4, 32, 32, 1, 650, 128, True), (2, 40, 8, 16, 1000, 80, True)]


def run_case(shape, dtype, gen, p_empty=0.1):
    b, hq, hkv, qn, length, d, causal = shape
    q = randn((b, hq, qn, d), gen, dtype)
    k = randn((b, hkv, length, d), gen, dtype)
    types = random_token_type(b, length, gen, p_empty)
    scale = d**-0.5
    mass, score = dyrate_ext.attention_stats(q, k, types, scale, causal=causal)
    mass64, score64 = ref.attention_stats(q.double(), k.double(), types, scale, causal=causal)
    eager = (
        ref.attention_stats(q, k, types, scale, causal=causal)
        if dtype != torch.float32
        else (None, None)
    )
    assert mass.dtype == torch.float32 and score.dtype == torch.float32
    assert mass.shape == (b, hq, 4) and score.shape == (b, length)
    assert_close_to_reference(mass, mass64, eager[0], dtype, "type_mass")
    assert_close_to_reference(score, score64, eager[1], dtype, "token_score")
    never = ~ref.allowed_mask(types, qn, causal).any(dim=1)
    assert (score[never] == 0).all(), "slots never allowed must score exactly 0"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, gen):
    run_case(shape, dtype, gen)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SLOW_SHAPES)
def test_matches_reference_large(shape, dtype, gen):
    run_case(shape, dtype, gen)


def test_empty_rows_contribute_zeros(gen):
    q = randn((2, 4, 3, 8), gen)
    k = randn((2, 2, 10, 8), gen)
    types = random_token_type(2, 10, gen, p_empty=0.0)
    types[1] = -1  # sample 1 has no slot at all
    types[0, :8] = -1  # sample 0: row 0 sees slots <= 7, all empty
    mass, score = dyrate_ext.attention_stats(q, k, types)
    assert torch.isfinite(mass).all() and torch.isfinite(score).all()
    assert (mass[1] == 0).all() and (score[1] == 0).all()
    # Rows 1 and 2 of sample 0 see one and two valid slots: each row's mass sums to 1.
    torch.testing.assert_close(mass[0].sum(-1), torch.full((4,), 2 / 3))


def test_no_query_heads_gives_zeros(gen):
    q = randn((2, 0, 1, 8), gen)
    k = randn((2, 1, 9, 8), gen)
    mass, score = dyrate_ext.attention_stats(q, k, random_token_type(2, 9, gen))
    assert mass.shape == (2, 0, 4)
    assert torch.equal(score, torch.zeros(2, 9))


def test_llava_layout_mass_sums_to_one(gen):
    shape = LlavaShape(heads=8, kv_heads=8, head_dim=32)
    types = llava_token_type(2, shape, left_pad=[0, 17])
    q = randn((2, 8, 1, 32), gen)
    k = randn((2, 8, shape.length, 32), gen)
    mass, score = dyrate_ext.attention_stats(q, k, types)
    torch.testing.assert_close(mass.sum(-1), torch.ones(2, 8))
    torch.testing.assert_close(score.sum(-1), torch.ones(2))
    assert (score[1, :17] == 0).all()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 41), (3, 8, 1, 650)])
def test_from_probs_matches_reference(shape, dtype, gen):
    b, h, qn, length = shape
    probs = torch.rand(shape, generator=gen).to(dtype)
    types = random_token_type(b, length, gen, p_empty=0.2)
    mass, score = dyrate_ext.attention_stats_from_probs(probs, types)
    mass64, score64 = ref.stats_from_probs(probs.double(), types)
    torch.testing.assert_close(mass.double(), mass64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(score.double(), score64, atol=1e-6, rtol=1e-5)


def test_from_probs_agrees_with_fused(gen):
    q = randn((2, 8, 4, 16), gen)
    k = randn((2, 4, 50, 16), gen)
    types = random_token_type(2, 50, gen)
    probs = ref.attention_probs(q, k, types, 0.25)
    fused = dyrate_ext.attention_stats(q, k, types, 0.25)
    given = dyrate_ext.attention_stats_from_probs(probs, types)
    for a, b in zip(fused, given):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_num_types_and_strided_inputs(gen):
    base_q = randn((2, 4, 3, 24), gen)
    q = base_q[:, :, :, :16]  # rows are strided, last dim still contiguous
    k = randn((2, 4, 20, 16), gen).transpose(1, 2).contiguous().transpose(1, 2)
    types = random_token_type(2, 20, gen, num_types=6)
    mass, score = dyrate_ext.attention_stats(q, k, types, 0.3, num_types=6)
    mass64, score64 = ref.attention_stats(q.double(), k.double(), types, 0.3, num_types=6)
    torch.testing.assert_close(mass.double(), mass64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(score.double(), score64, atol=1e-6, rtol=1e-5)


def test_deterministic_across_threads(gen):
    q = randn((2, 32, 2, 64), gen)
    k = randn((2, 8, 300, 64), gen)
    types = random_token_type(2, 300, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = dyrate_ext.attention_stats(q, k, types)
        torch.set_num_threads(max(2, threads))
        for _ in range(3):
            again = dyrate_ext.attention_stats(q, k, types)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(threads)
