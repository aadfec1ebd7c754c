"""dyrate_ext.hf on LLaVA (Llama text): pruning inside plain `model.generate()`.

- NoPrune inside generate() == vanilla generate() token for token (eager and sdpa, batch 1 and
  left-padded batch 3, stop tokens, sampling with a seed, output_scores, TextStreamer).
- FastV / VTW / DyRate / AttentionMass inside generate() == `dyrate_ext.llava.generate`: tokens
  and keep counts equal, logits within 1e-4 (DyRate also with a picture-features predictor).
- Layers >= k compute only the kept prompt rows; cache bytes fall with the keep counts and
  stay within 1.25x of the live slots; prune_kv runs only at steps where a count drops.
- The model is left as it was after the block; bad input fails before generation.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import KV_HEADS, NUM_HEADS, tiny_batch, tiny_model
from llava_utils import picture_predictor

import dyrate_ext.hf as hf
from dyrate_ext.flops import DecoderShape, trace_flops
from dyrate_ext.llava import VTW, AttentionMass, DyRate, FastV, NoPrune, RatePredictor, generate
from dyrate_ext.slots import held_slots_bound

STEPS = 10


@pytest.fixture(scope="module")
def models():
    cache: dict = {}

    def get(attn: str):
        if attn not in cache:
            cache[attn] = tiny_model("llava", attn)
        return cache[attn]

    return get


def vanilla(model, inputs, **kw):
    kw.setdefault("max_new_tokens", STEPS)
    kw.setdefault("eos_token_id", None)
    return model.generate(**inputs, do_sample=kw.pop("do_sample", False), pad_token_id=0, **kw)


def pruned(model, inputs, policy, **kw):
    with hf.pruning(model, policy) as session:
        out = vanilla(model, inputs, **kw)
    return out, session.trace


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_noprune_matches_vanilla_generate(models, attn, batch):
    model = models(attn)
    inputs = tiny_batch("llava", model, batch, seed=batch)
    expected = vanilla(model, inputs, max_new_tokens=12)
    out, trace = pruned(model, inputs, NoPrune(), max_new_tokens=12)
    assert torch.equal(out, expected)
    assert trace.kept_image.shape == (12, batch) and trace.k is None


def image_mass_predictor() -> RatePredictor:
    return RatePredictor.from_image_mass(NUM_HEADS, 4, high=0.9, low=0.75)


POLICIES = {
    "fastv": lambda: FastV(2, 0.5),
    "fastv_k3": lambda: FastV(3, 0.75),
    "vtw": lambda: VTW(1),
    "dyrate": lambda: DyRate(image_mass_predictor(), 2, num_rates=4),
    "attnmass": lambda: AttentionMass(0.8, 2),
    "dyrate_accumulated": lambda: DyRate(image_mass_predictor(), 2, 4, ranking="accumulated"),
    "dyrate_picture_features": lambda: DyRate(picture_predictor(NUM_HEADS, 4), 2, num_rates=4),
    "attnmass_current": lambda: AttentionMass(0.8, 2, ranking="current"),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_policies_match_reference_loop(models, attn, name):
    model = models(attn)
    inputs = tiny_batch("llava", model, 3)
    ref = generate(
        model,
        inputs["input_ids"],
        inputs["pixel_values"],
        inputs["attention_mask"],
        policy=POLICIES[name](),
        max_new_tokens=STEPS,
        eos_token_id=None,
        output_logits=True,
    )
    out, trace = pruned(
        model, inputs, POLICIES[name](), output_logits=True, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), ref.logits, atol=1e-4, rtol=0)
    assert torch.equal(trace.kept_image, ref.trace.kept_image)
    assert torch.equal(trace.removed_step, ref.trace.removed_step)
    torch.testing.assert_close(trace.rate, ref.trace.rate)
    assert torch.equal(trace.cache_length, ref.trace.cache_length)
    # One state machine, one storage: both engines held the same bytes at every step.
    assert torch.equal(trace.cache_bytes, ref.trace.cache_bytes)
    assert trace.prune_calls == ref.trace.prune_calls
    assert torch.equal(trace.positions, ref.trace.positions)
    shape = DecoderShape.from_config(model)
    assert trace_flops(trace, shape).total == trace_flops(ref.trace, shape).total
    torch.testing.assert_close(trace.type_mass, ref.trace.type_mass, atol=1e-5, rtol=0)
    # Pruning really happened, and really changed the logits.
    assert (trace.kept_image[-1] < trace.kept_image.new_tensor(64)).all()
    plain = vanilla(model, inputs, output_logits=True, return_dict_in_generate=True)
    assert (torch.stack(plain.logits)[0] - torch.stack(out.logits)[0]).abs().max() > 1e-3


def test_prefill_computes_only_kept_rows_and_bytes_follow_counts(models):
    model = models("sdpa")
    inputs = tiny_batch("llava", model, 3)
    real = inputs["attention_mask"].sum(1)
    _, trace = pruned(model, inputs, DyRate(image_mass_predictor(), 2, num_rates=4))
    text = real - 64
    assert trace.prefill_rows == int((text + trace.kept_image[0]).max())
    kept = trace.kept_image
    assert (kept[1:] <= kept[:-1]).all() and (kept[-1] < kept[0]).any()
    drops = int(((kept[1:] < kept[:-1]).any(dim=1)).sum())
    assert trace.prune_calls == drops >= 1
    # Bytes held stay within the storage rule's bound (dyrate_ext.slots.held_slots_bound per
    # group) at every step, and fall below NoPrune's.
    per_slot = 2 * KV_HEADS * 16 * 4 * 3  # one layer's slot: (k, v) x heads x dim x fp32 x B
    for held, (full_len, pruned_len) in zip(trace.cache_bytes, trace.cache_length.tolist()):
        bound = held_slots_bound(full_len) + held_slots_bound(pruned_len)
        assert int(held) <= 2 * bound * per_slot  # 2 layers per group (k = 2 of 4)
    _, full = pruned(model, inputs, NoPrune())
    assert (trace.cache_bytes < full.cache_bytes).all()
    # The pruned group shrank at a drop: bytes fell while the full group kept growing.
    assert (trace.cache_bytes[1:] < trace.cache_bytes[:-1]).any()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stop_tokens_sampling_scores_streamer(models, attn):
    from transformers import TextStreamer

    model = models(attn)
    inputs = tiny_batch("llava", model, 3, seed=7)
    free = vanilla(model, inputs, max_new_tokens=12)
    eos = int(free[1, -12 + 3])
    expected = vanilla(model, inputs, max_new_tokens=12, eos_token_id=eos)
    out, _ = pruned(model, inputs, NoPrune(), max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(out, expected)
    ids, px, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    for policy in (FastV(2, 0.5), AttentionMass(0.8, 2)):
        ref = generate(
            model, ids, px, mask, policy=policy, max_new_tokens=12, eos_token_id=eos, pad_token_id=0
        )
        out, _ = pruned(model, inputs, policy, max_new_tokens=12, eos_token_id=eos)
        assert torch.equal(out, ref.sequences)

    sample = dict(do_sample=True, top_k=20, temperature=0.7, output_scores=True)
    sample.update(return_dict_in_generate=True)
    torch.manual_seed(3)
    expected = vanilla(model, inputs, **sample)
    torch.manual_seed(3)
    out, _ = pruned(model, inputs, NoPrune(), **sample)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores))
    torch.manual_seed(3)
    a, _ = pruned(model, inputs, FastV(2, 0.5), **sample)
    torch.manual_seed(3)
    b, _ = pruned(model, inputs, FastV(2, 0.5), **sample)
    assert torch.equal(a.sequences, b.sequences)
    many, trace = pruned(model, inputs, FastV(2, 0.5), do_sample=True, num_return_sequences=2)
    assert many.shape[0] == 6 and trace.kept_image.shape == (STEPS, 6)

    class Collect(TextStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    one = tiny_batch("llava", model, 1)
    streamer = Collect()
    out, _ = pruned(model, one, FastV(2, 0.5), streamer=streamer)
    assert streamer.chunks[-1] is None
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[:-1]])
    assert torch.equal(streamed, out[0])


def test_model_restored_after_block(models):
    model = models("sdpa")
    inputs = tiny_batch("llava", model, 3)
    before = vanilla(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    with pytest.raises(RuntimeError, match="inside"):
        with hf.pruning(model, FastV(2, 0.5)):
            assert model.config.text_config._attn_implementation == "dyrate_sdpa"
            with torch.no_grad():  # a plain forward inside the block is the vanilla one
                torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)
            with pytest.raises(RuntimeError, match="already inside"):
                hf.pruning(model, NoPrune()).__enter__()
            raise RuntimeError("inside")
    assert model.config.text_config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__
    assert not model._forward_pre_hooks and not model._forward_hooks
    layers = model.model.language_model.layers
    assert all(not layer._forward_pre_hooks for layer in layers)
    assert not hasattr(layers[0].self_attn, "_dyrate_session")
    assert torch.equal(vanilla(model, inputs), before)


def test_bad_input_errors_before_generation(models):
    model = models("eager")
    inputs = tiny_batch("llava", model, 2)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(TypeError, match=r"does not support .*Linear; supported: Llava"):
            hf.pruning(torch.nn.Linear(2, 2)).__enter__()
        with pytest.raises(TypeError, match="LlamaModel"):
            hf.pruning(model.model.language_model).__enter__()
        for bad in (FastV(0, 0.5), FastV(4, 0.5), VTW(7)):
            with pytest.raises(ValueError, match="out of range"):
                hf.pruning(model, bad).__enter__()
        with pytest.raises(ValueError, match=r"predictor takes 24 inputs \(6 heads"):
            hf.pruning(model, DyRate(RatePredictor(6, 3), 2)).__enter__()
        with hf.pruning(model, FastV(2, 0.5)):
            with pytest.raises(ValueError, match="beam search"):
                vanilla(model, inputs, num_beams=2)
            with pytest.raises(ValueError, match="a cache of your own"):
                from transformers import DynamicCache

                vanilla(model, inputs, cache=DynamicCache())
            right = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
            with pytest.raises(ValueError, match="not left-padded"):
                vanilla(model, right)
            ends = dict(inputs)
            ends["input_ids"] = torch.cat([inputs["input_ids"], torch.full((2, 1), 199)], 1)
            ends["attention_mask"] = torch.cat(
                [inputs["attention_mask"], torch.ones(2, 1, dtype=torch.int64)], 1
            )
            with pytest.raises(ValueError, match="ends with an image token"):
                vanilla(model, ends)
        assert calls == []  # nothing ran
    finally:
        handle.remove()
    assert model.config.text_config._attn_implementation == "eager"
