"""Predictor training (`python -m dyrate_ext.train predictor`) on tiny random LLaVA models.

- The masked teacher-forced forward equals `dyrate_ext.llava.generate`'s logits when both take
  the same hard rate decisions (eqs. 3-6 with the never-grow rule), also with padded captions.
- eqs. 3 and 5 and the never-grow rule on a hand-worked example; straight-through
  Gumbel-Softmax; the expected FLOPs equal `dyrate_ext.flops` on one-hot decisions.
- Gradients reach only the predictor; a few steps lower the loss and are deterministic.
- The saved file's metadata round-trips; the CLI runs end to end; bad arguments fail clearly.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from llava_utils import prompts as tiny_prompts
from llava_utils import save_tiny_checkpoint, tiny_llava

from dyrate_ext.flops import DecoderShape, generation_flops
from dyrate_ext.llava import Decision, DyRate, RatePredictor, generate
from dyrate_ext.train.caption_batches import check_template
from dyrate_ext.train.gumbel import expected_flops, st_gumbel_softmax, temperature
from dyrate_ext.train.masked_forward import CaptionBatch, MaskedLlava, keep_masks, ranked_scores
from dyrate_ext.train.predictor import check_budget, train_predictor

K = 8


class Forced(DyRate):
    """DyRate replaying fixed classes [B, T] (one per step) instead of the predictor's argmax."""

    def __init__(self, classes: torch.Tensor, k: int, heads: int) -> None:
        super().__init__(RatePredictor(heads, K), k)
        self.classes = classes

    def decide(self, stats):
        cls = self.classes[:, stats.step]
        removed = torch.div(cls * stats.num_image, K, rounding_mode="floor")
        return Decision(stats.num_image - removed, cls.float() / K)


def _generated(model, k: int, steps: int = 10, seed: int = 5):
    p = tiny_prompts(3)
    classes = torch.randint(0, K, (3, steps), generator=torch.Generator().manual_seed(seed))
    out = generate(
        model,
        p.input_ids,
        p.pixel_values,
        p.attention_mask,
        policy=Forced(classes, k, 4),
        max_new_tokens=steps,
        eos_token_id=None,
        output_logits=True,
    )
    cap = out.new_tokens
    batch = CaptionBatch(p.input_ids, p.attention_mask, p.pixel_values, cap, torch.ones_like(cap))
    return out, batch, classes


@pytest.mark.parametrize(("kv_heads", "k"), [(2, 1), (2, 2), (4, 3)])
def test_masked_forward_equals_generate_with_same_decisions(kv_heads, k):
    model = tiny_llava(kv_heads=kv_heads)
    out, batch, classes = _generated(model, k)
    masked = MaskedLlava(model, k)
    prep = masked.prepare(batch)
    # The scoring statistics are the loop's (rows of one explicit softmax vs the op on q, k).
    torch.testing.assert_close(
        prep.type_mass, out.trace.type_mass.transpose(0, 1), atol=1e-5, rtol=0
    )
    y = F.one_hot(classes, K).float()
    m, kept, _ = keep_masks(prep.token_score, prep.token_type, y, prep.row_valid)
    assert torch.equal(kept, out.trace.kept_image.T)
    assert len(set(kept.flatten().tolist())) > 2  # decisions really vary
    logits = masked.upper(prep, m)
    ref = out.logits.transpose(0, 1)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    # Unpruned, the same rows differ: the test would catch a mask that does nothing.
    assert (masked.upper(prep, None) - ref).abs().max() > 1e-2

    # Right-padded captions: the valid rows keep their logits.
    short = CaptionBatch(**{**batch.__dict__})
    short.caption_mask = batch.caption_mask.clone()
    short.caption_mask[0, 6:] = 0
    short.caption_mask[2, 3:] = 0
    p2 = masked.prepare(short)
    m2, kept2, _ = keep_masks(p2.token_score, p2.token_type, y, p2.row_valid)
    got = masked.upper(p2, m2)
    valid = p2.row_valid
    torch.testing.assert_close(got[valid], ref[valid], atol=1e-4, rtol=0)
    assert torch.equal(kept2[valid], kept[valid])


def test_keep_masks_hand_worked():
    # One sample: slots [sys, img a, img b, img c, img d, ins, res]; n = 4 image tokens.
    types = torch.tensor([[0, 1, 1, 1, 1, 2, 3]], dtype=torch.int8)
    score = torch.tensor(
        [
            [[0.1, 0.4, 0.1, 0.3, 0.2, 0.0, 0.0]],  # step 0: image order a, c, d, b
            [[0.1, 0.1, 0.9, 0.2, 0.3, 0.0, 0.1]],  # step 1: b best, but b is already gone
            [[0.1, 0.5, 0.9, 0.2, 0.3, 0.0, 0.1]],  # step 2
        ]
    ).transpose(0, 1)  # [B=1, C=3, N=7]
    # K = 4: class j keeps 4 - floor(4j/4) = 4, 3, 2, 1 tokens. Steps ask 3, 0 (-> 4), 2.
    y = F.one_hot(torch.tensor([[1, 0, 2]]), 4).float().requires_grad_(True)
    valid = torch.ones(1, 3, dtype=torch.bool)
    m, kept, clamped = keep_masks(score, types, y, valid, chain=True, ranking="current")
    want = torch.tensor(
        [
            [0, 1, 0, 1, 1, 0, 0],  # step 0 keeps a, c, d (drops b, the lowest)
            [0, 1, 0, 1, 1, 0, 0],  # step 1 asks for all 4: the count never grows
            [0, 1, 0, 0, 1, 0, 0],  # step 2 keeps 2 of {a, c, d} by its scores: a, d
        ],
        dtype=torch.float32,
    )
    assert torch.equal(m[0].detach(), want)
    assert kept.tolist() == [[3, 3, 2]] and clamped.tolist() == [[False, True, False]]
    # Eq. 5: d m / d y_tj is class j's mask m^j_t (step 2, class 3 keeps the best held: a).
    m[0, 2].sum().backward()
    assert y.grad[0, 2].tolist() == [3.0, 3.0, 2.0, 1.0]
    # chain: the removals of steps 0 and 1 last until step 2, so their choices get its gradient.
    assert y.grad[0, 0].tolist() == [4.0, 3.0, 2.0, 1.0]
    assert y.grad[0, 1].tolist() == [3.0, 3.0, 2.0, 1.0]
    y.grad = None
    m, _, _ = keep_masks(score, types, y, valid, chain=False, ranking="current")
    m[0, 2].sum().backward()
    assert y.grad[0, :2].abs().sum() == 0 and y.grad[0, 2].tolist() == [3.0, 3.0, 2.0, 1.0]
    # The engines' other rankings: step 2 ranks {a, c, d} by the prefill row (a 0.4, c 0.3,
    # d 0.2: keeps a, c) or by the sums so far (a 1.0, c 0.7, d 0.8: keeps a, d).
    for ranking, step2 in (("prefill", [0, 1, 0, 1, 0, 0, 0]), ("accumulated", want[2].tolist())):
        m, kept, _ = keep_masks(score, types, y, valid, ranking=ranking)
        assert m[0, 2].tolist() == step2 and kept.tolist() == [[3, 3, 2]]
    assert torch.allclose(ranked_scores(score, "accumulated")[0, 2], score[0].sum(0))


def test_st_gumbel_softmax_and_temperature():
    logits = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y = st_gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(y.detach(), F.one_hot(y.detach().argmax(-1), 6).float())
    (y * torch.arange(6.0)).sum().backward()
    assert logits.grad.abs().sum() > 0  # the soft sample's gradient
    again = st_gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(again, y)
    forced = st_gumbel_softmax(logits, 0.5, None, forced=torch.arange(5))
    assert forced.detach().argmax(-1).tolist() == [0, 1, 2, 3, 4]
    assert temperature(0, 11, 1.0, 0.01) == pytest.approx(1.0)
    assert temperature(5, 11, 1.0, 0.01) == pytest.approx(0.1)
    assert temperature(10, 11, 1.0, 0.01) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="tau must be > 0"):
        st_gumbel_softmax(logits, 0.0)


def test_expected_flops_matches_flops_module_on_hard_decisions():
    shape = DecoderShape(6, 192, 512, 6, 2)
    g = torch.Generator().manual_seed(3)
    cls = torch.randint(0, K, (3, 9), generator=g)
    num_image = torch.tensor([64, 64, 40])
    prompt = torch.tensor([100, 90, 70])
    valid = torch.ones(3, 9, dtype=torch.bool)
    pi = F.one_hot(cls, K).double()
    got = expected_flops(shape, 2, pi, num_image, prompt, valid)
    # The loop's keep counts: n - floor(j n / K), never growing.
    asked = num_image[:, None] - torch.div(cls * num_image[:, None], K, rounding_mode="floor")
    kept = torch.cummin(asked, dim=1).values.T
    base = generation_flops(shape, prompt, num_image, num_image.expand(9, 3), None).total
    want = generation_flops(shape, prompt, num_image, kept, 2).total / base
    assert float(got) == pytest.approx(want, rel=1e-12)
    # Shorter captions: the missing steps are not counted.
    valid[1, 4:] = False
    cost, base = expected_flops(shape, 2, pi, num_image, prompt, valid, parts=True)
    kept[4:, 1] = 0  # ignored: not counted
    want_cost = sum(
        generation_flops(shape, prompt[b], num_image[b], kept[:steps, b], 2).total
        for b, steps in enumerate((9, 4, 9))
    )
    want_base = sum(
        generation_flops(shape, prompt[b], num_image[b], [int(num_image[b])] * steps, None).total
        for b, steps in enumerate((9, 4, 9))
    )
    assert float(cost) == pytest.approx(want_cost, rel=1e-12)
    assert float(base) == pytest.approx(want_base, rel=1e-12)


def _batches(n_batches: int = 2, caption: int = 8):
    out = []
    for i in range(n_batches):
        p = tiny_prompts(3, seed=10 + i)
        g = torch.Generator().manual_seed(100 + i)
        cap = torch.randint(3, 198, (3, caption), generator=g)
        mask = torch.ones_like(cap)
        mask[1, caption - 3 :] = 0
        out.append(CaptionBatch(p.input_ids, p.attention_mask, p.pixel_values, cap, mask))
    return out


def test_gradients_reach_only_the_predictor():
    model = tiny_llava(kv_heads=2)
    for p in model.parameters():
        p.requires_grad_(False)
    masked = MaskedLlava(model, 2)
    prep = masked.prepare(_batches(1)[0])
    pred = RatePredictor(4, K)
    logits = pred(prep.type_mass.flatten(0, 1)).view(*prep.targets.shape, K)
    y = st_gumbel_softmax(logits, 1.0, torch.Generator().manual_seed(0))
    m, _, _ = keep_masks(prep.token_score, prep.token_type, y, prep.row_valid)
    logp = masked.upper(prep, m).log_softmax(-1)
    loss = -logp.gather(-1, prep.targets[..., None]).mean()
    loss.backward()
    assert pred.linear.weight.grad is not None and pred.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_training_lowers_the_loss_and_is_deterministic():
    model = tiny_llava(kv_heads=2)
    batches = _batches(2)
    kw = dict(k=2, budget=0.9, epochs=4, lr=0.1, seed=3, progress=False, lam=100.0)
    a = train_predictor(model, batches, **kw)
    b = train_predictor(model, batches, **kw, recompute=True)  # same run without the cache
    for pa, pb in zip(a.predictor.parameters(), b.predictor.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    loss = [h["loss"] for h in a.history]
    assert sum(loss[-2:]) < sum(loss[:2])
    assert abs(a.history[-1]["expected_flops"] - 0.9) < abs(a.history[0]["expected_flops"] - 0.9)
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_fail_clearly():
    model = tiny_llava(kv_heads=2)
    batches = _batches(1)
    for bad in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
            check_budget(bad)
    with pytest.raises(ValueError, match=r"k = 4 is out of range: .* \[1, 3\]"):
        train_predictor(model, batches, k=4, budget=0.8, progress=False)
    with pytest.raises(ValueError, match="the initial predictor takes 6 heads x 4 types"):
        train_predictor(model, batches, k=2, budget=0.8, init=RatePredictor(6, K), progress=False)
    with pytest.raises(ValueError, match=r"budget 0.1 is below the lowest .* reachable"):
        train_predictor(model, batches, k=2, budget=0.1, progress=False)
    with pytest.raises(ValueError, match="prompt template must hold"):
        check_template("USER: {question} ASSISTANT:")


def test_metadata_round_trip(tmp_path):
    p = RatePredictor(6, K)
    path = tmp_path / "p.safetensors"
    p.save(path, metadata={"k": "2", "budget": "0.8", "model": "tiny"})
    meta = RatePredictor.metadata(path)
    assert meta["k"] == "2" and meta["budget"] == "0.8" and meta["model"] == "tiny"
    assert meta["num_rates"] == str(K) and meta["num_heads"] == "6"
    q = RatePredictor.load(path)
    torch.testing.assert_close(q.linear.weight, p.linear.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="reserved"):
        p.save(path, metadata={"num_rates": "3"})
    with pytest.raises(ValueError, match="must be strings"):
        p.save(path, metadata={"k": 2})


def test_train_predictor_cli_smoke(tmp_path):
    from dyrate_ext.train.predictor import main

    save_tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "pred.safetensors"
    common = ["--model", str(tmp_path / "m"), "--limit", "4", "--batch-size", "2", "--quiet"]
    args = [*common, "--val-limit", "2", "--epochs", "1", "--max-caption-tokens", "12"]
    assert (
        main([*args, "--budget", "0.95", "--k", "1", "--max-new-tokens", "6", "--out", str(out)])
        == 0
    )
    meta = RatePredictor.metadata(out)
    assert (meta["k"], meta["budget"], meta["num_rates"], meta["model"]) == ("1", "0.95", "8", "m")
    assert RatePredictor.load(out).num_heads == 4
    log = json.loads(out.with_suffix(".json").read_text())
    assert 0 < log["val_generated"]["flops_percent"] <= 100.0
    with pytest.raises(ValueError, match=r"--k 3 is out of range \[1, 2\]"):
        main([*common, "--budget", "0.9", "--k", "3", "--out", str(out)])
    with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
        main([*common, "--budget", "1.2", "--out", str(out)])


def test_greedy_targets_are_the_unpruned_models_captions():
    from dyrate_ext.train.caption_batches import greedy_targets

    model = tiny_llava(kv_heads=2)
    model.generation_config.eos_token_id = 72  # a token the random model emits (sample 0)
    batch = _batches(1)[0]
    (g,) = greedy_targets(model, [batch], max_new_tokens=12, progress=False)
    stops = (g.caption_ids == 72) & g.caption_mask.bool()
    assert (stops.sum(dim=1) <= 1).all()  # at most one stop token inside the mask
    assert (g.caption_mask.sum(dim=1) < 12).any()  # some caption really stopped early
    masked = MaskedLlava(model, 2)
    prep = masked.prepare(g)
    teacher = masked.upper(prep, None).argmax(-1)
    assert torch.equal(teacher[prep.row_valid], g.caption_ids[prep.row_valid])
