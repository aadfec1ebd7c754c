"""The fake kernels check shapes and dtypes like csrc/checks.cpp: the same bad input fails with
the same message eagerly and while torch.compile traces (on fake tensors)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dyrate_ext

B, H, L, D = 2, 4, 9, 8


def _types(b: int = B, length: int = L) -> torch.Tensor:
    return torch.randint(0, 4, (b, length), dtype=torch.int8)


def _cases():
    q, k = torch.randn(B, H, 1, D), torch.randn(B, 2, L, D)
    stats = torch.ops.dyrate.attention_stats
    yield "head dim", stats, (q, torch.randn(B, 2, L, D + 1), _types(), 0.5, 4, True)
    yield "multiple of", stats, (q, torch.randn(B, 3, L, D), _types(), 0.5, 4, True)
    yield "must be int8", stats, (q, k, _types().long(), 0.5, 4, True)
    yield r"token_type must have shape \[B, L\]", stats, (q, k, _types(length=L + 1), 0.5, 4, True)
    yield "num_types must be in", stats, (q, k, _types(), 0.5, 0, True)
    yield "dtype of q", stats, (q, k.half(), _types(), 0.5, 4, True)
    probs = torch.rand(B, H, 1, L)
    yield (
        r"token_type must have shape \[B, L\]",
        torch.ops.dyrate.attention_stats_from_probs,
        (probs, _types(length=L - 1), 4),
    )
    score = torch.rand(B, L)
    select = torch.ops.dyrate.select_keep
    yield "token_score must be float32", select, (score.double(), _types(), torch.ones(B).long(), 1)
    yield (
        r"keep_count must have shape \[B\]",
        select,
        (score, _types(), torch.ones(B + 1).long(), 1),
    )
    idx = torch.arange(L).expand(B, L).contiguous()
    n = torch.full((B,), L)
    compact = torch.ops.dyrate.compact_
    yield "must have B = 2 and L = 9", compact, ([torch.randn(B, 2, L + 1, D)], idx, n)
    yield r"new_length must have shape \[B\]", compact, ([torch.randn(B, 2, L, D)], idx, n[:1])
    yield (
        r"token_type must have shape \[B, L\]",
        torch.ops.dyrate.compact_token_type_,
        (_types(length=L + 2), idx, n),
    )


CASES = list(_cases())


def _fake(mode: FakeTensorMode, x):
    if isinstance(x, torch.Tensor):
        return mode.from_tensor(x)
    if isinstance(x, list):
        return [_fake(mode, t) for t in x]
    return x


@pytest.mark.parametrize(("match", "op", "args"), CASES, ids=[c[0] for c in CASES])
def test_fake_kernel_raises_like_the_eager_op(match, op, args):
    with pytest.raises(RuntimeError, match=match):
        op(*args)
    mode = FakeTensorMode()
    fake_args = [_fake(mode, a) for a in args]
    with mode, pytest.raises(RuntimeError, match=match):
        op(*fake_args)


def test_compile_surfaces_a_shape_mismatch():
    q, k = torch.randn(B, H, 1, D), torch.randn(B, 2, L, D + 1)

    @torch.compile(backend="eager", fullgraph=True)
    def f(q, k, t):
        return dyrate_ext.attention_stats(q, k, t, 0.5)

    with pytest.raises(Exception, match="head dim"):
        f(q, k, _types())
