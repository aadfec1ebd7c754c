"""dyrate_ext.flops against hand-computed cases and against measured FLOPs of the loop.

Most cases use a 4-layer decoder with d = 8, m = 12, two heads (D = 4), where one layer of q
new tokens over L cache slots costs 2q*8*16 + 2qL*8 + 2q*8*12 = 448 q + 16 q L multiply-adds
(FastV: 4nd^2 + 2n^2d + 2ndm at q = L = n). The numbers below are worked out by hand from
that; a brute-force simulation of the per-layer caches and torch's FlopCounterMode on
`dyrate_ext.llava.generate` check the general case.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from dyrate_ext.flops import (
    LLAVA_15_7B,
    DecoderShape,
    generation_flops,
    layer_flops,
    trace_flops,
)

S = DecoderShape(num_layers=4, hidden_size=8, intermediate_size=12, num_heads=2)


def fastv(n: int, d: int, m: int) -> int:
    """FastV's per-layer formula, as printed in the FastV paper."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def test_prefill_only_is_fastv_formula():
    # n = 5: 4*5*64 + 2*25*8 + 2*5*8*12 = 1280 + 400 + 960 = 2640 per layer, 4 layers.
    assert layer_flops(S, 5, 5) == 2640 == fastv(5, 8, 12)
    c = generation_flops(S, prompt_length=5, num_image=2, kept_image=[2], k=None)
    assert c.per_step.tolist() == [[10560]]
    assert (c.prefill, c.decode, c.total) == (10560, 0, 10560)
    assert c.tflops == pytest.approx(10560e-12)
    for n in (1, 7, 600):
        assert layer_flops(S, n, n) == fastv(n, 8, 12)
        assert layer_flops(LLAVA_15_7B, n, n) == fastv(n, 4096, 11008)


def test_decode_steps_with_fixed_cache_length():
    # One token over 10 slots: 4*64 + 2*10*8 + 2*8*12 = 256 + 160 + 192 = 608.
    got = layer_flops(S, torch.ones(3, dtype=torch.int64), torch.full((3,), 10))
    assert got.tolist() == [608, 608, 608]
    # NoPrune, n = 7, three decoding steps: cache lengths 8, 9, 10.
    c = generation_flops(S, 7, 3, [3, 3, 3, 3], None)
    prefill = 4 * (1792 + 784 + 1344)  # 4 layers x (4*7*64 + 2*49*8 + 2*7*8*12)
    assert c.per_step[:, 0].tolist() == [prefill, 4 * 576, 4 * 592, 4 * 608]
    assert c.prefill == 15680 and c.decode == 4 * (576 + 592 + 608)


def test_grouped_query_attention():
    # H = 4, H_kv = 1, D = 2: q, o 2*q*8*8; k, v 2*q*8*2; attention 2*q*L*8; MLP 2*q*8*12.
    g = DecoderShape(num_layers=2, hidden_size=8, intermediate_size=12, num_heads=4, num_kv_heads=1)
    assert (g.q_dim, g.kv_dim) == (8, 2)
    assert layer_flops(g, 5, 5) == 640 + 160 + 400 + 960
    c = generation_flops(g, 5, 1, [1, 1], None)
    assert c.per_step[:, 0].tolist() == [2 * 2160, 2 * (128 + 32 + 2 * 6 * 8 + 192)]
    # A head size other than d / H: d_q = 4 * 4 = 16, d_kv = 2 * 4 = 8.
    h = DecoderShape(2, 8, 12, num_heads=4, num_kv_heads=2, head_dim=4)
    assert layer_flops(h, 1, 6) == 2 * 8 * (16 + 8) + 2 * 6 * 16 + 2 * 8 * 12
    # Three MLP matrices (gated MLP) add one n*d*m.
    gated = DecoderShape(4, 8, 12, 2, mlp_matrices=3)
    assert layer_flops(gated, 5, 5) == fastv(5, 8, 12) + 5 * 8 * 12


def test_fastv_removes_tokens_from_layer_k():
    # n = 10 prompt tokens with 6 image tokens; k = 2 keeps 3 -> layers 2, 3 see n' = 7.
    c = generation_flops(S, 10, 6, [3, 3], k=2)
    full10 = fastv(10, 8, 12)  # 6080
    full7 = fastv(7, 8, 12)  # 3920
    assert (full10, full7) == (6080, 3920)
    # step 1: layers 0, 1 over 11 slots (624 each), layers 2, 3 over 7 + 1 = 8 (576 each).
    assert c.per_step[:, 0].tolist() == [2 * 6080 + 2 * 3920, 2 * 624 + 2 * 576]
    base = generation_flops(S, 10, 6, [6, 6], None)
    assert base.total == 4 * 6080 + 4 * 624
    assert c.percent_of(base) == pytest.approx(100 * 22400 / 26816)


def test_vtw_removes_every_image_token():
    # k = 3 of 4: layer 3 sees the 4 text tokens only; at step 1, 4 + 1 slots.
    c = generation_flops(S, 10, 6, [0, 0], k=3)
    assert c.per_step[:, 0].tolist() == [3 * 6080 + fastv(4, 8, 12), 3 * 624 + 528]
    assert fastv(4, 8, 12) == 2048


def test_dynamic_trace_with_shrinking_keep_counts():
    # k = 1; kept 6 -> 4 -> 4 -> 1 -> 0: layers 1..3 over n - removed + t slots.
    c = generation_flops(S, 10, 6, [6, 4, 4, 1, 0], k=1)
    expected = [
        4 * 6080,  # prefill: nothing removed yet
        624 + 3 * 592,  # t=1: full 11 slots; pruned 10 - 2 + 1 = 9
        640 + 3 * 608,  # t=2: full 12; pruned 10 - 2 + 2 = 10
        656 + 3 * 576,  # t=3: full 13; pruned 10 - 5 + 3 = 8
        672 + 3 * 576,  # t=4: full 14; pruned 10 - 6 + 4 = 8
    ]
    assert c.per_step[:, 0].tolist() == expected
    assert c.decode == sum(expected[1:]) and c.prefill == expected[0]


def simulate(shape: DecoderShape, n: int, images: int, kept: list[int], k: int | None) -> list[int]:
    """Brute force: walk the layers keeping each layer's cache size, removing image slots from
    layers >= k before the step's token runs there, and add up every matmul's multiply-adds."""
    d, m, dq, dkv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    first = shape.num_layers if k is None else k
    cache = [0] * shape.num_layers
    removed = [0] * shape.num_layers
    out = []
    for t, keep in enumerate(kept):
        gone = images - keep
        total = 0
        for layer in range(shape.num_layers):
            pruned = layer >= first
            if t == 0:
                new = n - gone if pruned else n
            else:
                new = 1
                if pruned:
                    cache[layer] -= gone - removed[layer]
            if pruned:
                removed[layer] = gone
            cache[layer] += new
            total += new * d * dq  # q projection
            total += 2 * new * d * dkv  # k and v projections
            total += 2 * new * cache[layer] * dq  # q k^T and p v over the layer's cache
            total += new * dq * d  # o projection
            total += shape.mlp_matrices * new * d * m
        out.append(total)
    return out


def random_schedules(seed: int, count: int = 20) -> Iterator[tuple[int, int, list[int], int]]:
    """`count` random generations (n, images, kept, k) for a 6-layer decoder: 20 <= n < 60,
    1 <= images < n, 1 to 8 steps whose kept counts never grow, 1 <= k <= 5 (also test_costs)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        n = int(torch.randint(20, 60, (1,), generator=gen))
        images = int(torch.randint(1, n, (1,), generator=gen))
        steps = int(torch.randint(1, 9, (1,), generator=gen))
        drops = torch.randint(0, 3, (steps,), generator=gen).cumsum(0)
        kept = (images - drops).clamp(min=0).tolist()
        yield n, images, kept, int(torch.randint(1, 6, (1,), generator=gen))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_random_schedules_match_brute_force(kv_heads):
    shape = DecoderShape(6, 16, 40, num_heads=4, num_kv_heads=kv_heads, mlp_matrices=3)
    for n, images, kept, k in random_schedules(kv_heads):
        for first in (k, None):
            got = generation_flops(shape, n, images, kept, first).per_step[:, 0].tolist()
            assert got == simulate(shape, n, images, kept, first)


def test_trace_counts_real_tokens_per_sample():
    # Sample 0 is left-padded (n = 4, two image tokens), sample 1 has n = 6.
    types = torch.tensor([[-1, -1, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]], dtype=torch.int8)
    kept = torch.tensor([[2, 2], [1, 0], [0, 0]])
    trace = SimpleNamespace(
        token_type=types,
        num_image=torch.tensor([2, 2]),
        kept_image=kept,
        k=2,
    )
    c = trace_flops(trace, S)
    for b, n in enumerate((4, 6)):
        alone = generation_flops(S, n, 2, kept[:, b], 2)
        assert torch.equal(c.per_step[:, b], alone.per_step[:, 0])
    assert c.total == int(c.per_step.sum())


def test_from_config_and_errors():
    transformers = pytest.importorskip("transformers")
    text = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2,
    )  # fmt: skip
    llava = transformers.LlavaConfig(text_config=text)
    for cfg in (text, llava, SimpleNamespace(config=llava)):
        s = DecoderShape.from_config(cfg)
        assert (s.num_layers, s.hidden_size, s.intermediate_size) == (3, 64, 172)
        assert (s.num_heads, s.kv_heads, s.dim_per_head) == (8, 2, 8)
    with pytest.raises(ValueError, match="k"):
        generation_flops(S, 10, 6, [6], k=4)
    with pytest.raises(ValueError, match="kept_image <= num_image"):
        generation_flops(S, 10, 6, [7], k=2)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        DecoderShape(2, 8, 12, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize(
    "kv_heads, attn", [(2, "sdpa"), pytest.param(4, "eager", marks=pytest.mark.slow)]
)
def test_equals_measured_flops_of_the_loop(kv_heads, attn):
    """2 x (count with mlp_matrices=3) = what torch's FlopCounterMode measures in the decoder
    layers of dyrate_ext.llava.generate (batch 1, so no padding), for every policy."""
    pytest.importorskip("transformers")
    from llava_utils import VOCAB, prompts, tiny_llava
    from torch.utils.flop_counter import FlopCounterMode

    from dyrate_ext.llava import VTW, AttentionMass, DyRate, FastV, NoPrune, generate
    from dyrate_ext.predictor import RatePredictor

    predictor = RatePredictor.from_image_mass(4, 4, high=0.95, low=0.6)
    model = tiny_llava(kv_heads, attn)
    shape = DecoderShape.from_config(model, mlp_matrices=3)
    p = prompts(1)
    policies = [NoPrune(), FastV(2, 0.5), VTW(3), DyRate(predictor, 2), AttentionMass(0.8, 1)]
    for policy in policies:
        counter = FlopCounterMode(display=False)
        with counter:
            out = generate(
                model, p.input_ids, p.pixel_values, p.attention_mask, policy=policy,
                max_new_tokens=5, eos_token_id=None,
            )  # fmt: skip
        counts = counter.get_flop_counts()
        measured = sum(counts["Global"].values())
        for outside in ("CLIPVisionModel", "LlavaMultiModalProjector"):
            measured -= sum(counts[outside].values())
        steps = out.trace.kept_image.shape[0]
        measured -= 2 * steps * shape.hidden_size * VOCAB  # LM head, one row per step
        if isinstance(policy, DyRate):  # the rate predictor, [1, H * 4] x [H * 4, K]
            measured -= 2 * steps * predictor.in_features * predictor.num_rates
        assert measured == 2 * trace_flops(out.trace, shape).total, repr(policy)


def test_llava15_7b_prefill_ratios_quoted_in_readme():
    """README: at LLaVA-1.5-7B's shape, a 620-token prompt with 576 image tokens, prefill only:
    FastV(K=2, R=0.5) 55.7 %, FastV(K=3, R=0.5) 57.2 %, VTW(K=16) 53.4 % of NoPrune."""
    base = generation_flops(LLAVA_15_7B, 620, 576, [576], None)
    got = [
        generation_flops(LLAVA_15_7B, 620, 576, [keep], k).percent_of(base)
        for k, keep in ((2, 288), (3, 288), (16, 0))
    ]
    assert got == pytest.approx([55.7, 57.2, 53.4], abs=0.05)
