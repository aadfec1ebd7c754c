"""What only a real GPU can show: long caches, bitwise determinism of the device kernels,
values the CUDA kernels bound instead of checking (no host sync), prune_kv end to end, without a
host sync and in a CUDA graph (capture + two replays per form of the amount), and one
LLaVA-1.5-7B decode step. Skipped cleanly without a CUDA device or a CUDA build. The op suites
(test_attention_stats.py, test_select_keep.py, test_compact.py, test_opcheck.py) run on CUDA
through the `backend` fixture; this file adds the CUDA-only cases.
"""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext.testing import (
    DTYPES,
    Backend,
    LlavaShape,
    check_attention_stats,
    check_select_keep,
    cuda_ready,
    llava_token_type,
    make_kv_cache,
    make_query,
    randn,
    random_token_type,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not cuda_ready(), reason="needs a CUDA device and dyrate_ext built with its CUDA kernels"
    ),
]
CUDA = Backend("cuda", torch.ops.dyrate)


def dev(t: torch.Tensor) -> torch.Tensor:
    """A copy on the GPU."""
    return t.to("cuda", copy=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_stats_long_cache(dtype, gen):
    """B = 8, L = 4096, the benchmark's long-context case."""
    q = randn((8, 32, 1, 128), gen, dtype)
    k = randn((8, 32, 4096, 128), gen, dtype)
    types = random_token_type(8, 4096, gen, p_empty=0.05)
    check_attention_stats(CUDA, q, k, types, 128**-0.5, True)


@pytest.mark.parametrize("shape", [(2, 32, 32, 1, 650, 128, True), (1, 8, 2, 12, 300, 64, True)])
def test_attention_stats_bitwise_deterministic(shape, gen):
    b, hq, hkv, qn, length, d, causal = shape
    q = dev(randn((b, hq, qn, d), gen, torch.float16))
    k = dev(randn((b, hkv, length, d), gen, torch.float16))
    types = dev(random_token_type(b, length, gen, 0.1))
    first = dyrate_ext.attention_stats(q, k, types, d**-0.5, 4, causal)
    for _ in range(3):
        again = dyrate_ext.attention_stats(q, k, types, d**-0.5, 4, causal)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_attention_stats_out_of_range_types_stay_in_bounds(gen):
    """CUDA skips the value check (a host sync): types outside [-1, num_types) are empty."""
    q = dev(randn((2, 4, 1, 16), gen))
    k = dev(randn((2, 4, 30, 16), gen))
    types = random_token_type(2, 30, gen, 0.0)
    bad, fixed = types.clone(), types.clone()
    bad[0, 3], bad[1, 7], bad[1, 8] = 4, 100, -9
    fixed[0, 3], fixed[1, 7], fixed[1, 8] = -1, -1, -1
    out_bad = dyrate_ext.attention_stats(q, k, dev(bad))
    out_fixed = dyrate_ext.attention_stats(q, k, dev(fixed))
    assert torch.equal(out_bad[0], out_fixed[0]) and torch.equal(out_bad[1], out_fixed[1])


# ---------------------------------------------------------------------------------------------
# select_keep
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b", [1, 3])
def test_select_keep_32k(b, gen):
    length = 32768
    types = torch.ones(b, length, dtype=torch.int8)
    types[:, :100] = 0
    types[:, -50:] = 2
    types[-1, 1000:1500] = -1
    score = torch.randint(0, 1000, (b, length), generator=gen).float() / 7  # many ties
    for keep in (0, 1, 777, 16000, 32617, 40000):
        check_select_keep(CUDA, score, types, torch.full((b,), keep))


def test_select_keep_deterministic(gen):
    types = dev(random_token_type(4, 3000, gen, 0.1))
    score = dev((torch.rand(4, 3000, generator=gen) * 50).floor())
    counts = dev(torch.tensor([10, 500, 1000, 2999]))
    first = dyrate_ext.select_keep(score, types, counts)
    for _ in range(3):
        again = dyrate_ext.select_keep(score, types, counts)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ---------------------------------------------------------------------------------------------
# compact_ and compact_token_type_
# ---------------------------------------------------------------------------------------------


def test_compact_bad_plan_values_stay_in_bounds(gen):
    """No value check on CUDA: out-of-range keep_index entries are skipped, new_length clamped."""
    x = dev(randn((2, 2, 20, 8), gen))
    before = x.clone()
    idx = torch.full((2, 20), -1, dtype=torch.long)
    idx[0, :5] = torch.tensor([0, 3, 99, 7, -4])
    idx[1] = torch.arange(20)
    n = torch.tensor([5, 1000])
    dyrate_ext.compact_([x], dev(idx), dev(n))
    torch.cuda.synchronize()
    assert torch.equal(x[0, :, 1], before[0, :, 3]) and torch.equal(x[0, :, 3], before[0, :, 7])
    assert torch.equal(x[0, :, 2], before[0, :, 2]) and torch.equal(x[1], before[1])


# ---------------------------------------------------------------------------------------------
# prune_kv
# ---------------------------------------------------------------------------------------------

SMALL = LlavaShape(
    layers=4, heads=8, kv_heads=4, head_dim=64, system=7, image=96, instruction=9, response=5
)


def llava_case(gen, batch, dtype, shape=SMALL):
    types = llava_token_type(batch, shape, left_pad=[0, 5, 17, 2][:batch])
    cache = make_kv_cache(batch, shape, shape.layers, gen, dtype)
    q = make_query(batch, shape, gen, dtype=dtype)
    return types, cache, q


def to_dev(cache):
    return [(dev(k), dev(v)) for k, v in cache]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0, "tensor"])
def test_prune_kv_matches_cpu(rate, dtype, gen):
    types, cache, q = llava_case(gen, 3, dtype)
    if rate == "tensor":
        rate = torch.tensor([0.25, 0.75, 0.5])
    key = cache[0][0].clone()
    gpu_cache, gpu_types = to_dev(cache), dev(types)
    res = dyrate_ext.prune_kv(
        gpu_cache,
        gpu_types,
        query=dev(q),
        key=dev(key),
        rate=dev(rate) if isinstance(rate, torch.Tensor) else rate,
    )
    cpu_mass, cpu_score = dyrate_ext.attention_stats(q, key, types, SMALL.head_dim**-0.5)
    torch.testing.assert_close(res.token_score.cpu(), cpu_score, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(res.type_mass.cpu(), cpu_mass, atol=2e-6, rtol=1e-5)
    # The CPU run selects on the GPU's scores, so everything after the score must be equal.
    cpu = dyrate_ext.prune_kv(cache, types, token_score=res.token_score.cpu(), rate=rate)
    assert torch.equal(res.new_length.cpu(), cpu.new_length)
    assert torch.equal(res.keep_index.cpu(), cpu.keep_index)
    assert res.length == cpu.length
    assert torch.equal(res.token_type.cpu(), cpu.token_type)
    for (kg, vg), (kc, vc) in zip(res.layers, cpu.layers):
        assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)


def _restore(dst_cache, src_cache, dst_types, src_types):
    for (kd, vd), (ks, vs) in zip(dst_cache, src_cache):
        kd.copy_(ks)
        vd.copy_(vs)
    dst_types.copy_(src_types)


@pytest.mark.parametrize(
    "amount",
    ["rate", "rate_tensor", "rate_list", "keep_count_tensor", "keep_count_int", "keep_count_list"],
)
def test_prune_kv_no_host_sync(amount, gen):
    """prune_kv(narrow=False) never waits for the device, whatever the form of the amount."""
    types, cache, q = llava_case(gen, 2, torch.float16)
    cache, types, q = to_dev(cache), dev(types), dev(q)
    key = cache[0][0].clone()
    kwargs = {
        "rate": {"rate": 0.5},
        "rate_tensor": {"rate": dev(torch.tensor([0.5, 0.3]))},
        "keep_count_tensor": {"keep_count": dev(torch.tensor([10, 50]))},
        "keep_count_int": {"keep_count": 20},
        "rate_list": {"rate": [0.5, 0.3]},
        "keep_count_list": {"keep_count": [10, 50]},
    }[amount]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dyrate_ext.prune_kv(cache, types, query=q, key=key, narrow=False, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "form", ["keep_count", "keep_count_int", "keep_count_list", "rate", "rate_list", "rate_tensor"]
)
def test_prune_kv_cuda_graph_replay_matches_eager(form, dtype, gen):
    """Every documented form of the amount captures, and two replays equal the eager call.
    Python numbers (a float, an int, lists of them) become fill kernels baked into the graph:
    a host-to-device copy of a pageable list would fail under capture or replay a freed
    buffer."""
    types0, cache0, q = llava_case(gen, 2, dtype)
    cache0, types0, q = to_dev(cache0), dev(types0), dev(q)
    key = cache0[0][0].clone()
    amount = {
        "keep_count": {
            "keep_count": dyrate_ext.keep_count_from_rate(types0, dev(torch.tensor([0.5, 0.25])))
        },
        "keep_count_int": {"keep_count": 40},
        "keep_count_list": {"keep_count": [70, 13]},
        "rate": {"rate": 0.4},
        "rate_list": {"rate": [0.3, 0.9]},
        "rate_tensor": {"rate": dev(torch.tensor([0.6, 0.1]))},
    }[form]

    eager_cache = [(k.clone(), v.clone()) for k, v in cache0]
    eager_types = types0.clone()
    eager = dyrate_ext.prune_kv(eager_cache, eager_types, query=q, key=key, narrow=False, **amount)

    cache = [(k.clone(), v.clone()) for k, v in cache0]
    types = types0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        for _ in range(2):
            _restore(cache, cache0, types, types0)
            dyrate_ext.prune_kv(cache, types, query=q, key=key, narrow=False, **amount)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = dyrate_ext.prune_kv(cache, types, query=q, key=key, narrow=False, **amount)
    for _ in range(2):
        _restore(cache, cache0, types, types0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(res.new_length, eager.new_length)
        assert torch.equal(res.keep_index, eager.keep_index)
        assert torch.equal(res.token_score, eager.token_score)
        assert torch.equal(res.type_mass, eager.type_mass)
        assert torch.equal(types, eager_types)
        for (k, v), (ke, ve) in zip(cache, eager_cache):
            assert torch.equal(k, ke) and torch.equal(v, ve)


def test_llava_7b_decode_step(gen):
    """One full-size prune_kv on LLaVA-1.5-7B shapes (31 pruned layers) against the CPU run."""
    shape = LlavaShape()
    types, cache, q = llava_case(gen, 2, torch.float16, shape)
    cache = cache[1:]
    key = make_kv_cache(2, shape, 1, gen, torch.float16)[0][0]
    res = dyrate_ext.prune_kv(to_dev(cache), dev(types), query=dev(q), key=dev(key), rate=0.5)
    cpu = dyrate_ext.prune_kv(cache, types, token_score=res.token_score.cpu(), rate=0.5)
    assert torch.equal(res.keep_index.cpu(), cpu.keep_index)
    for (kg, vg), (kc, vc) in zip(res.layers, cpu.layers):
        assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)


# ---------------------------------------------------------------------------------------------
# errors on CUDA tensors
# ---------------------------------------------------------------------------------------------


def test_mixed_devices_name_the_argument(gen):
    q = dev(randn((1, 2, 1, 8), gen))
    k = dev(randn((1, 2, 5, 8), gen))
    types = random_token_type(1, 5, gen)
    with pytest.raises(RuntimeError, match="token_type must be on the same device as q"):
        dyrate_ext.attention_stats(q, k, types)
    with pytest.raises(RuntimeError, match="keep_count must be on the same device"):
        dyrate_ext.select_keep(dev(torch.rand(1, 5)), dev(types), torch.tensor([1]))
