"""dyrate_ext.hf on Qwen2-VL, Qwen2.5-VL (M-RoPE), LLaVA-OneVision (Qwen2 text, AnyRes),
InternVL (Qwen2 text, a variable number of 16-token tiles per image) and SmolVLM (Llama text,
a variable number of images per prompt).

- NoPrune inside generate() == vanilla generate() token for token (eager and sdpa, batch 1 and
  left-padded batch 3).
- FastV / VTW / DyRate / AttentionMass inside generate() give the logits (atol 1e-4) of HF's own
  forward that keeps every slot and masks, in layers >= k, the image slots removed so far, with
  generate()'s positions (Qwen's 3-D M-RoPE positions from get_rope_index): rotary positions
  never depend on the pruned layers' lengths; rope deltas are those of vanilla generate().
- Qwen prompts hold two images of different sizes; OneVision samples hold different numbers
  of image tokens (AnyRes) and keep different numbers.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import IMAGE, NUM_HEADS, QWEN_GRIDS, masked_reference, tiny_batch, tiny_model

import dyrate_ext.hf as hf
from dyrate_ext import VTW, AttentionMass, DyRate, FastV, NoPrune, RatePredictor

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "onevision", "internvl", "smolvlm"]
STEPS = 8
# The image mass at layer 1 of each tiny model drifts over ~10 steps within these bounds.
MASS = {
    "qwen2_vl": (0.65, 0.35),
    "qwen2_5_vl": (0.65, 0.35),
    "onevision": (0.9, 0.7),
    "internvl": (0.82, 0.6),
    "smolvlm": (0.7, 0.5),
}


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(family: str, attn: str):
        if (family, attn) not in cache:
            cache[(family, attn)] = tiny_model(family, attn)
        return cache[(family, attn)]

    return get


def run(model, inputs, policy=None, **kw):
    kw.setdefault("max_new_tokens", STEPS)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    if policy is None:
        return model.generate(**inputs, **kw), None
    with hf.pruning(model, policy) as session:
        out = model.generate(**inputs, **kw)
    return out, session.trace


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_noprune_matches_vanilla_generate(models, family, attn, batch):
    model = models(family, attn)
    inputs = tiny_batch(family, model, batch, seed=batch)
    expected, _ = run(model, inputs)
    out, trace = run(model, inputs, NoPrune())
    assert torch.equal(out, expected)
    assert trace.kept_image.shape == (STEPS, batch)


def policy(name: str, family: str):
    if name == "fastv":
        return FastV(2, 0.5)
    if name == "vtw":
        return VTW(2)
    if name == "attnmass":
        return AttentionMass(0.7, 2)
    high, low = MASS[family]
    return DyRate(RatePredictor.from_image_mass(NUM_HEADS, 4, high=high, low=low), 2)


CASES = [("fastv", "eager"), ("vtw", "sdpa"), ("attnmass", "sdpa"), ("dyrate", "eager")]


@pytest.mark.parametrize(("name", "attn"), CASES)
@pytest.mark.parametrize("family", FAMILIES)
def test_policies_match_masked_reference(models, family, name, attn):
    model = models(family, attn)
    inputs = tiny_batch(family, model, 3)
    pol = policy(name, family)
    out, trace = run(model, inputs, pol, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits)
    ref = masked_reference(model, inputs, out.sequences, trace.removed_step, pol.k)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    # Pruning happened and matters: the unmasked forward gives other logits.
    num_image = (inputs["input_ids"] == IMAGE).sum(1)
    fewer = trace.kept_image[-1] < num_image
    assert fewer.all() if name in ("fastv", "vtw") else fewer.any()
    unmasked = masked_reference(model, inputs, out.sequences, trace.removed_step, None)
    assert (unmasked - logits).abs().max() > 1e-3
    assert (trace.kept_image[1:] <= trace.kept_image[:-1]).all()
    kept = trace.kept_image
    assert trace.prune_calls == int((kept[1:] < kept[:-1]).any(dim=1).sum())
    if name == "dyrate":
        assert trace.prune_calls >= 1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_two_images_and_rope_deltas(models, family):
    model = models(family, "sdpa")
    inputs = tiny_batch(family, model, 3)
    grids = inputs["image_grid_thw"].reshape(3, 2, 3)
    assert (grids[:, 0] != grids[:, 1]).any(dim=1).all()  # two sizes in every prompt
    run(model, inputs)
    vanilla_deltas = model.model.rope_deltas.clone()
    out, trace = run(model, inputs, FastV(2, 0.75))
    assert torch.equal(model.model.rope_deltas, vanilla_deltas)
    # Both images lost tokens in layers >= k (the ranking spans the whole prompt).
    types = trace.token_type
    removed = (trace.removed_step == 0) & (types == 1)
    sizes = (grids[..., 1] * grids[..., 2] // 4).tolist()
    for b in range(3):
        image_slots = torch.nonzero(types[b] == 1).flatten()
        first, second = image_slots[: sizes[b][0]], image_slots[sizes[b][0] :]
        assert removed[b, first].any() and removed[b, second].any()
    assert len(QWEN_GRIDS) == 3


def test_onevision_anyres_variable_counts(models):
    model = models("onevision", "sdpa")
    inputs = tiny_batch("onevision", model, 3)
    counts = (inputs["input_ids"] == IMAGE).sum(1)
    assert len(set(counts.tolist())) == 3
    pol = AttentionMass(0.7, 2)
    out, trace = run(model, inputs, pol)
    kept = trace.kept_image[-1]
    assert len(set(kept.tolist())) == 3 and (kept < counts).all()
    for b in range(3):  # a sample alone gives the same tokens and keep counts as in the batch
        keep = inputs["attention_mask"][b].bool()
        one = dict(inputs, input_ids=inputs["input_ids"][b, keep][None])
        one.update(
            attention_mask=inputs["attention_mask"][b, keep][None],
            pixel_values=inputs["pixel_values"][b : b + 1],
            image_sizes=inputs["image_sizes"][b : b + 1],
        )
        single, strace = run(model, one, pol)
        assert torch.equal(single[0, keep.sum() :], out[b, inputs["input_ids"].shape[1] :])
        assert torch.equal(strace.kept_image[:, 0], trace.kept_image[:, b])
