"""The KV bytes dyrate_ext.costs counts are the bytes the caches really hold, in both engines.

One prompt (batch 1, so no left padding and no ragged rows) on llava_utils' tiny LLaVA with
grouped-query attention (4 query heads, 2 kv heads), 8 greedy steps, through
`dyrate_ext.evaluate.engines.generate_timed`: the reference loop (`dyrate_ext.llava.generate`)
and Hugging Face's `model.generate()` inside `dyrate_ext.hf.pruning`. After every step the
trace's live bytes (what the pruning state's groups hold, measured from their buffers) must
equal `Costs.kv_held` (the count from the keep counts alone), byte for byte, under NoPrune,
FastV (prefill removal), and DyRate and AttentionMass, which also remove during decoding.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from llava_utils import NUM_HEADS, prompts, tiny_llava

from dyrate_ext import AttentionMass, DyRate, FastV, NoPrune, RatePredictor
from dyrate_ext.costs import kv_bytes_per_slot, trace_costs
from dyrate_ext.evaluate.engines import generate_timed
from dyrate_ext.flops import DecoderShape

STEPS = 8


@pytest.fixture(scope="module")
def model():
    return tiny_llava(kv_heads=2, attn="sdpa")


def policies():
    # The tiny model's image mass drifts from ~0.9 to ~0.75: this predictor prunes mid-decode.
    predictor = RatePredictor.from_image_mass(NUM_HEADS, 4, high=0.9, low=0.75)
    return [NoPrune(), FastV(2, 0.5), DyRate(predictor, 2), AttentionMass(0.8, 1)]


@pytest.mark.parametrize("engine", ["loop", "hf"])
def test_counted_kv_bytes_equal_the_bytes_held(model, engine):
    p = prompts(1)
    inputs = {
        "input_ids": p.input_ids,
        "attention_mask": p.attention_mask,
        "pixel_values": p.pixel_values,
    }
    shape = DecoderShape.from_config(model)
    per_slot = kv_bytes_per_slot(shape, model.dtype)
    assert per_slot == 2 * 2 * (64 // NUM_HEADS) * 4  # K and V, 2 kv heads, D = 16, float32
    decode_removals = 0
    for policy in policies():
        out, _ = generate_timed(model, inputs, policy, STEPS, None, 0, engine=engine)
        trace = out.trace
        assert trace.kept_image.shape == (STEPS, 1)
        costs = trace_costs(trace, shape, dtype=model.dtype)
        held = costs.kv_held[:, 0]
        assert trace.live_bytes.tolist() == held.tolist(), repr(policy)
        # The same slots group by group: layers < k hold cache_length[:, 0] each, layers >= k
        # cache_length[:, 1].
        k = shape.num_layers if trace.k is None else trace.k
        groups = k * trace.cache_length[:, 0] + (shape.num_layers - k) * trace.cache_length[:, 1]
        assert torch.equal(groups * per_slot, held), repr(policy)
        assert costs.peak_kv_bytes == int(trace.live_bytes.max())
        assert costs.kv_read_bytes == int(trace.live_bytes[1:].sum())
        # The buffers allocate ahead: they never hold fewer bytes than the live slots.
        assert bool((trace.cache_bytes >= trace.live_bytes).all()), repr(policy)
        kept = trace.kept_image[:, 0]
        decode_removals += int((kept[1:] < kept[:-1]).sum())
    assert decode_removals >= 2  # DyRate and AttentionMass really removed while decoding
