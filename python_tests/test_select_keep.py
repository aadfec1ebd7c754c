"""select_keep against the reference: ties, keep 0 / all / more than available, padding."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import IMAGE, LlavaShape, llava_token_type, random_token_type


def check(score, types, counts, target=1):
    counts_t = torch.as_tensor(counts, dtype=torch.int64)
    idx, n = dyrate_ext.select_keep(score, types, counts_t, target)
    ridx, rn = ref.select_keep(score, types, counts_t, target)
    assert idx.dtype == torch.int64 and n.dtype == torch.int64
    assert torch.equal(n, rn), (n, rn)
    assert torch.equal(idx, ridx)
    return idx, n


@pytest.mark.parametrize("b,length", [(1, 1), (1, 7), (3, 65), (2, 650), (1, 4097)])
def test_matches_reference(b, length, gen):
    types = random_token_type(b, length, gen, p_empty=0.15)
    score = torch.rand(b, length, generator=gen)
    n_img = (types == IMAGE).sum(1)
    counts = (n_img.float() * torch.rand(b, generator=gen)).long()
    check(score, types, counts)


def test_ties_prefer_lower_index(gen):
    types = random_token_type(2, 300, gen, p_empty=0.0)
    score = (torch.rand(2, 300, generator=gen) * 4).floor() / 4  # four distinct values
    for keep in (0, 1, 17, 40, 299):
        check(score, types, [keep, keep])
    flat = torch.full((1, 10), 0.5)
    idx, n = check(flat, torch.ones(1, 10, dtype=torch.int8), [3])
    assert idx[0, :3].tolist() == [0, 1, 2]


def test_keep_zero_all_and_more(gen):
    shape = LlavaShape(image=64, system=5, instruction=6, response=3)
    types = llava_token_type(3, shape, left_pad=[0, 4, 9])
    score = torch.rand(3, shape.length, generator=gen)
    idx, n = check(score, types, [0, 64, 10_000])
    non_image = ((types >= 0) & (types != IMAGE)).sum(1)
    assert n.tolist() == [non_image[0], non_image[1] + 64, non_image[2] + 64]
    assert (idx[0, n[0] :] == -1).all()


def test_other_target_type_and_no_target(gen):
    types = random_token_type(2, 40, gen)
    score = torch.rand(2, 40, generator=gen)
    check(score, types, [3, 5], target=3)
    no_image = types.masked_fill(types == IMAGE, 2)
    idx, n = check(score, no_image, [5, 5])
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
