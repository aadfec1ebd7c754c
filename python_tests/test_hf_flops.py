"""dyrate_ext.hf: measured FLOPs of pruned generate() == dyrate_ext.flops; version check.

torch's FlopCounterMode counts the decoder layers (`language_model.layers.N`) of a generate()
run under each policy (batch 1, no padding). Twice dyrate_ext.flops' count with the gated MLP
(mlp_matrices=3) must equal it: so the prefill of layers >= k really runs only the kept rows
(FastV's saving) and each decoding step's attention runs over the pruned cache only.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import NUM_HEADS, tiny_batch, tiny_model

import dyrate_ext.hf as hf
from dyrate_ext import VTW, AttentionMass, DyRate, FastV, NoPrune, RatePredictor
from dyrate_ext.flops import DecoderShape, generation_flops
from dyrate_ext.hf._compat import check_transformers_version

LAYER = re.compile(r"language_model\.layers\.\d+$")


def measured_decoder_flops(model, inputs, policy, steps):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with hf.pruning(model, policy) as session, counter:
        model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    counts = counter.get_flop_counts()
    total = sum(sum(v.values()) for k, v in counts.items() if LAYER.search(k))
    return total, session.trace


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "onevision"])
def test_measured_flops_equal_dyrate_flops(family):
    model = tiny_model(family, "sdpa")
    inputs = tiny_batch(family, model, 1)
    shape = DecoderShape.from_config(model, mlp_matrices=3)
    n = int(inputs["attention_mask"].sum())
    predictor = RatePredictor.from_image_mass(NUM_HEADS, 4, high=0.9, low=0.3)
    policies = [NoPrune(), FastV(2, 0.5), VTW(3), AttentionMass(0.7, 1), DyRate(predictor, 2)]
    prefill = {}
    for policy in policies:
        measured, trace = measured_decoder_flops(model, inputs, policy, steps=4)
        num_image = int((trace.token_type == 1).sum())
        count = generation_flops(shape, n, num_image, trace.kept_image, trace.k)
        if isinstance(policy, DyRate):  # the predictor runs inside the scoring layer
            measured -= 2 * trace.kept_image.shape[0] * predictor.in_features * predictor.num_rates
        assert measured == 2 * count.total, repr(policy)
        prefill[repr(policy)] = count.prefill
    # The prefill really got cheaper.
    assert prefill[repr(FastV(2, 0.5))] < prefill[repr(NoPrune())]
    assert prefill[repr(VTW(3))] < prefill[repr(NoPrune())]


def test_transformers_version_check():
    check_transformers_version("5.0.0")
    check_transformers_version("5.24.0")
    for bad in ("4.57.1", "6.0.0"):
        with pytest.raises(ImportError, match=r"needs transformers>=5,<6 .*found transformers"):
            check_transformers_version(bad)
    assert hf.TRANSFORMERS_REQUIREMENT == "transformers>=5,<6"
    assert torch.__version__  # the range is the only pin: torch is whatever the build used
