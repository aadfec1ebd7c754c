"""compact_ and compact_token_type_: in-place semantics against the reference."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import randn, random_token_type


def random_plan(types, gen):
    score = torch.rand(types.shape, generator=gen)
    n_img = (types == 1).sum(1)
    counts = (n_img.float() * torch.rand(types.shape[0], generator=gen)).long()
    return dyrate_ext.select_keep(score, types, counts)


def compact_like_reference(tensors, idx, n):
    """compact_ in one call, each tensor equal to the reference's compaction of it."""
    expected = [ref.compact(t, idx, n) for t in tensors]
    dyrate_ext.compact_(tensors, idx, n)
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "b,h,length,d", [(1, 1, 1, 1), (2, 3, 37, 7), (3, 4, 129, 128), (1, 2, 650, 80)]
)
def test_matches_reference(b, h, length, d, dtype, gen):
    types = random_token_type(b, length, gen, p_empty=0.1)
    idx, n = random_plan(types, gen)
    x = randn((b, h, length, d), gen, dtype)
    expected = ref.compact(x, idx, n)
    dyrate_ext.compact_([x], idx, n)
    assert torch.equal(x, expected)  # includes the untouched tail


def test_many_tensors_of_mixed_shapes_one_call(gen):
    types = random_token_type(2, 50, gen)
    idx, n = random_plan(types, gen)
    tensors = [
        randn((2, 4, 50, 16), gen),
        randn((2, 1, 50, 3), gen, torch.bfloat16),
        randn((2, 8, 50, 64), gen, torch.float16),
    ]
    compact_like_reference(tensors, idx, n)


def test_strided_views(gen):
    """Slices of larger buffers: slot stride != D and head stride != L * D."""
    types = random_token_type(2, 40, gen)
    idx, n = random_plan(types, gen)
    big = randn((2, 6, 40, 24), gen)
    view = big[:, 1:5, :, 4:20]
    other = big.clone()
    expected = ref.compact(view, idx, n)
    dyrate_ext.compact_([view], idx, n)
    assert torch.equal(view, expected)
    assert torch.equal(big[:, 0], other[:, 0]) and torch.equal(big[:, :, :, :4], other[:, :, :, :4])


def test_keep_all_is_a_no_op_and_empty_list(gen):
    x = randn((2, 3, 20, 8), gen)
    before = x.clone()
    idx = torch.arange(20).repeat(2, 1)
    n = torch.tensor([20, 20])
    dyrate_ext.compact_([x], idx, n)
    assert torch.equal(x, before)
    dyrate_ext.compact_([], idx, n)


def test_token_type_compaction(gen):
    types = random_token_type(3, 64, gen, p_empty=0.2)
    idx, n = random_plan(types, gen)
    expected = ref.compact_token_type(types, idx, n)
    t = types.clone()
    dyrate_ext.compact_token_type_(t, idx, n)
    assert torch.equal(t, expected)
    for b in range(3):
        assert (t[b, n[b] :] == -1).all()


def test_repeated_pruning_matches_composed_reference(gen):
    """Several decoding steps in a row, each compacting the already compacted cache."""
    types = random_token_type(2, 80, gen, p_empty=0.0)
    x = randn((2, 2, 80, 8), gen)
    mirror = x.clone()
    mirror_types = types.clone()
    for _ in range(4):
        idx, n = random_plan(types, gen)
        mirror = ref.compact(mirror, idx, n)
        mirror_types = ref.compact_token_type(mirror_types, idx, n)
        dyrate_ext.compact_([x], idx, n)
        dyrate_ext.compact_token_type_(types, idx, n)
        assert torch.equal(x, mirror) and torch.equal(types, mirror_types)


# ---------------------------------------------------------------------------------------------
# Overlapping memory: refused, naming both tensors, before anything is written.
# ---------------------------------------------------------------------------------------------


def overlap_cases(gen):
    """(tensors, message) pairs that compact_ must refuse."""
    big = randn((2, 6, 40, 24), gen)
    base = randn((2, 1, 40, 8), gen)
    fused = randn((2, 3, 40, 16), gen)
    return [
        ([big[:, 1:5, :, 4:20], big[:, :, :, 1:23]], r"tensors\[1\] and tensors\[0\] overlap"),
        ([randn((2, 2, 40, 8), gen), big[:, 2:4, :, :8], big[:, 3:5, :, :8]], r"tensors\[2\] and"),
        ([base.expand(2, 3, 40, 8)], r"tensors\[0\] has internal memory overlap"),
        ([fused[..., :10], fused[..., 6:16]], r"tensors\[1\] and tensors\[0\] overlap"),
        ([big.as_strided((2, 2, 40, 8), (1440, 4, 24, 1))], "internal memory overlap"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_overlapping_tensors_are_refused_and_nothing_written(case, gen):
    types = random_token_type(2, 40, gen)
    idx, n = random_plan(types, gen)
    tensors, match = overlap_cases(gen)[case]
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=match):
        dyrate_ext.compact_(tensors, idx, n)
    for t, b in zip(tensors, before):
        assert torch.equal(t, b)


def test_disjoint_views_of_one_buffer_are_accepted(gen):
    """A fused K/V buffer (K and V interleaved per slot) and head slices of one cache share a
    storage but no element: both are legal and compact exactly."""
    types = random_token_type(2, 40, gen)
    idx, n = random_plan(types, gen)
    fused = randn((2, 3, 40, 16), gen)
    heads = randn((2, 6, 40, 8), gen)
    tensors = [fused[..., :8], fused[..., 8:], heads[:, :3], heads[:, 3:]]
    compact_like_reference(tensors, idx, n)


def test_index_tensors_overlapping_a_cache_are_refused(gen):
    types = random_token_type(2, 40, gen)
    idx, n = random_plan(types, gen)
    storage = torch.zeros(40 + 2 * 2 * 40 * 4, dtype=torch.long)
    idx_view = storage[:80].view(2, 40)
    idx_view.copy_(idx)
    cache = storage[40:].view(torch.float64).view(2, 2, 40, 4)  # starts inside idx_view
    before = cache.clone()
    with pytest.raises(RuntimeError, match=r"tensors\[0\] and keep_index overlap"):
        dyrate_ext.compact_([cache], idx_view, n)
    assert torch.equal(cache.view(torch.long), before.view(torch.long))  # holds NaN bit patterns
    with pytest.raises(RuntimeError, match="token_type has internal memory overlap"):
        dyrate_ext.compact_token_type_(types[:1].expand(2, 40), idx, n)
    buf = torch.zeros(10, dtype=torch.long)
    packed_types = buf.view(torch.int8)[:80].view(2, 40)  # all SYSTEM (0)
    with pytest.raises(RuntimeError, match="token_type and new_length overlap"):
        dyrate_ext.compact_token_type_(packed_types, idx, buf[5:7])
