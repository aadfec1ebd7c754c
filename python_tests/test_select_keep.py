"""select_keep against the reference on every backend: ties, keep 0 / all / more than
available, padding, special values, long rows (the CUDA kernel's staged and global paths)."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext.testing import (
    IMAGE,
    SELECT_SHAPES,
    SELECT_SHAPES_SLOW,
    LlavaShape,
    check_select_keep,
    llava_token_type,
    random_token_type,
    special_scores,
)


def random_counts(types, gen):
    """Per sample: none, all, more than available, a random share and one image slot."""
    n_img = (types == IMAGE).sum(1)
    b = types.shape[0]
    return [
        torch.zeros(b, dtype=torch.long),
        n_img,
        n_img + 5,
        (n_img.float() * torch.rand(b, generator=gen)).long(),
        torch.minimum(n_img, torch.ones(b, dtype=torch.long)),
    ]


def run_grid(backend, b, length, ties, gen):
    types = random_token_type(b, length, gen, p_empty=0.15)
    score = torch.rand(b, length, generator=gen)
    if ties:
        score = (score * 4).floor() / 4  # few distinct values: many ties
    for counts in random_counts(types, gen):
        check_select_keep(backend, score, types, counts)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("b,length", SELECT_SHAPES)
def test_matches_reference(backend, b, length, ties, gen):
    run_grid(backend, b, length, ties, gen)


@pytest.mark.slow
@pytest.mark.parametrize("b,length", SELECT_SHAPES_SLOW)
def test_matches_reference_long(backend, b, length, gen):
    run_grid(backend, b, length, True, gen)


def test_special_values(backend, gen):
    """NaN ranks as -inf (and ties with it), -0 ties with +0, infinities order correctly."""
    length = 64
    score, types = special_scores(gen, length)
    for keep in range(0, length - 2, 3):
        check_select_keep(backend, score, types, [keep, length - 3 - keep])


def test_other_target_strided_and_negative(backend, gen):
    types = random_token_type(3, 90, gen)
    score = torch.rand(3, 90, generator=gen)
    column_major = backend.to(score).t().contiguous().t()  # stride (1, 3) on the device
    idx, n = backend.ops.select_keep(
        column_major, backend.to(types), backend.to(torch.tensor([5, 0, 100])), 2
    )
    cpu = dyrate_ext.select_keep(score, types, torch.tensor([5, 0, 100]), 2)
    assert torch.equal(idx.cpu(), cpu[0]) and torch.equal(n.cpu(), cpu[1])
    check_select_keep(backend, score, types, [3, 7, 11], target=9)  # no slot of type 9
    if backend.cuda_kernels:  # no value check on the device: a negative count keeps none
        check_select_keep(backend, score, types, [-3, 2, 0])


def test_ties_prefer_lower_index(backend, gen):
    types = random_token_type(2, 300, gen, p_empty=0.0)
    score = (torch.rand(2, 300, generator=gen) * 4).floor() / 4  # four distinct values
    for keep in (0, 1, 17, 40, 299):
        check_select_keep(backend, score, types, [keep, keep])
    flat = torch.full((1, 10), 0.5)
    idx, n = check_select_keep(backend, flat, torch.ones(1, 10, dtype=torch.int8), [3])
    assert idx[0, :3].tolist() == [0, 1, 2]


def test_keep_zero_all_and_more(backend, gen):
    shape = LlavaShape(image=64, system=5, instruction=6, response=3)
    types = llava_token_type(3, shape, left_pad=[0, 4, 9])
    score = torch.rand(3, shape.length, generator=gen)
    idx, n = check_select_keep(backend, score, types, [0, 64, 10_000])
    non_image = ((types >= 0) & (types != IMAGE)).sum(1)
    assert n.tolist() == [non_image[0], non_image[1] + 64, non_image[2] + 64]
    assert (idx[0, n[0] :] == -1).all()


def test_other_target_type_and_no_target(backend, gen):
    types = random_token_type(2, 40, gen)
    score = torch.rand(2, 40, generator=gen)
    check_select_keep(backend, score, types, [3, 5], target=3)
    no_image = types.masked_fill(types == IMAGE, 2)
    idx, n = check_select_keep(backend, score, no_image, [5, 5])
    assert torch.equal(n, (no_image >= 0).sum(1))


def test_nan_scores_rank_lowest():
    types = torch.ones(1, 6, dtype=torch.int8)
    score = torch.tensor([[float("nan"), 0.1, float("nan"), 0.3, -1.0, 0.2]])
    idx, n = dyrate_ext.select_keep(score, types, 3)
    assert idx[0, :3].tolist() == [1, 3, 5]


def test_int_and_list_keep_count(gen):
    types = random_token_type(2, 30, gen)
    score = torch.rand(2, 30, generator=gen)
    a = dyrate_ext.select_keep(score, types, 4)
    b = dyrate_ext.select_keep(score, types, [4, 4])
    assert all(torch.equal(x, y) for x, y in zip(a, b))
