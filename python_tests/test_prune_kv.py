"""prune_kv end to end against a composition of reference ops."""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import LlavaShape, llava_token_type, make_kv_cache, make_query

SHAPE = LlavaShape(
    layers=3, heads=8, kv_heads=4, head_dim=16, system=5, image=64, instruction=7, response=4
)


def setup_case(gen, batch=3, dtype=torch.float32):
    types = llava_token_type(batch, SHAPE, left_pad=[0, 3, 11][:batch])
    cache = make_kv_cache(batch, SHAPE, SHAPE.layers, gen, dtype)
    q = make_query(batch, SHAPE, gen, dtype=dtype)
    return types, cache, q


def expected_after(types, cache, q, counts):
    _, score = ref.attention_stats(q.double(), cache[0][0].double(), types, SHAPE.head_dim**-0.5)
    idx, n = ref.select_keep(score.float(), types, counts)
    return (
        [(ref.compact(k, idx, n), ref.compact(v, idx, n)) for k, v in cache],
        ref.compact_token_type(types, idx, n),
        n,
    )


@pytest.mark.parametrize("rate", [0.0, 0.3, [0.5, 0.1, 1.0], "tensor"])
def test_rate_forms(rate, gen):
    types, cache, q = setup_case(gen)
    if rate == "tensor":
        rate = torch.tensor([0.25, 0.75, 0.5])
    counts = ref.keep_count_from_rate(
        types, rate if not isinstance(rate, list) else torch.tensor(rate)
    )
    exp_cache, exp_types, exp_n = expected_after(types, cache, q, counts)
    res = dyrate_ext.prune_kv(cache, types, query=q, key=cache[0][0].clone(), rate=rate)
    assert torch.equal(res.new_length, exp_n)
    assert res.length == int(exp_n.max())
    assert res.type_mass.shape == (3, SHAPE.heads, 4)
    assert torch.equal(res.token_type, exp_types[:, : res.length])
    for (k, v), (ek, ev) in zip(res.layers, exp_cache):
        assert k.shape[2] == res.length
        assert torch.equal(k, ek[:, :, : res.length]) and torch.equal(v, ev[:, :, : res.length])


def test_keep_count_and_no_narrow_views_share_storage(gen):
    types, cache, q = setup_case(gen, batch=2)
    res = dyrate_ext.prune_kv(
        cache, types, query=q, key=cache[0][0].clone(), keep_count=[10, 0], narrow=False
    )
    assert res.length is None
    assert res.layers[0][0] is cache[0][0] and res.token_type is types
    image_left = ((types == 1).sum(1)).tolist()
    assert image_left == [10, 0]


def test_probs_and_token_score_sources(gen):
    types, cache, _ = setup_case(gen, batch=2)
    probs = torch.rand(2, 4, 2, SHAPE.length, generator=gen)
    _, score = ref.stats_from_probs(probs.double(), types)
    idx, n = ref.select_keep(score.float(), types, torch.tensor([7, 9]))
    flat = [t.clone() for t in cache[1]]
    res = dyrate_ext.prune_kv([flat[0], flat[1]], types.clone(), probs=probs, keep_count=[7, 9])
    assert torch.equal(res.new_length, n)
    assert torch.equal(res.layers[0], ref.compact(cache[1][0], idx, n)[:, :, : res.length])
    res2 = dyrate_ext.prune_kv(
        [cache[1][0].clone()], types.clone(), token_score=score.float(), keep_count=[7, 9]
    )
    assert torch.equal(res2.keep_index, idx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_cache(dtype, gen):
    types, cache, q = setup_case(gen, dtype=dtype)
    before = [t.clone() for t in cache[2]]
    res = dyrate_ext.prune_kv([cache[2]], types, query=q, key=cache[0][0], rate=0.5)
    for out, old in zip(res.layers[0], before):
        assert torch.equal(
            out, ref.compact(old, res.keep_index, res.new_length)[:, :, : res.length]
        )


def test_bad_arguments_leave_everything_untouched(gen):
    types, cache, q = setup_case(gen, batch=2)
    snapshot = [t.clone() for pair in cache for t in pair], types.clone()
    bad_layer = torch.randn(2, 4, SHAPE.length + 1, SHAPE.head_dim)
    with pytest.raises(RuntimeError, match=r"tensors\[6\]"):
        dyrate_ext.prune_kv([*cache, bad_layer], types, query=q, key=cache[0][0], rate=0.5)
    with pytest.raises(ValueError, match="rate"):
        dyrate_ext.prune_kv(cache, types, query=q, key=cache[0][0], rate=1.5)
    with pytest.raises(ValueError, match="keep_count"):
        dyrate_ext.prune_kv(cache, types, query=q, key=cache[0][0], keep_count=-1)
    with pytest.raises(ValueError, match="exactly one of rate and keep_count"):
        dyrate_ext.prune_kv(cache, types, query=q, key=cache[0][0])
    with pytest.raises(ValueError, match="score source"):
        dyrate_ext.prune_kv(cache, types, rate=0.5)
    with pytest.raises(TypeError, match=r"layers\[0\]"):
        dyrate_ext.prune_kv(["x"], types, query=q, key=cache[0][0], rate=0.5)
    flat = [t for pair in cache for t in pair]
    assert all(torch.equal(a, b) for a, b in zip(flat, snapshot[0]))
    assert torch.equal(types, snapshot[1])


@pytest.mark.parametrize(
    "amount",
    [{"rate": [0.5, 0.1, 1.0]}, {"rate": (0.2, 0.0, 0.7)}, {"keep_count": [3, 0, 40]}],
)
def test_list_forms_under_capture_copy_nothing_from_the_host(amount, gen, monkeypatch):
    """Under CUDA-graph capture a list-valued rate or keep_count must not be copied from
    pageable host memory: prune_kv builds it with fill kernels instead. The capture state is
    faked here (the decision is the same code on every device); the real capture + replays run
    in test_cuda_ops.py."""
    from dyrate_ext import ops

    types, cache, q = setup_case(gen)
    expected_cache = [(k.clone(), v.clone()) for k, v in cache]
    expected_types = types.clone()
    key = cache[0][0].clone()
    eager = dyrate_ext.prune_kv(expected_cache, expected_types, query=q, key=key, **amount)

    def no_host_copy(*args, **kwargs):
        raise AssertionError("torch.tensor (a host buffer) used under capture")

    monkeypatch.setattr(ops, "_capturing", lambda device: True)
    monkeypatch.setattr(ops.torch, "tensor", no_host_copy)
    res = dyrate_ext.prune_kv(cache, types, query=q, key=key, **amount)
    monkeypatch.undo()
    assert torch.equal(res.new_length, eager.new_length)
    assert torch.equal(res.keep_index, eager.keep_index)
    assert torch.equal(types, expected_types)
    for (k, v), (ek, ev) in zip(cache, expected_cache):
        assert torch.equal(k, ek) and torch.equal(v, ev)


def test_capture_state_is_false_off_cuda():
    from dyrate_ext import ops

    assert ops._capturing(torch.device("cpu")) is False
