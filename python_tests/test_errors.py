"""One test per bad input: the error names the argument and nothing is written."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext.testing import randn, random_token_type

B, H, Q, L, D = 2, 4, 1, 12, 8


@pytest.fixture
def args(gen):
    q = randn((B, H, Q, D), gen)
    k = randn((B, H, L, D), gen)
    types = random_token_type(B, L, gen)
    return q, k, types


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, t: (q[0], k, t), r"q must have shape \[B, H_q, Q, D\]"),
        (lambda q, k, t: (q, k[:, :, :, :5], t), "k must have head dim D = 8"),
        (lambda q, k, t: (q, k[:1], t), "k must have batch size B = 2"),
        (lambda q, k, t: (q, k[:, :3], t), "must be a multiple of k's head count"),
        (lambda q, k, t: (q.double(), k.double(), t), "q must be float32, float16 or bfloat16"),
        (lambda q, k, t: (q, k.half(), t), "k must have the dtype of q"),
        (lambda q, k, t: (q, k, t.long()), "token_type must be int8"),
        (lambda q, k, t: (q, k, t[:, :5]), r"token_type must have shape \[B, L\]"),
        (
            lambda q, k, t: (q, k.transpose(2, 3).contiguous().transpose(2, 3), t),
            "k must be contiguous in its last dimension",
        ),
        (
            lambda q, k, t: (q, k, t.clone().fill_(4)),
            r"token_type\[0, 0\] = 4 is outside \[-1, num_types\)",
        ),
        (lambda q, k, t: (q.expand(B, H, L + 1, D), k, t), "query rows but k has only L"),
    ],
)
def test_attention_stats_bad_input(args, mutate, match):
    with pytest.raises(RuntimeError, match=match):
        dyrate_ext.attention_stats(*mutate(*args))


def test_num_types_out_of_range(args):
    with pytest.raises(RuntimeError, match="num_types must be in"):
        dyrate_ext.attention_stats(*args, num_types=0)


def test_from_probs_bad_input(gen):
    types = random_token_type(B, L, gen)
    with pytest.raises(RuntimeError, match=r"probs must have shape \[B, H, Q, L\]"):
        dyrate_ext.attention_stats_from_probs(torch.rand(B, L), types)
    with pytest.raises(RuntimeError, match="token_type must have shape"):
        dyrate_ext.attention_stats_from_probs(torch.rand(B, H, Q, L + 1), types)
    with pytest.raises(RuntimeError, match="probs must be float32"):
        dyrate_ext.attention_stats_from_probs(torch.ones(B, H, Q, L, dtype=torch.int32), types)


def test_select_keep_bad_input(gen):
    types = random_token_type(B, L, gen)
    score = torch.rand(B, L, generator=gen)
    with pytest.raises(RuntimeError, match=r"keep_count\[1\] = -3 is negative"):
        dyrate_ext.select_keep(score, types, torch.tensor([2, -3]))
    with pytest.raises(ValueError, match="keep_count must be >= 0"):
        dyrate_ext.select_keep(score, types, -1)
    with pytest.raises(RuntimeError, match="token_score must be float32"):
        dyrate_ext.select_keep(score.double(), types, 2)
    with pytest.raises(RuntimeError, match=r"keep_count must have shape \[B\]"):
        dyrate_ext.select_keep(score, types, torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="keep_count must be int64"):
        dyrate_ext.select_keep(score, types, torch.tensor([1, 2], dtype=torch.int32))


def compact_setup(gen):
    types = random_token_type(B, L, gen)
    idx, n = dyrate_ext.select_keep(torch.rand(B, L, generator=gen), types, 1)
    x = randn((B, H, L, D), gen)
    y = randn((B, H, L, D), gen)
    return x, y, idx, n


@pytest.mark.parametrize(
    "case,match",
    [
        ("wrong_l", r"tensors\[1\] must have B = 2 and L = 12"),
        ("rank", r"tensors\[1\] must have shape \[B, H, L, D\]"),
        ("last_dim", r"tensors\[1\] must be contiguous in its last dimension"),
        ("duplicate", r"tensors\[1\] is the same memory as tensors\[0\]"),
        ("descending", r"keep_index\[0, 1\] = .* strictly ascending"),
        ("too_long", r"new_length\[0\] = 13 is outside \[0, L\]"),
        ("index_dtype", "keep_index must be int64"),
    ],
)
def test_compact_bad_input_writes_nothing(gen, case, match):
    x, y, idx, n = compact_setup(gen)
    bad = y
    if case == "wrong_l":
        bad = randn((B, H, L + 1, D), gen)
    elif case == "rank":
        bad = y[0]
    elif case == "last_dim":
        bad = y.transpose(2, 3).contiguous().transpose(2, 3)
    elif case == "duplicate":
        bad = x
    elif case == "descending":
        idx = idx.clone()
        idx[0, :2] = torch.tensor([5, 3])
        n = n.clone().clamp(min=2)
    elif case == "too_long":
        n = n.clone()
        n[0] = L + 1
    elif case == "index_dtype":
        idx = idx.int()
    before = x.clone(), bad.clone()
    with pytest.raises(RuntimeError, match=match):
        dyrate_ext.compact_([x, bad], idx, n)
    assert torch.equal(x, before[0]) and torch.equal(bad, before[1])


def test_compact_token_type_bad_input(gen):
    _, _, idx, n = compact_setup(gen)
    types = random_token_type(B, L + 2, gen)
    before = types.clone()
    with pytest.raises(RuntimeError, match="token_type must have shape"):
        dyrate_ext.compact_token_type_(types, idx, n)
    assert torch.equal(types, before)


def test_check_token_type_helper(gen):
    types = random_token_type(B, L, gen)
    dyrate_ext.check_token_type(types)
    types[1, 3] = 9
    with pytest.raises(ValueError, match=r"token_type\[1, 3\] = 9"):
        dyrate_ext.check_token_type(types)
