"""Picture features as extra RatePredictor inputs (`dyrate_ext.picture_features`, beyond the paper).

- `image_score_features` equals a float64 loop reference on random scores with padding, other
  slot types and a different number of image tokens per sample (also batched over steps), its
  degenerate values, no host synchronisation (it runs on the meta device), clear errors.
- RatePredictor with features: shapes, `extra` checks, the safetensors round trip keeps them,
  a file without the key (the committed ones included) loads with none.
- DyRate passes them: its decisions are the predictor's on `image_score_features`, they differ
  between samples where a predictor ignoring its features would decide one class.
- Training sees what inference sees: the masked forward's argmax decisions on `step_inputs`
  equal `dyrate_ext.llava.generate`'s with the same predictor (plain and with features), and
  so do the kept counts and the logits; the standardisation folds; a few-step CLI run with
  `--features` and K = 32 (the hf engine against the loop: `test_hf_llava`'s POLICIES).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from llava_utils import picture_predictor, save_tiny_checkpoint, tiny_llava
from llava_utils import prompts as tiny_prompts

from dyrate_ext.llava import DyRate, RatePredictor, StepStats, generate
from dyrate_ext.picture_features import PICTURE_FEATURES, image_score_features
from dyrate_ext.token_types import TokenType
from dyrate_ext.train.masked_forward import CaptionBatch, MaskedLlava, keep_masks
from dyrate_ext.train.objective import fastv_init, predictor_logits, step_inputs
from dyrate_ext.train.predictor_train import _fold, _init_predictor

ASSETS = Path(__file__).resolve().parents[1] / "dyrate_ext" / "assets" / "tiny_llava"


def reference(scores: list[float], types: list[int]) -> tuple[float, float]:
    """(image_entropy, image_top_mass) of one row, in float64 plain Python."""
    s = [max(float(v), 0.0) for v, t in zip(scores, types, strict=True) if t == TokenType.IMAGE]
    n, total = len(s), sum(s)
    if total == 0:
        return 0.0, 1.0
    ent = 0.0 if n <= 1 else -sum(v / total * math.log(v / total) for v in s if v > 0)
    top = sum(sorted(s, reverse=True)[: math.ceil(n / 4)]) / total
    return (ent / math.log(n) if n > 1 else 0.0), top


def random_rows(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores float32 [8, 48] and types int8 [8, 48]: 0, 1, 2, 5, 13, 30, 40 image tokens at
    random slots among padding, text and response slots, one row with all-zero image scores,
    some zero image scores."""
    counts = [0, 1, 2, 5, 13, 30, 40, 6]
    types = torch.randint(-1, 4, (8, 48), generator=gen).to(torch.int8)
    types[types == TokenType.IMAGE] = TokenType.INSTRUCTION
    for b, n in enumerate(counts):
        types[b, torch.randperm(48, generator=gen)[:n]] = TokenType.IMAGE
    scores = torch.rand(8, 48, generator=gen) ** 3
    scores[4, :10] = 0.0
    scores[7] = torch.where(types[7] == TokenType.IMAGE, 0.0, scores[7])
    return scores, types


def test_features_match_a_loop_reference(gen):
    scores, types = random_rows(gen)
    got = image_score_features(scores, types, PICTURE_FEATURES)
    assert got.dtype == torch.float32 and got.shape == (8, 2)
    want = torch.tensor([reference(s, t) for s, t in zip(scores.tolist(), types.tolist())])
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    assert len({round(v, 3) for v in want[3:7, 0].tolist()}) == 4  # real, varied values
    # The order of names is the order of columns; no names give [B, 0].
    swapped = image_score_features(scores, types, ("image_top_mass", "image_entropy"))
    assert torch.equal(swapped, got.flip(-1))
    assert image_score_features(scores, types, ()).shape == (8, 0)
    # Batched over steps as training calls it: scores [B, C, N], types [B, 1, N].
    steps = torch.stack([scores, scores.flip(0).roll(3, dims=1)], dim=1)  # [8, 2, 48]
    batched = image_score_features(steps, types[:, None], PICTURE_FEATURES)
    for c in range(2):
        torch.testing.assert_close(
            batched[:, c], image_score_features(steps[:, c], types, PICTURE_FEATURES)
        )


def test_degenerate_and_hand_worked_values():
    img, txt = int(TokenType.IMAGE), int(TokenType.INSTRUCTION)
    rows = [
        ([0.3, 0.5, 0.2], [txt, txt, txt]),  # no image token
        ([0.3, 0.5, 0.2], [txt, img, txt]),  # one
        ([0.0, 0.0, 0.9], [img, img, txt]),  # image mass 0
        ([0.1] * 8, [img] * 8),  # flat over 8: entropy 1, top 2 of 8
        ([0.0] * 7 + [0.4], [img] * 8),  # all on one token
        ([0.2] * 5 + [0.0] * 3, [img] * 5 + [-1] * 3),  # flat over 5: top ceil(5/4) = 2 of 5
    ]
    # Padded to 8 slots with EMPTY slots whose (nonsense) score 0.7 must not count.
    scores = torch.tensor([r[0] + [0.7] * (8 - len(r[0])) for r in rows])
    types = torch.tensor([r[1] + [-1] * (8 - len(r[1])) for r in rows], dtype=torch.int8)
    got = image_score_features(scores, types, PICTURE_FEATURES)
    want = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0.25], [0, 1], [1, 0.4]])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_no_host_sync_and_bad_names():
    # On the meta device any host synchronisation (.item(), bool(), nonzero) would raise.
    meta = image_score_features(
        torch.empty(3, 2, 10, device="meta"),
        torch.empty(3, 1, 10, dtype=torch.int8, device="meta"),
        PICTURE_FEATURES,
    )
    assert meta.shape == (3, 2, 2) and meta.device.type == "meta"
    s, t = torch.rand(2, 5), torch.ones(2, 5, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"'image_mean'.*image_entropy, image_top_mass"):
        image_score_features(s, t, ("image_entropy", "image_mean"))
    with pytest.raises(ValueError, match="more than once"):
        image_score_features(s, t, ("image_entropy", "image_entropy"))
    with pytest.raises(ValueError, match="unknown picture feature 'x'"):
        RatePredictor(4, 8, features=("x",))


# ---- RatePredictor ----------------------------------------------------------------------------


def test_predictor_with_features_forward_and_errors(gen):
    torch.manual_seed(0)
    p = RatePredictor(4, 8, features=PICTURE_FEATURES)
    assert p.in_features == 18 and p.features == PICTURE_FEATURES
    assert "features=('image_entropy', 'image_top_mass')" in repr(p)
    assert "features=" not in RatePredictor(4, 8).extra_repr()
    mass, extra = torch.rand(3, 4, 4, generator=gen), torch.rand(3, 2, generator=gen)
    logits = p(mass, extra)
    assert logits.shape == (3, 8)
    torch.testing.assert_close(p(mass.flatten(1), extra), logits)
    w, b = p.linear.weight, p.linear.bias
    torch.testing.assert_close(logits, torch.cat([mass.flatten(1), extra], 1) @ w.T + b)
    assert not torch.allclose(p(mass, extra + 1), logits)  # the features count
    assert torch.equal(p.predict(mass, extra), logits.argmax(-1))
    for bad in (None, torch.rand(3, 3), torch.rand(2, 2), torch.rand(3, 2, 1)):
        with pytest.raises(ValueError, match=r"needs extra \[B, F\] = \(3, 2\)"):
            p(mass, bad)
    with pytest.raises(ValueError, match="no picture features but got extra"):
        RatePredictor(4, 8)(mass, extra)
    with pytest.raises(ValueError, match=r"expects type mass \[B, 4, 4\] \(or \[B, 16\]\)"):
        p(torch.rand(3, 18), None)


def test_save_load_keeps_features_and_old_files_load_without(tmp_path, gen):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    p = RatePredictor(4, 8, features=("image_top_mass",))
    p.save(tmp_path / "f.safetensors", metadata={"k": "2"})
    meta = RatePredictor.metadata(tmp_path / "f.safetensors")
    assert meta["features"] == "image_top_mass" and meta["k"] == "2"
    q = RatePredictor.load(tmp_path / "f.safetensors")
    assert q.features == ("image_top_mass",)
    mass, extra = torch.rand(5, 4, 4, generator=gen), torch.rand(5, 1, generator=gen)
    assert torch.equal(q(mass, extra), p(mass, extra))
    with pytest.raises(ValueError, match="reserved"):
        p.save(tmp_path / "g.safetensors", metadata={"features": ""})
    # Without features the key is not written, and a file without it has none.
    RatePredictor(4, 8).save(tmp_path / "plain.safetensors")
    assert "features" not in RatePredictor.metadata(tmp_path / "plain.safetensors")
    old = RatePredictor(6, 3)
    old_meta = {"format": "dyrate.RatePredictor/1", "num_heads": "6", "num_rates": "3"}
    tensors = {k: v.contiguous() for k, v in old.state_dict().items()}
    save_file(tensors, str(tmp_path / "old.safetensors"), {**old_meta, "num_types": "4"})
    loaded = RatePredictor.load(tmp_path / "old.safetensors")
    assert loaded.features == () and loaded.in_features == 24
    x = torch.rand(4, 6, 4, generator=gen)
    assert torch.equal(loaded(x), old(x))
    committed = sorted(ASSETS.glob("predictor_*.safetensors"))
    assert len(committed) == 6
    for path in committed:  # the picture predictor has them, the others (older ones) none
        want = ("image_entropy", "image_top_mass") if "picture" in path.name else ()
        assert ("features" in RatePredictor.metadata(path)) == bool(want)
        assert RatePredictor.load(path).features == want


# ---- DyRate ----------------------------------------------------------------------------------


def _stats(token_score: torch.Tensor, token_type: torch.Tensor) -> StepStats:
    num_image = (token_type == TokenType.IMAGE).sum(1)
    mass = torch.full((token_score.shape[0], 4, 4), 0.25)
    return StepStats(0, mass, token_score, token_type, num_image, num_image.clone())


@pytest.mark.parametrize("num_rates", [4, 32])
def test_dyrate_decides_on_the_features(num_rates):
    # 3 samples, 32 image tokens each (at different slots), one text slot, padding: the image
    # scores flat (top-quarter mass 0.25), one-hot (1) and in between.
    types = torch.full((3, 40), int(TokenType.EMPTY), dtype=torch.int8)
    scores = torch.zeros(3, 40)
    for b, start in enumerate((0, 3, 7)):
        types[b, start : start + 32] = TokenType.IMAGE
        types[b, start + 32] = TokenType.INSTRUCTION
        scores[b, start + 32] = 0.5
    scores[0, :32] = 1 / 64
    scores[1, 3] = 0.5
    scores[2, 7:39] = torch.linspace(0.001, 0.05, 32)
    stats = _stats(scores, types)
    pred = picture_predictor(4, num_rates, low=0.25, high=1.0)
    got = DyRate(pred, 2).decide(stats)
    assert got is not None
    extra = image_score_features(scores, types, PICTURE_FEATURES)
    want = pred.predict(stats.type_mass, extra)
    assert torch.equal(got.rate, want.float() / num_rates)
    assert want[0] == 0 and want[1] == num_rates - 1 and 0 < want[2] < num_rates - 1
    assert torch.equal(got.keep_count, 32 - torch.div(want * 32, num_rates, rounding_mode="floor"))
    with pytest.raises(ValueError, match=r"takes 18 inputs \(4 heads x 4 types \+ 2 picture"):
        DyRate(pred, 2).validate(4, 6)


# ---- training sees what inference sees ---------------------------------------------------------


PREDICTORS = {
    "plain": lambda: RatePredictor.from_image_mass(4, 4, high=0.9, low=0.75),
    "features": lambda: picture_predictor(4, 4),
}


@pytest.mark.parametrize("name", list(PREDICTORS))
def test_masked_forward_decides_as_generate(name):
    model = tiny_llava(kv_heads=2)
    p = tiny_prompts(3)
    pred = PREDICTORS[name]()
    out = generate(
        model, p.input_ids, p.pixel_values, p.attention_mask, policy=DyRate(pred, 2),
        max_new_tokens=10, eos_token_id=None, output_logits=True,
    )  # fmt: skip
    cap = out.new_tokens
    masked = MaskedLlava(model, 2)
    batch = CaptionBatch(p.input_ids, p.attention_mask, p.pixel_values, cap, torch.ones_like(cap))
    prep = masked.prepare(batch)
    cls = predictor_logits(pred, step_inputs(prep, pred.features)).argmax(-1)  # [B, C]
    assert torch.equal(cls, (out.trace.rate.T * 4).round().long())
    assert len(set(cls.flatten().tolist())) > 1
    if name == "features":
        assert len(set(cls[:, 0].tolist())) > 1  # the prefill's decision depends on the picture
    y = F.one_hot(cls, 4).float()
    m, kept, _ = keep_masks(prep.token_score, prep.token_type, y, prep.row_valid)
    assert torch.equal(kept, out.trace.kept_image.T)
    ref = out.logits.transpose(0, 1)
    torch.testing.assert_close(masked.upper(prep, m), ref, atol=1e-4, rtol=0)


def test_fold_and_init_with_features(gen):
    torch.manual_seed(2)
    pred = RatePredictor(4, 8, features=PICTURE_FEATURES)
    mean, std = torch.rand(18, generator=gen), torch.rand(18, generator=gen) + 0.1
    x = torch.rand(6, 18, generator=gen)
    folded = _fold(pred, mean, std)
    assert folded.features == PICTURE_FEATURES
    z = (x - mean) / std
    torch.testing.assert_close(folded(x[:, :16], x[:, 16:]), pred(z[:, :16], z[:, 16:]))
    start = _init_predictor(4, 8, fastv_init(4, 8, 4, 2.0), PICTURE_FEATURES)
    assert start.features == PICTURE_FEATURES and (start.linear.weight == 0).all()
    assert (start.predict(x[:, :16], x[:, 16:] * 100) == 4).all()
    with pytest.raises(ValueError, match="has picture features"):
        _init_predictor(4, 8, RatePredictor(4, 8, features=("image_entropy",)), PICTURE_FEATURES)


@pytest.mark.parametrize("init", [[], ["--init", "fastv:0.5"]])
def test_train_cli_with_features_and_32_rates(tmp_path, init):
    from dyrate_ext.train.predictor import main

    model = save_tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "pred.safetensors"
    args = ["--model", str(model), "--limit", "4", "--batch-size", "2", "--quiet", "--k", "1"]
    args += ["--epochs", "1", "--max-caption-tokens", "10", "--max-new-tokens", "6"]
    args += ["--val-limit", "2" if init else "0", "--num-rates", "32", "--budget", "0.95"]
    with pytest.raises(ValueError, match="unknown picture feature 'entropy'"):
        main([*args, "--out", str(out), "--features", "entropy"])
    feats = ["--features", "image_entropy, image_top_mass"]
    assert main([*args, "--out", str(out), *feats, *init]) == 0
    meta = RatePredictor.metadata(out)
    assert (meta["features"], meta["num_rates"]) == ("image_entropy,image_top_mass", "32")
    pred = RatePredictor.load(out)
    assert pred.features == PICTURE_FEATURES and pred.in_features == 4 * 4 + 2
    log = json.loads(out.with_suffix(".json").read_text())
    assert len(log["history"]) == 2
    if init:  # DyRate ran with it (generate, K = 32); it starts as FastV(0.5)
        assert 0 < log["val_generated"]["flops_percent"] <= 100.0
        start = log["train_objective"]["start"]["argmax"]
        assert start["mean_kept"] == pytest.approx(log["val_generated"]["num_image"] / 2)
