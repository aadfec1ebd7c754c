"""dyrate_ext.llava: the LLaVA decoding loop against HF transformers, offline tiny models.

- NoPrune reproduces `model.generate(do_sample=False)` token for token (eager and sdpa,
  multi-head and grouped-query attention, batch 1 and left-padded batch 3, stop tokens).
- FastV, VTW, DyRate and AttentionMass with physical removal give the logits (atol 1e-4) and
  the cached keys/values of HF's own forward that keeps every slot and masks the removed
  image slots in layers >= k; their decisions follow the scoring layer's attention.
- A batch equals its samples run one by one, with different keep counts per sample.
- Keep counts never grow, caches of layers >= k agree, positions continue after pruning.
- Sampling, and clear errors for bad input.
"""

from __future__ import annotations

import pytest
import torch

from dyrate_ext.token_types import TokenType
from dyrate_ext.train.masked_forward import ranked_scores

pytest.importorskip("transformers")

from llava_utils import (
    GRID,
    IMAGE_TOKEN,
    NUM_HEADS,
    NUM_LAYERS,
    masked_reference,
    prompts,
    tiny_llava,
)

from dyrate_ext.llava import (
    VTW,
    AttentionMass,
    Decision,
    DyRate,
    FastV,
    NoPrune,
    RatePredictor,
    generate,
)

STEPS = 10


@pytest.fixture(scope="module")
def models():
    """(kv_heads, attn) -> model, built once per module."""
    cache = {}

    def get(kv_heads: int, attn: str):
        if (kv_heads, attn) not in cache:
            cache[(kv_heads, attn)] = tiny_llava(kv_heads, attn)
        return cache[(kv_heads, attn)]

    return get


def run(model, p, policy=None, steps=STEPS, **kw):
    kw.setdefault("eos_token_id", None)
    return generate(
        model,
        p.input_ids,
        p.pixel_values,
        p.attention_mask,
        policy=policy,
        max_new_tokens=steps,
        output_logits=True,
        **kw,
    )


def image_mass_predictor() -> RatePredictor:
    # The tiny models' mean image mass at layer 1 drifts from ~0.9 down to ~0.74 over 10 steps.
    return RatePredictor.from_image_mass(NUM_HEADS, 4, high=0.9, low=0.75)


POLICIES = {
    "fastv_k2_r05": lambda: FastV(2, 0.5),
    "fastv_k3_r075": lambda: FastV(3, 0.75),
    "vtw_k1": lambda: VTW(1),
    "vtw_k2": lambda: VTW(2),
    "dyrate_k2": lambda: DyRate(image_mass_predictor(), 2, num_rates=4),
    "attnmass_k2": lambda: AttentionMass(0.8, 2),
    "dyrate_k2_accumulated": lambda: DyRate(image_mass_predictor(), 2, 4, ranking="accumulated"),
    "attnmass_k2_current": lambda: AttentionMass(0.8, 2, ranking="current"),
}


# ---- NoPrune == HF generate ------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [NUM_HEADS, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_noprune_matches_hf_generate(models, attn, kv_heads, batch):
    model = models(kv_heads, attn)
    p = prompts(batch, seed=batch)
    out = run(model, p, NoPrune(), steps=12)
    expected = model.generate(
        input_ids=p.input_ids,
        pixel_values=p.pixel_values,
        attention_mask=p.attention_mask,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(out.sequences, expected)
    assert out.new_tokens.shape == (batch, 12)
    assert out.trace.kept_image.shape == (12, batch)
    assert (out.trace.kept_image == GRID).all() and (out.trace.rate == 0).all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stop_tokens_match_hf_generate(models, attn):
    model = models(2, attn)
    p = prompts(3, seed=7)
    free = run(model, p, steps=12)
    eos = int(free.new_tokens[1, 3])  # sample 1 stops at step 3; others maybe later or never
    out = run(model, p, steps=12, eos_token_id=eos, pad_token_id=0)
    expected = model.generate(
        input_ids=p.input_ids,
        pixel_values=p.pixel_values,
        attention_mask=p.attention_mask,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    assert torch.equal(out.sequences, expected)
    stop = int((out.new_tokens[1] == eos).nonzero()[0])
    assert (out.new_tokens[1, stop + 1 :] == 0).all()


def test_noprune_scoring_layer_records_type_mass(models):
    model = models(2, "eager")
    p = prompts(3)
    out = run(model, p, NoPrune(scoring_layer=1))
    ref = masked_reference(model, p, out, None)
    mass = out.trace.type_mass
    assert mass.shape == (STEPS, 3, NUM_HEADS, 4)
    torch.testing.assert_close(mass.sum(-1), torch.ones(STEPS, 3, NUM_HEADS), atol=1e-5, rtol=0)
    torch.testing.assert_close(mass, _reference_type_mass(ref, 1, p), atol=1e-5, rtol=0)
    assert run(model, p, NoPrune()).trace.type_mass is None


# ---- physical removal == masked reference ------------------------------------------------------


def _reference_type_mass(ref, layer, p):
    """float32 [T, B, H, 4] type mass of each step's query row from HF's eager attentions."""
    prompt_len = p.input_ids.shape[1]
    steps = int(ref.step_of_row.max()) + 1
    rows = torch.arange(steps) + prompt_len - 1
    probs = ref.attentions[layer][:, :, rows]  # [B, H, T, N]
    onehot = torch.stack([ref.token_type == t for t in range(4)], -1).float()  # [B, N, 4]
    return torch.einsum("bhtn,bnc->tbhc", probs, onehot)


CASES = [
    (name, kv, attn) for name in POLICIES for kv, attn in [(NUM_HEADS, "eager"), (2, "eager")]
] + [("fastv_k2_r05", 2, "sdpa"), ("dyrate_k2", 2, "sdpa"), ("attnmass_k2", NUM_HEADS, "sdpa")]


@pytest.mark.parametrize(("name", "kv_heads", "attn"), CASES)
def test_physical_removal_matches_masked_reference(models, name, kv_heads, attn):
    model = models(kv_heads, attn)
    p = prompts(3)
    policy = POLICIES[name]()
    out = run(model, p, policy, return_cache=True)
    ref = masked_reference(model, p, out, policy.k)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    # Pruning really happened and really matters.
    assert (out.trace.kept_image[-1] < GRID).all()
    # Cached keys/values: layers < k hold every fed slot; layers >= k hold exactly the kept
    # slots, at the reference's (rotated) keys of the slot they came from.
    cache = out.cache
    n_fed = ref.keys[0].shape[2]
    for layer in range(NUM_LAYERS):
        group = cache.group(layer)
        k_cache, v_cache = group.kv(layer)
        if group is cache.full:
            assert group.length == n_fed
            torch.testing.assert_close(k_cache, ref.keys[layer], atol=1e-5, rtol=0)
            torch.testing.assert_close(v_cache, ref.values[layer], atol=1e-5, rtol=0)
            continue
        origin = group.origin
        for b in range(3):
            live = origin[b] >= 0
            src = origin[b, live]
            torch.testing.assert_close(
                k_cache[b][:, live], ref.keys[layer][b][:, src], atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                v_cache[b][:, live], ref.values[layer][b][:, src], atol=1e-5, rtol=0
            )
            # Exactly the slots never removed (text, response, kept image) are there.
            removed = out.trace.removed_step[b] >= 0
            expected = torch.cat(
                [
                    (p.attention_mask[b] == 1) & ~removed,
                    torch.ones(n_fed - removed.numel(), dtype=torch.bool),
                ]
            )
            assert torch.equal(src, expected.nonzero().flatten())


@pytest.mark.parametrize(
    "name",
    ["fastv_k2_r05", "dyrate_k2", "attnmass_k2", "dyrate_k2_accumulated", "attnmass_k2_current"],
)
def test_decisions_follow_scoring_layer(models, name):
    """Type mass = HF eager attention at layer k-1; removed slots are the lowest-ranked image
    slots under the policy's ranking (HF's attention rows: each step's own, their running sum,
    or the prefill row's); DyRate's keep counts come from its predictor and never grow."""
    model = models(2, "eager")
    p = prompts(3)
    policy = POLICIES[name]()
    out = run(model, p, policy)
    ref = masked_reference(model, p, out, policy.k)
    k = policy.k
    mass = _reference_type_mass(ref, k - 1, p)
    torch.testing.assert_close(out.trace.type_mass, mass, atol=1e-5, rtol=0)

    prompt_len = p.input_ids.shape[1]
    rows = torch.arange(STEPS) + prompt_len - 1
    score = ref.attentions[k - 1][:, :, rows, :prompt_len].mean(1)  # [B, T, S]
    score = ranked_scores(score, policy.ranking)
    removed = out.trace.removed_step
    image = out.trace.token_type == TokenType.IMAGE
    for b in range(3):
        for t in range(STEPS):
            present = image[b] & ((removed[b] < 0) | (removed[b] >= t))
            gone_now = removed[b] == t
            if gone_now.any() and (present & ~gone_now).any():
                worst_gone = score[b, t, gone_now].max()
                best_kept = score[b, t, present & ~gone_now].min()
                assert worst_gone <= best_kept + 1e-6
    kept = out.trace.kept_image
    assert (kept[1:] <= kept[:-1]).all()
    if name.startswith("dyrate_k2"):
        cls = policy.predictor.predict(out.trace.type_mass.reshape(STEPS * 3, -1)).reshape(STEPS, 3)
        want = GRID - (cls * GRID) // 4
        torch.testing.assert_close(out.trace.rate, cls.float() / 4)
        expect = want[0].clone()
        for t in range(STEPS):
            expect = torch.minimum(expect, want[t])
            assert torch.equal(kept[t], expect)
        assert len(set(cls.flatten().tolist())) > 1, "the predictor should pick several rates"


# ---- batch == one by one ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dyrate_k2", "attnmass_k2", "fastv_k2_r05"])
@pytest.mark.parametrize("kv_heads", [NUM_HEADS, 2])
def test_batch_equals_samples_one_by_one(models, name, kv_heads):
    model = models(kv_heads, "sdpa")
    p = prompts(3, seed=3)
    out = run(model, p, POLICIES[name]())
    pads = (p.attention_mask == 0).sum(1)
    for b in range(3):
        single = run(model, p.sample(b), POLICIES[name]())
        assert torch.equal(single.new_tokens[0], out.new_tokens[b])
        torch.testing.assert_close(single.logits[:, 0], out.logits[:, b], atol=1e-4, rtol=0)
        assert torch.equal(single.trace.kept_image[:, 0], out.trace.kept_image[:, b])
        assert torch.equal(single.trace.rate[:, 0], out.trace.rate[:, b])
        torch.testing.assert_close(
            single.trace.type_mass[:, 0], out.trace.type_mass[:, b], atol=1e-5, rtol=0
        )
        assert torch.equal(single.trace.removed_step[0], out.trace.removed_step[b, int(pads[b]) :])
        assert torch.equal(single.trace.positions[:, 0], out.trace.positions[:, b])
    if name != "fastv_k2_r05":
        per_sample = out.trace.kept_image.T.tolist()
        assert len({tuple(r) for r in per_sample}) > 1, "samples should keep different counts"


# ---- invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_cache_layout_and_positions(models, name):
    model = models(2, "eager")
    p = prompts(3)
    policy = POLICIES[name]()
    out = run(model, p, policy, return_cache=True)
    tr = out.trace
    k = policy.k
    assert tr.k == k and tr.scoring_layer == k - 1
    # Keep counts never grow.
    assert (tr.kept_image[1:] <= tr.kept_image[:-1]).all()
    assert (tr.kept_image <= tr.num_image).all()
    # Positions continue from the real tokens each sample has seen, whatever was pruned.
    n_real = p.attention_mask.sum(1)
    expected = n_real[None, :] - 1 + torch.arange(STEPS)[:, None]
    assert torch.equal(tr.positions, expected)
    # Layers >= k share one layout: same length, token_type and kept image count.
    cache = out.cache
    full, pruned = cache.full, cache.pruned
    assert pruned.layers == range(k, NUM_LAYERS) and full.layers == range(0, k)
    prompt_len = p.input_ids.shape[1]
    assert full.length == prompt_len + STEPS - 1 == int(tr.cache_length[-1, 0])
    assert pruned.length == int(tr.cache_length[-1, 1])
    for layer in pruned.layers:
        kc, vc = pruned.kv(layer)
        assert kc.shape == vc.shape == (3, 2, pruned.length, 16)
    assert pruned.token_type.shape == pruned.origin.shape == (3, pruned.length)
    live = pruned.token_type >= 0
    assert pruned.length == int(live.sum(1).max())
    assert torch.equal((pruned.token_type == TokenType.IMAGE).sum(1), tr.kept_image[-1])
    assert torch.equal(live, pruned.origin >= 0)
    src = full.token_type.gather(1, pruned.origin.clamp(min=0))
    assert torch.equal(pruned.token_type[live], src[live])
    # Origins ascend: compaction keeps sequence order.
    for b in range(3):
        o = pruned.origin[b, live[b]]
        assert (o[1:] > o[:-1]).all()
    # At prefill the removed tokens were never computed in layers >= k.
    text = ((p.attention_mask == 1) & (p.input_ids != IMAGE_TOKEN)).sum(1)
    assert int(tr.cache_length[0, 1]) == int((text + tr.kept_image[0]).max())


# ---- sampling ---------------------------------------------------------------------------------


def test_sampling(models):
    model = models(2, "sdpa")
    p = prompts(3)
    greedy = run(model, p, FastV(2, 0.5))
    a = run(model, p, FastV(2, 0.5), do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=5)
    b = run(model, p, FastV(2, 0.5), do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=5)
    c = run(model, p, FastV(2, 0.5), do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=6)
    assert torch.equal(a.sequences, b.sequences)
    assert not torch.equal(a.sequences, c.sequences)
    assert not torch.equal(a.sequences, greedy.sequences)
    # Every sampled token is among the step's 20 most likely.
    top = a.logits.topk(20, dim=-1).indices  # [T, B, 20]
    assert (top == a.new_tokens.T[..., None]).any(-1).all()
    # top_k=1 and a tiny top_p both reduce to greedy.
    assert torch.equal(
        run(model, p, FastV(2, 0.5), do_sample=True, top_k=1, seed=1).sequences, greedy.sequences
    )
    assert torch.equal(
        run(model, p, FastV(2, 0.5), do_sample=True, top_p=1e-6, seed=1).sequences, greedy.sequences
    )


def test_untrained_predictor_runs(models):
    model = models(2, "eager")
    p = prompts(3)
    torch.manual_seed(0)
    out = run(model, p, DyRate(RatePredictor(NUM_HEADS, 5), 2))
    assert out.new_tokens.shape == (3, STEPS)
    assert ((out.trace.rate * 5).round() == out.trace.rate * 5).all()


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "rate", "match"),
    [(-1, 0.5, r"keep_count must be >= 0"), (3, 1.5, r"rate must be in \[0, 1\]")],
)
def test_custom_policy_with_a_bad_decision_is_refused(models, keep, rate, match):
    class Bad(FastV):
        def decide(self, stats):
            if stats.step < 2:
                return super().decide(stats)
            n = stats.num_image.shape[0]
            return Decision(torch.full((n,), keep), torch.full((n,), rate))

    with pytest.raises(ValueError, match=f"Bad.decide: Decision.{match}"):
        run(models(2, "eager"), prompts(2), Bad(2, 0.5))


def test_bad_input_errors(models):
    model = models(2, "eager")
    p = prompts(2)
    ids, mask, px = p.input_ids, p.attention_mask, p.pixel_values

    no_image = ids.clone()
    no_image[1][no_image[1] == IMAGE_TOKEN] = 5
    with pytest.raises(ValueError, match=r"no image token .* sample\(s\) \[1\]"):
        generate(model, no_image, px, mask)
    with pytest.raises(ValueError, match="image features and image tokens do not match"):
        generate(model, ids, px[:1], mask)
    fewer = ids.clone()
    fewer[0][(fewer[0] == IMAGE_TOKEN).nonzero()[0]] = 5
    with pytest.raises(ValueError, match="do not match: the prompts hold 127 image tokens"):
        generate(model, fewer, px, mask)
    ends = torch.cat([ids, torch.full((2, 1), IMAGE_TOKEN)], 1)
    with pytest.raises(ValueError, match="ends with an image token"):
        generate(model, ends, px, torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1))
    right = torch.flip(mask, dims=[1])
    with pytest.raises(ValueError, match="not left-padded"):
        generate(model, ids, px, right)

    for bad in (
        FastV(0, 0.5),
        FastV(NUM_LAYERS, 0.5),
        VTW(-1),
        AttentionMass(0.5, NUM_LAYERS + 3),
        DyRate(RatePredictor(NUM_HEADS, 3), 0),
    ):
        with pytest.raises(ValueError, match="out of range"):
            generate(model, ids, px, mask, policy=bad)
    with pytest.raises(ValueError, match="out of range"):
        generate(model, ids, px, mask, policy=NoPrune(scoring_layer=NUM_LAYERS))
    with pytest.raises(
        ValueError, match=r"predictor takes 24 inputs \(6 heads x 4 types\).* 4 heads x 4 = 16"
    ):
        generate(model, ids, px, mask, policy=DyRate(RatePredictor(6, 3), 2))
    with pytest.raises(ValueError, match="num_rates = 5 but the predictor has 3"):
        DyRate(RatePredictor(NUM_HEADS, 3), 2, num_rates=5)

    with pytest.raises(TypeError, match=r"supports transformers\.LlavaForConditionalGeneration"):
        generate(model.model.language_model, ids, px, mask)
    with pytest.raises(TypeError, match=r"supports transformers\.LlavaForConditionalGeneration"):
        generate(torch.nn.Linear(2, 2), ids, px, mask)

    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, px, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, px, mask, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, px, mask, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_features"):
        generate(model, ids, None, mask)


def test_unsupported_text_model():
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        MistralConfig,
    )

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
    )
    text = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=200,
    )
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    ).eval()
    p = prompts(1)
    with pytest.raises(TypeError, match="unsupported LLaVA text model 'mistral'"):
        generate(model, p.input_ids, p.pixel_values, p.attention_mask)


def test_precomputed_image_features(models):
    model = models(2, "eager")
    p = prompts(3)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=p.pixel_values, return_dict=True)
    from_pixels = run(model, p, FastV(2, 0.5))
    from_feats = generate(
        model,
        p.input_ids,
        None,
        p.attention_mask,
        image_features=feats.pooler_output,
        policy=FastV(2, 0.5),
        max_new_tokens=STEPS,
        eos_token_id=None,
    )
    assert torch.equal(from_feats.sequences, from_pixels.sequences)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llava15_sized_grid_long_generation(attn):
    """576 image tokens (LLaVA-1.5's grid), 8 layers, GQA, 48 steps: DyRate and AttentionMass
    still equal the masked reference and a batch still equals its samples."""
    model = tiny_llava(2, attn, seed=1, image_size=96, num_layers=8)
    p = prompts(3, seed=11, image_size=96)
    predictor = RatePredictor.from_image_mass(NUM_HEADS, 8, high=0.985, low=0.92)
    for make in (lambda: DyRate(predictor, 3), lambda: AttentionMass(0.9, 3)):
        out = run(model, p, make(), steps=48)
        ref = masked_reference(model, p, out, 3)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
        kept = out.trace.kept_image
        assert (kept[1:] <= kept[:-1]).all() and (kept[-1] < 576).all()
        assert len(set(kept.flatten().tolist())) > 3  # the counts really move
        for b in range(3):
            single = run(model, p.sample(b), make(), steps=48)
            assert torch.equal(single.new_tokens[0], out.new_tokens[b])
            assert torch.equal(single.trace.kept_image[:, 0], kept[:, b])
