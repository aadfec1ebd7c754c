"""torch.library.opcheck on every op on CPU and CUDA tensors, and a torch.compile(fullgraph=True)
function using them."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext import _ext
from dyrate_ext.testing import cuda_ready, randn, random_token_type

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not cuda_ready(), reason="needs a GPU")],
    ),
]


def op_samples(gen, device="cpu"):
    def to(t):
        return t.to(device)

    q = to(randn((2, 4, 2, 8), gen))
    k = to(randn((2, 2, 16, 8), gen))
    types = random_token_type(2, 16, gen)
    probs = to(torch.rand(2, 4, 2, 16, generator=gen))
    score = torch.rand(2, 16, generator=gen)
    counts = torch.tensor([2, 5])
    idx, n = (to(x) for x in dyrate_ext.select_keep(score, types, counts))
    cache = [to(randn((2, 2, 16, 8), gen)), to(randn((2, 3, 16, 5), gen, torch.bfloat16))]
    types, score, counts = to(types), to(score), to(counts)
    table = to(torch.tensor([[3, 0, 5, 1], [2, 6, 4, 7]], dtype=torch.int32))
    paged = [to(randn((8, 5, 2, 4), gen)), to(randn((8, 3, 4, 5), gen, torch.bfloat16))]
    return {
        "attention_stats": (q, k, types, 0.3, 4, True),
        "attention_stats_from_probs": (probs, types, 4),
        "select_keep": (score, types, counts, 1),
        "compact_": (cache, idx, n),
        "compact_token_type_": (types.clone(), idx, n),
        "compact_paged_": (paged, ["NHD", "HDN"], table, idx, n),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", _ext.OP_NAMES)
def test_opcheck(name, device, gen):
    args = op_samples(gen, device)[name]
    torch.library.opcheck(getattr(torch.ops.dyrate, name), args)


def test_torch_compile_fullgraph(gen):
    def step(q, k, v, types, keep):
        mass, score = torch.ops.dyrate.attention_stats(q, k, types, 0.25, 4, True)
        idx, n = torch.ops.dyrate.select_keep(score, types, keep, 1)
        torch.ops.dyrate.compact_([k, v], idx, n)
        torch.ops.dyrate.compact_token_type_(types, idx, n)
        return mass.sum(-1), n

    compiled = torch.compile(step, fullgraph=True)
    q = randn((2, 4, 1, 16), gen)
    k = randn((2, 4, 40, 16), gen)
    v = randn((2, 4, 40, 16), gen)
    types = random_token_type(2, 40, gen)
    keep = torch.tensor([3, 1])
    eager_args = (q, k.clone(), v.clone(), types.clone(), keep)
    comp_args = (q, k.clone(), v.clone(), types.clone(), keep)
    out_e = step(*eager_args)
    out_c = compiled(*comp_args)
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager_args[1:4], comp_args[1:4]):
        assert torch.equal(a, b), "in-place effects differ under torch.compile"
