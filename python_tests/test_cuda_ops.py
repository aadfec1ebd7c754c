"""The CUDA kernels on a real GPU: parity with the CPU kernels and the float64 reference,
awkward shapes, determinism, unwritten outputs, misaligned inputs, prune_kv end to end and in
a CUDA graph. Skipped cleanly without a CUDA device or without a CUDA build of dyrate_ext.

Tolerances (DESIGN.md): float32 within ~1e-5 relative of the float64 reference; half types
within twice the error of eager PyTorch computing the same thing in that dtype (the reference
run in the dtype, on the GPU), plus a small floor. CUDA and CPU kernels both accumulate in
float32 from the same inputs, so they must also agree to ~1e-5 relative.

DYRATE_TEST_DEVICE=cpu runs the same tests on the CPU kernels (the "GPU" side then is the CPU
backend). That proves nothing about the CUDA code; it checks the test logic itself on machines
without a GPU. CUDA-only behaviour (graphs, no host sync, kernels that skip value checks) is
skipped then.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_close_to_reference

import dyrate_ext
from dyrate_ext import reference as ref
from dyrate_ext.testing import (
    LlavaShape,
    llava_token_type,
    make_kv_cache,
    make_query,
    randn,
    random_token_type,
    special_scores,
)

DEVICE = os.environ.get("DYRATE_TEST_DEVICE", "cuda")
DRY_RUN = DEVICE == "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_ready() -> bool:
    return (
        torch.cuda.is_available()
        and dyrate_ext.extension_available()
        and dyrate_ext.has_kernel("attention_stats", "CUDA")
    )


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not DRY_RUN and not _cuda_ready(),
        reason="needs a CUDA device and dyrate_ext built with its CUDA kernels",
    ),
]
cuda_only = pytest.mark.skipif(DRY_RUN, reason="CUDA-only behaviour")


def dev(t: torch.Tensor) -> torch.Tensor:
    """A copy on the test device (a copy also in the dry run, so in-place ops never touch the
    CPU-side originals the results are compared with)."""
    return t.to(DEVICE, copy=True)


def poison_allocator(specs: list[tuple[int, torch.dtype]]) -> None:
    """Best effort at catching unwritten outputs: leave freed caching-allocator blocks of the
    outputs' sizes full of NaN (float) or -7 (integer), so that an op's torch.empty likely
    gets one of them back and any element the kernels skip stays visibly wrong."""
    if DRY_RUN:
        return
    junk = []
    for numel, dtype in specs:
        fill = float("nan") if dtype.is_floating_point else -7
        junk += [torch.full((max(numel, 1),), fill, dtype=dtype, device=DEVICE) for _ in range(4)]
    del junk


# ---------------------------------------------------------------------------------------------
# attention_stats
# ---------------------------------------------------------------------------------------------

# (B, H_q, H_kv, Q, L, D, causal): B=1, odd L and D, GQA, Q > 1 causal, Q > 8 (pass 2
# recomputes q.k), Q == L, LLaVA-1.5-7B decode.
STATS_SHAPES = [
    (1, 1, 1, 1, 1, 1, True),
    (1, 4, 4, 1, 7, 7, True),
    (2, 8, 2, 3, 33, 64, True),
    (3, 6, 3, 5, 129, 80, False),
    (2, 4, 1, 7, 7, 128, True),
    (1, 32, 8, 1, 650, 128, True),
    (2, 8, 4, 9, 129, 7, True),
    (1, 4, 2, 33, 33, 64, True),
    (1, 8, 8, 650, 650, 64, True),
    (2, 32, 32, 1, 650, 128, True),
]


def check_stats(q, k, types, scale, causal, num_types=4):
    dtype = q.dtype
    b, hq, _, _ = q.shape
    length = k.shape[2]
    poison_allocator([(b * hq * num_types, torch.float32), (b * length, torch.float32)])
    mass, score = dyrate_ext.attention_stats(q, k, types, scale, num_types, causal)
    assert mass.device == q.device and score.device == q.device
    assert mass.dtype == torch.float32 and score.dtype == torch.float32
    assert mass.shape == (b, hq, num_types) and score.shape == (b, length)
    qc, kc, tc = q.cpu(), k.cpu(), types.cpu()
    cpu_mass, cpu_score = dyrate_ext.attention_stats(qc, kc, tc, scale, num_types, causal)
    mass64, score64 = ref.attention_stats(qc.double(), kc.double(), tc, scale, num_types, causal)
    eager = (None, None)
    if dtype != torch.float32:
        eager = tuple(x.cpu() for x in ref.attention_stats(q, k, types, scale, num_types, causal))
    mass, score = mass.cpu(), score.cpu()
    assert_close_to_reference(mass, mass64, eager[0], dtype, "type_mass")
    assert_close_to_reference(score, score64, eager[1], dtype, "token_score")
    torch.testing.assert_close(mass, cpu_mass, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(score, cpu_score, atol=2e-6, rtol=1e-5)
    never = ~ref.allowed_mask(tc, q.shape[2], causal).any(dim=1)
    assert (score[never] == 0).all(), "slots never allowed must score exactly 0"
    return mass, score


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STATS_SHAPES)
def test_attention_stats_matches_cpu_and_reference(shape, dtype, gen):
    b, hq, hkv, qn, length, d, causal = shape
    q = dev(randn((b, hq, qn, d), gen, dtype))
    k = dev(randn((b, hkv, length, d), gen, dtype))
    types = dev(random_token_type(b, length, gen, p_empty=0.1))
    check_stats(q, k, types, d**-0.5, causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_stats_long_cache(dtype, gen):
    """B = 8, L = 4096, the benchmark's long-context case."""
    q = dev(randn((8, 32, 1, 128), gen, dtype))
    k = dev(randn((8, 32, 4096, 128), gen, dtype))
    types = dev(random_token_type(8, 4096, gen, p_empty=0.05))
    check_stats(q, k, types, 128**-0.5, True)


def test_attention_stats_empty_slots_and_rows(gen):
    q = dev(randn((3, 4, 3, 16), gen))
    k = dev(randn((3, 2, 20, 16), gen))
    types = random_token_type(3, 20, gen, p_empty=0.0)
    types[1] = -1  # a sample with no slot at all
    types[0, :18] = -1  # row 0 of sample 0 sees only empty slots
    types = dev(types)
    mass, score = check_stats(q, k, types, 0.25, True)
    assert (mass[1] == 0).all() and (score[1] == 0).all()


def test_attention_stats_many_types(gen):
    q = dev(randn((2, 4, 2, 32), gen))
    k = dev(randn((2, 4, 77, 32), gen))
    types = dev(random_token_type(2, 77, gen, 0.1, num_types=13))
    check_stats(q, k, types, 0.2, False, num_types=13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_stats_misaligned_and_strided(dtype, gen):
    """A key slice whose rows are not 16-byte aligned (scalar loads) and strided queries."""
    big_k = dev(randn((2, 3, 70, 130), gen, dtype))
    k = big_k[:, 1:3, 3:68, 1:129]
    assert k.data_ptr() % 16 != 0
    q = dev(randn((2, 5, 4, 128), gen, dtype)).transpose(1, 2)[:, :4]
    types = dev(random_token_type(2, 65, gen, 0.1))
    check_stats(q, k, types, 128**-0.5, True)


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


@cuda_only
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
# attention_stats_from_probs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 33), (3, 32, 1, 650), (1, 4, 7, 129)])
def test_stats_from_probs(shape, dtype, gen):
    b, h, qn, length = shape
    probs = torch.softmax(torch.randn(b, h, qn, length, generator=gen), -1).to(dtype)
    types = random_token_type(b, length, gen, 0.1)
    poison_allocator([(b * h * 4, torch.float32), (b * length, torch.float32)])
    mass, score = dyrate_ext.attention_stats_from_probs(dev(probs), dev(types))
    cpu_mass, cpu_score = dyrate_ext.attention_stats_from_probs(probs, types)
    mass64, score64 = ref.stats_from_probs(probs.double(), types)
    mass, score = mass.cpu(), score.cpu()
    assert torch.isfinite(mass).all() and torch.isfinite(score).all()
    torch.testing.assert_close(mass.double(), mass64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(score.double(), score64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass, cpu_mass, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(score, cpu_score, atol=1e-6, rtol=1e-5)


def test_stats_from_probs_strided(gen):
    probs = torch.rand(3, 4, 6, 40, generator=gen)
    types = random_token_type(3, 40, gen, 0.2)
    out = dyrate_ext.attention_stats_from_probs(dev(probs).transpose(1, 2), dev(types))
    cpu = dyrate_ext.attention_stats_from_probs(probs.transpose(1, 2), types)
    torch.testing.assert_close(out[0].cpu(), cpu[0])
    torch.testing.assert_close(out[1].cpu(), cpu[1])


# ---------------------------------------------------------------------------------------------
# select_keep
# ---------------------------------------------------------------------------------------------


def check_select(score, types, counts, target=1, with_reference=True):
    b, length = score.shape
    poison_allocator([(b * length, torch.int64), (b, torch.int64)])
    idx, n = dyrate_ext.select_keep(dev(score), dev(types), dev(counts), target)
    assert idx.device.type == DEVICE and idx.dtype == torch.int64 and idx.shape == (b, length)
    idx, n = idx.cpu(), n.cpu()
    cpu_idx, cpu_n = dyrate_ext.select_keep(score, types, counts, target)
    assert torch.equal(n, cpu_n) and torch.equal(idx, cpu_idx)
    if with_reference and not score.isnan().any():  # the reference's sort has no order for NaN
        ref_idx, ref_n = ref.select_keep(score, types, counts, target)
        assert torch.equal(n, ref_n) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("b,length", [(1, 1), (1, 7), (3, 33), (2, 650), (4, 129), (1, 5000)])
def test_select_keep(b, length, ties, gen):
    types = random_token_type(b, length, gen, 0.1)
    score = torch.rand(b, length, generator=gen)
    if ties:
        score = (score * 4).floor() / 4
    n_img = (types == 1).sum(1)
    for counts in (
        torch.zeros(b, dtype=torch.long),  # keep none
        n_img,  # keep all
        n_img + 7,  # more than available
        (n_img.float() * torch.rand(b, generator=gen)).long(),
        torch.minimum(n_img, torch.ones(b, dtype=torch.long)),
    ):
        check_select(score, types, counts)


def test_select_keep_special_values(gen):
    """NaN ranks as -inf (ties with it), -0 ties with +0, infinities and subnormals order."""
    length = 64
    score, types = special_scores(gen, length)
    for keep in range(0, length - 2):
        check_select(score, types, torch.tensor([keep, length - 3 - keep]))


@pytest.mark.parametrize("b", [1, 3])
def test_select_keep_32k(b, gen):
    length = 32768
    types = torch.ones(b, length, dtype=torch.int8)
    types[:, :100] = 0
    types[:, -50:] = 2
    types[-1, 1000:1500] = -1
    score = torch.randint(0, 1000, (b, length), generator=gen).float() / 7  # many ties
    for keep in (0, 1, 777, 16000, 32617, 40000):
        check_select(score, types, torch.full((b,), keep), with_reference=keep in (0, 777))


def test_select_keep_other_target_and_strided(gen):
    types = random_token_type(3, 90, gen, 0.1)
    score = torch.rand(90, 3, generator=gen).t()  # stride (1, 3)
    check_select(score, types, torch.tensor([5, 0, 100]), target=2)
    check_select(score, types, torch.tensor([3, 7, 11]), target=9)  # no slot of type 9


@cuda_only
def test_select_keep_negative_count_is_zero_on_cuda(gen):
    """No host sync on CUDA, so a negative keep_count is not an error there: it keeps none."""
    types = random_token_type(2, 40, gen, 0.1)
    score = torch.rand(2, 40, generator=gen)
    idx, n = dyrate_ext.select_keep(dev(score), dev(types), dev(torch.tensor([-3, 2])))
    ref_idx, ref_n = ref.select_keep(score, types, torch.tensor([0, 2]))
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(n.cpu(), ref_n)


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


def random_plan(types, gen, device=DEVICE):
    score = torch.rand(types.shape, generator=gen)
    n_img = (types == 1).sum(1)
    counts = (n_img.float() * torch.rand(types.shape[0], generator=gen)).long()
    idx, n = dyrate_ext.select_keep(score, types, counts)
    return idx.to(device), n.to(device)


def random_cache(shape, gen, dtype):
    if dtype.is_floating_point:
        return randn(shape, gen, dtype)
    return torch.randint(-100, 100, shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8]
)
@pytest.mark.parametrize(
    "b,h,length,d",
    [(1, 1, 1, 1), (2, 3, 37, 7), (3, 4, 129, 128), (1, 32, 650, 128), (2, 2, 1000, 80)],
)
def test_compact_matches_reference(b, h, length, d, dtype, gen):
    types = random_token_type(b, length, gen, p_empty=0.1)
    idx, n = random_plan(types, gen)
    x = dev(random_cache((b, h, length, d), gen, dtype))
    expected = ref.compact(x.cpu(), idx.cpu(), n.cpu())
    dyrate_ext.compact_([x], idx, n)
    assert torch.equal(x.cpu(), expected)  # includes the tail, which keeps its old contents


def test_compact_keep_none_all_and_identity(gen):
    types = random_token_type(2, 60, gen, 0.1)
    x = dev(randn((2, 3, 60, 16), gen))
    before = x.clone()
    for counts in (torch.zeros(2, dtype=torch.long), (types == 1).sum(1)):
        idx, n = dyrate_ext.select_keep(torch.rand(2, 60, generator=gen), types, counts)
        y = before.clone()
        dyrate_ext.compact_([y], dev(idx), dev(n))
        assert torch.equal(y.cpu(), ref.compact(before.cpu(), idx, n))
    # keep_index == arange: nothing moves
    idx = dev(torch.arange(60).repeat(2, 1))
    dyrate_ext.compact_([x], idx, dev(torch.tensor([60, 60])))
    assert torch.equal(x, before)


def test_compact_strided_misaligned_and_many_tensors(gen):
    """Every copy width (16 down to 1 byte), views of larger buffers, and more tensors than one
    launch's table holds (64), in one call."""
    types = random_token_type(2, 70, gen)
    idx, n = random_plan(types, gen)
    big = dev(randn((2, 6, 70, 24), gen))
    other = dev(randn((2, 3, 70, 24), gen))
    tensors = [
        big[:, 1:5, :, 4:20],  # 16-byte words, strided
        other[:, :, :, 1:23],  # 4-byte words, misaligned by one float
        dev(randn((2, 3, 70, 9), gen, torch.float16)),  # 2-byte words
        dev(random_cache((2, 2, 70, 5), gen, torch.int8)),  # bytes
        dev(randn((2, 2, 70, 4), gen, torch.float16)),  # 8-byte rows
    ]
    tensors += [dev(randn((2, 1 + i % 3, 70, 8), gen, torch.bfloat16)) for i in range(70)]
    big_before = big.clone()
    expected = [ref.compact(t.cpu(), idx.cpu(), n.cpu()) for t in tensors]
    dyrate_ext.compact_(tensors, idx, n)
    for t, e in zip(tensors, expected):
        assert torch.equal(t.cpu(), e)
    assert torch.equal(big[:, 0], big_before[:, 0]) and torch.equal(big[:, 5], big_before[:, 5])
    assert torch.equal(big[..., :4], big_before[..., :4])


@cuda_only
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


@pytest.mark.parametrize("b,length", [(1, 1), (3, 37), (2, 650), (1, 32768)])
def test_compact_token_type(b, length, gen):
    types = random_token_type(b, length, gen, p_empty=0.1)
    idx, n = random_plan(types, gen)
    expected = ref.compact_token_type(types, idx.cpu(), n.cpu())
    t = dev(types)
    strided = dev(torch.zeros(length, b, dtype=torch.int8)).t()
    strided.copy_(t)
    dyrate_ext.compact_token_type_(t, idx, n)
    dyrate_ext.compact_token_type_(strided, idx, n)
    assert torch.equal(t.cpu(), expected) and torch.equal(strided.cpu(), expected)


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


@cuda_only
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


@cuda_only
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


@cuda_only
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
# opcheck and errors on CUDA tensors
# ---------------------------------------------------------------------------------------------


def op_samples(gen):
    q = dev(randn((2, 4, 2, 8), gen))
    k = dev(randn((2, 2, 16, 8), gen))
    types = random_token_type(2, 16, gen)
    probs = dev(torch.rand(2, 4, 2, 16, generator=gen))
    score = torch.rand(2, 16, generator=gen)
    counts = torch.tensor([2, 5])
    idx, n = dyrate_ext.select_keep(score, types, counts)
    cache = [dev(randn((2, 2, 16, 8), gen)), dev(randn((2, 3, 16, 5), gen, torch.bfloat16))]
    types = dev(types)
    return {
        "attention_stats": (q, k, types, 0.3, 4, True),
        "attention_stats_from_probs": (probs, types, 4),
        "select_keep": (dev(score), types, dev(counts), 1),
        "compact_": (cache, dev(idx), dev(n)),
        "compact_token_type_": (types.clone(), dev(idx), dev(n)),
    }


@pytest.mark.parametrize("name", dyrate_ext._ext.OP_NAMES)
def test_opcheck(name, gen):
    torch.library.opcheck(getattr(torch.ops.dyrate, name), op_samples(gen)[name])


@cuda_only
def test_mixed_devices_name_the_argument(gen):
    q = dev(randn((1, 2, 1, 8), gen))
    k = dev(randn((1, 2, 5, 8), gen))
    types = random_token_type(1, 5, gen)
    with pytest.raises(RuntimeError, match="token_type must be on the same device as q"):
        dyrate_ext.attention_stats(q, k, types)
    with pytest.raises(RuntimeError, match="keep_count must be on the same device"):
        dyrate_ext.select_keep(dev(torch.rand(1, 5)), dev(types), torch.tensor([1]))
