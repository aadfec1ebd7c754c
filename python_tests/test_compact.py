"""compact_ and compact_token_type_ on every backend: in-place semantics against the
reference, every copy width, strided and misaligned views, many tensors per call, and the
refusal of tensors that overlap in memory."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import COMPACT_SHAPES, check_compact, randn, random_token_type


def random_plan(types, gen):
    score = torch.rand(types.shape, generator=gen)
    n_img = (types == 1).sum(1)
    counts = (n_img.float() * torch.rand(types.shape[0], generator=gen)).long()
    return dyrate_ext.select_keep(score, types, counts)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]
)
@pytest.mark.parametrize("b,h,length,d", COMPACT_SHAPES)
def test_matches_reference(backend, b, h, length, d, dtype, gen):
    types = random_token_type(b, length, gen, p_empty=0.1)
    idx, n = random_plan(types, gen)
    if dtype == torch.int8:
        x = torch.randint(-100, 100, (b, h, length, d), generator=gen, dtype=torch.int8)
    else:
        x = randn((b, h, length, d), gen, dtype)
    check_compact(backend, [backend.to(x)], idx, n)


def test_strided_misaligned_and_many_tensors(backend, gen):
    """Every copy width (16 down to 1 byte), views of a larger buffer (slot stride != D, head
    stride != L * D) that leave its other elements alone, and more tensors than one CUDA launch's
    table holds (64)."""
    types = random_token_type(2, 70, gen)
    idx, n = random_plan(types, gen)
    big = backend.to(randn((2, 6, 70, 24), gen))
    big_before = big.cpu()
    tensors = [
        big[:, 1:5, :, 4:20],  # 16-byte words, strided
        backend.to(randn((2, 4, 71, 23), gen))[:, :, 1:, 1:23],  # 4-byte words, misaligned
        backend.to(randn((2, 3, 70, 9), gen, torch.float16)),  # 2-byte words
        backend.to(torch.randint(0, 100, (2, 2, 70, 5), generator=gen, dtype=torch.int8)),
        backend.to(randn((2, 2, 70, 4), gen, torch.float16)),  # 8-byte rows
    ]
    tensors += [backend.to(randn((2, 1 + i % 3, 70, 8), gen, torch.bfloat16)) for i in range(70)]
    check_compact(backend, tensors, idx, n)
    after = big.cpu()
    assert torch.equal(after[:, 0], big_before[:, 0]) and torch.equal(after[:, 5], big_before[:, 5])
    assert torch.equal(after[..., :4], big_before[..., :4])


def test_keep_all_is_a_no_op_and_empty_list(backend, gen):
    x = backend.to(randn((2, 3, 20, 8), gen))
    before = x.cpu()
    idx = torch.arange(20).repeat(2, 1)
    n = torch.tensor([20, 20])
    backend.ops.compact_([x], backend.to(idx), backend.to(n))
    assert torch.equal(x.cpu(), before)
    backend.ops.compact_([], backend.to(idx), backend.to(n))


@pytest.mark.parametrize("b,length", [(1, 1), (3, 37), (2, 650), (1, 1000)])
def test_token_type_compaction(backend, b, length, gen):
    types = random_token_type(b, length, gen, p_empty=0.2)
    idx, n = random_plan(types, gen)
    expected = ref.compact_token_type(types, idx, n)
    t = backend.to(types)
    strided = backend.to(torch.zeros(length, b, dtype=torch.int8)).t()  # stride (1, b)
    strided.copy_(t)
    backend.ops.compact_token_type_(t, backend.to(idx), backend.to(n))
    backend.ops.compact_token_type_(strided, backend.to(idx), backend.to(n))
    assert torch.equal(t.cpu(), expected) and torch.equal(strided.cpu(), expected)
    for i in range(b):
        assert (t.cpu()[i, n[i] :] == -1).all()


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


def overlap_cases(gen, to=lambda t: t):
    """(tensors, message) pairs that compact_ must refuse; `to` moves a buffer to a device."""
    big = to(randn((2, 6, 40, 24), gen))
    base = to(randn((2, 1, 40, 8), gen))
    fused = to(randn((2, 3, 40, 16), gen))
    return [
        ([big[:, 1:5, :, 4:20], big[:, :, :, 1:23]], r"tensors\[1\] and tensors\[0\] overlap"),
        (
            [to(randn((2, 2, 40, 8), gen)), big[:, 2:4, :, :8], big[:, 3:5, :, :8]],
            r"tensors\[2\] and",
        ),
        ([base.expand(2, 3, 40, 8)], r"tensors\[0\] has internal memory overlap"),
        ([fused[..., :10], fused[..., 6:16]], r"tensors\[1\] and tensors\[0\] overlap"),
        ([big.as_strided((2, 2, 40, 8), (1440, 4, 24, 1))], "internal memory overlap"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_overlapping_tensors_are_refused_and_nothing_written(backend, case, gen):
    types = random_token_type(2, 40, gen)
    idx, n = random_plan(types, gen)
    tensors, match = overlap_cases(gen, backend.to)[case]
    before = [t.cpu() for t in tensors]
    with pytest.raises(RuntimeError, match=match):
        backend.ops.compact_(tensors, backend.to(idx), backend.to(n))
    for t, b in zip(tensors, before):
        assert torch.equal(t.cpu(), b)


def test_disjoint_views_of_one_buffer_are_accepted(backend, gen):
    """A fused K/V buffer (K and V interleaved per slot) and head slices of one cache share a
    storage but no element: both are legal and compact exactly."""
    types = random_token_type(2, 40, gen)
    idx, n = random_plan(types, gen)
    fused = backend.to(randn((2, 3, 40, 16), gen))
    heads = backend.to(randn((2, 6, 40, 8), gen))
    check_compact(backend, [fused[..., :8], fused[..., 8:], heads[:, :3], heads[:, 3:]], idx, n)


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
