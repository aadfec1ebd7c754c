"""dyrate_ext.costs against hand-worked cases, brute-force per-layer caches and cache-less runs.

The decoder is test_flops' S: 4 layers, d = 8, m = 12, two heads and two kv heads of D = 4. One
layer of q tokens over L slots costs 448 q + 16 q L multiply-adds, so a layer re-running a whole
sequence of n tokens (FastV's formula) costs fastv(n) = 448 n + 16 n^2:
fastv(4) = 2048, fastv(5) = 2640, fastv(6) = 3264, fastv(7) = 3920, fastv(8) = 4608,
fastv(9) = 5328, fastv(10) = 6080, fastv(11) = 6864, fastv(12) = 7680.
A cache slot of one layer holds K and V: 2 x 2 kv heads x 4 x element size = 32 bytes in
float16, 64 in float32.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from test_flops import S, random_schedules  # S: 4 layers, d 8, m 12, 2 heads

from dyrate_ext.costs import (
    CURRENCIES,
    generation_costs,
    kv_bytes_per_slot,
    kv_slots,
    paper_flops,
    trace_costs,
)
from dyrate_ext.flops import DecoderShape, generation_flops, layer_flops


def fastv(n: int) -> int:
    return 448 * n + 16 * n * n


def test_fastv_values_in_the_docstring():
    assert [fastv(n) for n in range(4, 13)] == [
        2048, 2640, 3264, 3920, 4608, 5328, 6080, 6864, 7680
    ]  # fmt: skip
    assert all(layer_flops(S, n, n) == fastv(n) for n in range(1, 20))


def test_bytes_per_slot():
    assert kv_bytes_per_slot(S) == 32 == kv_bytes_per_slot(S, torch.bfloat16)
    assert kv_bytes_per_slot(S, torch.float32) == 64
    gqa = DecoderShape(2, 64, 128, num_heads=8, num_kv_heads=2, head_dim=16)
    assert kv_bytes_per_slot(gqa, torch.float32) == 2 * 2 * 16 * 4


def test_noprune():
    # n = 5, i = 2, three steps; every layer holds n + t = 5, 6, 7 slots: 20, 24, 28 in all.
    c = generation_costs(S, 5, 2, [2, 2, 2], None)
    assert c.paper_flops.per_step[:, 0].tolist() == [4 * 2640, 4 * 3264, 4 * 3920]
    # KV cache: the prefill, then one token over 6 slots (544 a layer), over 7 (560).
    assert c.flops.per_step[:, 0].tolist() == [10560, 4 * 544, 4 * 560]
    assert c.kv_slots[:, 0].tolist() == [20, 24, 28]
    assert c.kv_held[:, 0].tolist() == [640, 768, 896]
    assert c.kv_read[:, 0].tolist() == [0, 768, 896]
    assert c.totals() == {
        "flops": 10560 + 2176 + 2240,
        "paper_flops": 10560 + 13056 + 15680,
        "kv_read_bytes": 768 + 896,
        "peak_kv_bytes": 896,
    }
    assert c.percent_of(c) == {name: 100.0 for name in CURRENCIES}


def test_fastv_prefill_only_removal():
    # n = 10, i = 6, k = 2 keeps 3: layers 0, 1 hold 10 + t slots, layers 2, 3 hold 7 + t.
    c = generation_costs(S, 10, 6, [3, 3, 3], 2)
    assert c.paper_flops.per_step[:, 0].tolist() == [
        2 * 6080 + 2 * 3920,  # 20000
        2 * 6864 + 2 * 4608,  # 22944
        2 * 7680 + 2 * 5328,  # 26016
    ]
    assert c.kv_slots[:, 0].tolist() == [2 * 10 + 2 * 7, 2 * 11 + 2 * 8, 2 * 12 + 2 * 9]
    assert c.kv_read_bytes == (38 + 42) * 32 == 2560
    assert c.peak_kv_bytes == 42 * 32
    base = generation_costs(S, 10, 6, [6, 6, 6], None)  # slots 40, 44, 48
    assert base.paper_flops.total == 4 * (6080 + 6864 + 7680) == 82496
    got = c.percent_of(base)
    assert got["paper_flops"] == pytest.approx(100 * 68960 / 82496)
    assert got["kv_read_bytes"] == pytest.approx(100 * 80 / 92)
    assert got["peak_kv_bytes"] == pytest.approx(100 * 42 / 48)
    assert got["flops"] == pytest.approx(c.flops.percent_of(base.flops))


def test_removal_at_a_decode_step():
    # k = 1, kept 6 -> 6 -> 2: layers 1..3 hold 10, 11 then 10 - 4 + 2 = 8 slots; layer 0
    # holds 10, 11, 12. All layers: 40, 44, 36, so the peak is at step 1, not the last.
    c = generation_costs(S, 10, 6, [6, 6, 2], 1)
    assert c.kv_slots[:, 0].tolist() == [40, 44, 36]
    assert c.peak_kv_bytes == 44 * 32
    assert c.kv_read_bytes == (44 + 36) * 32
    assert c.paper_flops.per_step[:, 0].tolist() == [4 * 6080, 4 * 6864, 7680 + 3 * 4608]
    assert c.flops.per_step[:, 0].tolist() == [4 * 6080, 4 * 624, 640 + 3 * 576]


def test_vtw_removes_every_image_token():
    # k = 3 keeps none: layer 3 holds the 4 text tokens + t; layers 0..2 hold 10 + t.
    c = generation_costs(S, 10, 6, [0, 0], 3)
    assert c.paper_flops.per_step[:, 0].tolist() == [3 * 6080 + 2048, 3 * 6864 + 2640]
    assert c.kv_slots[:, 0].tolist() == [34, 38]
    assert (c.kv_read_bytes, c.peak_kv_bytes) == (38 * 32, 38 * 32)


def test_batch_with_padding_and_different_lengths():
    # Sample 0: left-padded, n = 4 (two image tokens); sample 1: n = 6. k = 2, float32 (64 B).
    types = torch.tensor([[-1, -1, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]], dtype=torch.int8)
    kept = torch.tensor([[2, 2], [1, 0], [0, 0]])
    trace = SimpleNamespace(token_type=types, num_image=torch.tensor([2, 2]), kept_image=kept, k=2)
    c = trace_costs(trace, S, dtype=torch.float32)
    # Sample 0: full 4, 5, 6; pruned 4 - 2 + kept + t = 4, 4, 4 -> 16, 18, 20 slots.
    # Sample 1: full 6, 7, 8; pruned 6 - 2 + kept + t = 6, 5, 6 -> 24, 24, 28 slots.
    assert c.kv_slots.tolist() == [[16, 24], [18, 24], [20, 28]]
    assert c.paper_flops.per_step.tolist() == [
        [4 * 2048, 4 * 3264],
        [2 * 2640 + 2 * 2048, 2 * 3920 + 2 * 2640],
        [2 * 3264 + 2 * 2048, 2 * 4608 + 2 * 3264],
    ]
    per = c.sample_totals()
    assert per["kv_read_bytes"].tolist() == [(18 + 20) * 64, (24 + 28) * 64]
    assert per["peak_kv_bytes"].tolist() == [20 * 64, 28 * 64]
    assert per["paper_flops"].tolist() == [8192 + 9376 + 10624, 13056 + 13120 + 15744]
    # The batch peak is the largest sum over samples (40, 42, 48 slots), padding not counted.
    assert c.peak_kv_bytes == 48 * 64 and c.kv_read_bytes == 90 * 64
    # Each sample alone gives its column.
    for b, n in enumerate((4, 6)):
        alone = generation_costs(S, n, 2, kept[:, b], 2, dtype=torch.float32)
        for name, v in alone.totals().items():
            assert per[name][b] == v, name
    base = trace_costs(
        SimpleNamespace(
            token_type=types, num_image=trace.num_image, kept_image=kept * 0 + 2, k=None
        ),
        S,
        dtype=torch.float32,
    )
    pct = c.sample_percent_of(base)
    assert pct["peak_kv_bytes"].tolist() == pytest.approx([100 * 20 / 24, 100 * 28 / 32])
    assert all(torch.equal(v, torch.full((2,), 100.0, dtype=v.dtype))
               for v in base.sample_percent_of(base).values())  # fmt: skip


SHAPE = DecoderShape(6, 16, 40, num_heads=4, num_kv_heads=2, mlp_matrices=3)


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_count_is_a_cache_less_run(seed):
    """Step t of the paper-style count = the KV-cache count's prefill of the n + t tokens the
    sequence has at step t, kept[t] of its image tokens reaching layers >= k."""
    for n, images, kept, k in random_schedules(seed):
        for first in (k, None):
            paper = paper_flops(SHAPE, n, images, kept, first).per_step[:, 0]
            cacheless = [
                generation_flops(SHAPE, n + t, images, [keep], first).prefill
                for t, keep in enumerate(kept)
            ]
            assert paper.tolist() == cacheless
            cached = generation_flops(SHAPE, n, images, kept, first).per_step[:, 0]
            assert paper[0] == cached[0] and bool((paper >= cached).all())


def simulated_slots(n: int, images: int, kept: list[int], k: int | None) -> list[int]:
    """Brute force: each layer's cache length after each step, summed over the layers."""
    first = SHAPE.num_layers if k is None else k
    out = []
    for t, keep in enumerate(kept):
        total = 0
        for layer in range(SHAPE.num_layers):
            length = n + t  # prompt + the tokens fed at steps 1..t
            if layer >= first:
                length -= images - keep
            total += length
        out.append(total)
    return out


@pytest.mark.parametrize("seed", [2, 3])
def test_kv_bytes_against_brute_force(seed):
    per_slot = kv_bytes_per_slot(SHAPE, torch.float32)
    for n, images, kept, k in random_schedules(seed):
        for first in (k, None):
            slots = simulated_slots(n, images, kept, first)
            assert kv_slots(SHAPE, n, images, kept, first)[:, 0].tolist() == slots
            c = generation_costs(SHAPE, n, images, kept, first, dtype=torch.float32)
            assert c.kv_read_bytes == sum(slots[1:]) * per_slot >= 0
            assert c.peak_kv_bytes == max(slots) * per_slot > 0
            assert bool((c.kv_read >= 0).all())


@pytest.mark.parametrize("seed", [4, 5])
def test_every_currency_is_monotonic_in_kept(seed):
    gen = torch.Generator().manual_seed(seed + 100)
    for n, images, kept, k in random_schedules(seed):
        fewer = [max(0, v - int(torch.randint(0, 4, (1,), generator=gen))) for v in kept]
        fewer = torch.tensor(fewer).cummin(0).values.tolist()  # still never growing
        base = generation_costs(SHAPE, n, images, [images] * len(kept), None)
        more, less = (generation_costs(SHAPE, n, images, x, k) for x in (kept, fewer))
        lo, hi, top = less.totals(), more.totals(), base.totals()
        assert all(lo[name] <= hi[name] <= top[name] for name in CURRENCIES)
        for a, b in ((less, more), (more, base)):
            assert bool((a.flops.per_step <= b.flops.per_step).all())
            assert bool((a.paper_flops.per_step <= b.paper_flops.per_step).all())
            assert bool((a.kv_slots <= b.kv_slots).all())
        if len(kept) > 1:  # (without a decoding step no KV bytes are read: nan %)
            assert base.percent_of(base) == {name: 100.0 for name in CURRENCIES}


def test_no_decoding_step_and_errors():
    c = generation_costs(S, 10, 6, [3], 2)
    assert c.kv_read_bytes == 0 and c.peak_kv_bytes == (2 * 10 + 2 * 7) * 32
    pct = c.percent_of(generation_costs(S, 10, 6, [6], None))
    assert math.isnan(pct["kv_read_bytes"])
    assert pct["flops"] == pytest.approx(100 * (2 * 6080 + 2 * 3920) / (4 * 6080))
    assert pct["paper_flops"] == pct["flops"]
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        generation_costs(S, 10, 6, [6], 4)
    with pytest.raises(ValueError, match="kept_image <= num_image"):
        paper_flops(S, 10, 6, [7], 2)
    with pytest.raises(ValueError, match=r"\[T, B\]"):
        kv_slots(S, 10, 6, [[[1]]], 2)


def test_llava15_7b_paper_style_percent():
    """At LLaVA-1.5-7B's shape (620-token prompt, 576 image tokens, 64 response tokens): with
    no cache FastV(K=2, R=0.5)'s saving applies to the whole sequence at every step, so its
    paper-style % (57.8) sits below its KV-cache % (59.7), where the decode steps' shared
    projections and MLP of the one new token dilute it; both above the prefill-only 55.7."""
    from dyrate_ext.flops import LLAVA_15_7B

    steps = 65
    base = generation_costs(LLAVA_15_7B, 620, 576, [576] * steps, None)
    fast = generation_costs(LLAVA_15_7B, 620, 576, [288] * steps, 2).percent_of(base)
    assert fast["paper_flops"] == pytest.approx(57.83, abs=0.01)
    assert fast["flops"] == pytest.approx(59.74, abs=0.01)
    # The bytes: layers 0, 1 hold 620 + t slots, layers 2..31 hold 332 + t.
    read = sum(2 * (620 + t) + 30 * (332 + t) for t in range(1, steps))
    assert fast["kv_read_bytes"] == pytest.approx(
        100 * read / sum(32 * (620 + t) for t in range(1, steps))
    )
    assert fast["peak_kv_bytes"] == pytest.approx(100 * (2 * 684 + 30 * 396) / (32 * 684))
