"""attention_stats and attention_stats_from_probs against the float64 reference, on every
backend (cpu, cuda, emulated: see the `backend` fixture)."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import (
    DTYPES,
    PROBS_SHAPES,
    STATS_SHAPES,
    STATS_SHAPES_SLOW,
    LlavaShape,
    check_attention_stats,
    check_stats_from_probs,
    llava_token_type,
    randn,
    random_token_type,
)


def run_case(backend, shape, dtype, gen, p_empty=0.1):
    b, hq, hkv, qn, length, d, causal = shape
    q = randn((b, hq, qn, d), gen, dtype)
    k = randn((b, hkv, length, d), gen, dtype)
    types = random_token_type(b, length, gen, p_empty)
    check_attention_stats(backend, q, k, types, max(d, 1) ** -0.5, causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_matches_reference(backend, shape, dtype, gen):
    run_case(backend, shape, dtype, gen)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STATS_SHAPES_SLOW)
def test_matches_reference_large(backend, shape, dtype, gen):
    run_case(backend, shape, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_and_strided(backend, dtype, gen):
    """k sliced so that 16-byte loads are impossible (the scalar path of the CUDA kernels);
    q with a non-contiguous layout; six token types and no causal mask."""
    big_k = backend.to(randn((2, 3, 50, 66), gen, dtype))
    k = big_k[:, 1:3, 3:48, 1:65]  # offset of one element: misaligned
    q = backend.to(randn((2, 5, 4, 64), gen, dtype)).transpose(1, 2)[:, :4]  # [2, 4, 5, 64]
    types = random_token_type(2, 45, gen, 0.1, num_types=6)
    mass, score = backend.ops.attention_stats(q, k, backend.to(types), 0.125, 6, False)
    qc, kc = q.cpu(), k.cpu()
    mass64, score64 = ref.attention_stats(qc.double(), kc.double(), types, 0.125, 6, False)
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # float32 accumulation of exact inputs
    torch.testing.assert_close(mass.cpu().double(), mass64, atol=tol, rtol=tol)
    torch.testing.assert_close(score.cpu().double(), score64, atol=tol, rtol=tol)


def test_empty_rows_contribute_zeros(backend, gen):
    q = randn((2, 4, 3, 8), gen)
    k = randn((2, 2, 10, 8), gen)
    types = random_token_type(2, 10, gen, p_empty=0.0)
    types[1] = -1  # sample 1 has no slot at all
    types[0, :8] = -1  # sample 0: row 0 sees slots <= 7, all empty
    mass, score = check_attention_stats(backend, q, k, types, 8**-0.5)
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
@pytest.mark.parametrize("shape", PROBS_SHAPES)
def test_from_probs_matches_reference(backend, shape, dtype, gen):
    b, h, qn, length = shape
    probs = torch.softmax(torch.randn(b, h, qn, length, generator=gen), -1).to(dtype)
    types = random_token_type(b, length, gen, p_empty=0.2)
    check_stats_from_probs(backend, probs, types)


def test_from_probs_strided(backend, gen):
    probs = torch.rand(3, 4, 6, 40, generator=gen)
    types = random_token_type(3, 40, gen, 0.2)
    strided = backend.to(probs).transpose(1, 2)  # [3, 6, 4, 40], strided on the device
    out = backend.ops.attention_stats_from_probs(strided, backend.to(types), 4)
    mass64, score64 = ref.stats_from_probs(probs.transpose(1, 2).double(), types)
    torch.testing.assert_close(out[0].cpu().double(), mass64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[1].cpu().double(), score64, atol=1e-6, rtol=1e-5)


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
