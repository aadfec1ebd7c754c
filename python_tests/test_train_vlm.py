"""The tiny-LLaVA trainer: loss falls, runs are bit-identical, checkpoints round-trip."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

pytest.importorskip("transformers")

from dyrate_ext.train.__main__ import main as train_main
from dyrate_ext.train.model import (
    CHECKPOINTS,
    LARGE,
    MICRO,
    SIZES,
    build_tiny_processor,
    build_tiny_tokenizer,
    load_tiny_llava,
    picture_settings,
    resolve_checkpoint,
    tiny_llava,
    tiny_prompt,
)
from dyrate_ext.train.vlm import IGNORE, Batcher, TrainConfig, train_vlm

TINY = MICRO


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=4, lr=5e-3, warmup=2, val_samples=4, val_every=6, model=TINY)
    return TrainConfig(**{**base, **kw})


def test_batch_masks_the_prompt_and_pads_right():
    tok = build_tiny_tokenizer()
    proc = build_tiny_processor(tok, TINY)
    batch = Batcher(proc, TINY, 100, 0.5).batch(random.Random(0), 3)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ((ids == image_id).sum(dim=1) == TINY.image_tokens).all()
    for b in range(3):
        n = int(mask[b].sum())
        assert mask[b, :n].all() and not mask[b, n:].any()  # right padding
        scored = labels[b] != IGNORE
        assert int(ids[b, n - 1]) == tok.eos_token_id and scored[n - 1]
        assert not scored[: int((ids[b] == image_id).nonzero().max()) + 1].any()
        assert (labels[b, scored] == ids[b, scored]).all()
        assert tok.unk_token_id not in ids[b, :n].tolist()  # the grammar is in the vocabulary


def test_loss_falls_and_runs_are_bit_identical(tmp_path):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    a = train_vlm(_cfg(), out=tmp_path / "ckpt", progress=False)
    b = train_vlm(_cfg(), progress=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)
    assert a.losses == b.losses
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    fresh = tiny_llava(TINY, build_tiny_tokenizer()).model.vision_tower.state_dict()
    for name, p in a.model.model.vision_tower.state_dict().items():
        assert torch.equal(p, fresh[name]), name  # the vision tower stays frozen by default
    first, last = sum(a.losses[:3]) / 3, sum(a.losses[-3:]) / 3
    assert last < first - 0.3, a.losses
    other = train_vlm(_cfg(seed=1, steps=2), progress=False)
    assert other.losses[0] != a.losses[0]
    resumed = train_vlm(_cfg(steps=1, init=str(tmp_path / "ckpt")), progress=False)
    assert resumed.losses[0] < first - 0.3  # starts from the trained weights
    # the saved checkpoint loads with from_pretrained and gives the same logits (float16 weights)
    model, proc, tok = load_tiny_llava(tmp_path / "ckpt")
    log = json.loads((tmp_path / "ckpt" / "train_log.json").read_text())
    assert log["steps_done"] == 12 and len(log["loss"]) == 12
    assert [s for s, _ in log["val_loss"]] == [6, 12]
    image = torch.zeros(1, 3, 28, 28)
    ids = proc(
        text=[tiny_prompt("Describe the image in detail.")],
        return_tensors="pt",
        images=[torch.zeros(3, 28, 28)],
    )["input_ids"]
    with torch.no_grad():
        ref = a.model(input_ids=ids, pixel_values=image).logits
        got = model(input_ids=ids, pixel_values=image).logits
    assert torch.allclose(ref, got, atol=0.05, rtol=0.05)


def test_sizes_and_their_pictures(tmp_path):
    """The large tiny LLaVA is in the paper's regime (>= 256 image tokens, >= 85 % of the
    prompt, >= 8 layers); its object scale travels with the checkpoint to every user."""
    assert SIZES["large"] is LARGE and LARGE.image_tokens >= 256 and LARGE.num_layers >= 8
    tok = build_tiny_tokenizer()
    proc = build_tiny_processor(tok, LARGE)
    ids = Batcher(proc, LARGE, 10, 0.0).prompt_ids["redundant"]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == LARGE.image_tokens and ids.count(image_id) / len(ids) >= 0.85
    assert resolve_checkpoint("large") == CHECKPOINTS["large"]
    assert resolve_checkpoint(None) == resolve_checkpoint("small") == CHECKPOINTS["small"]
    assert resolve_checkpoint(str(tmp_path)) == tmp_path
    small_pictures = dataclasses.replace(TINY, object_scale=0.5)
    train_vlm(_cfg(steps=1, val_every=0, model=small_pictures), out=tmp_path / "c", progress=False)
    assert picture_settings(load_tiny_llava(tmp_path / "c")[0]) == (TINY.image_size, 0.5)
    assert picture_settings(load_tiny_llava("small")[0]) == (112, 1.0)  # older config.json


def test_cli_dispatch(tmp_path, capsys):
    assert train_main([]) == 2
    assert train_main(["nope"]) == 2
    assert "vlm" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps"):
        train_vlm(_cfg(steps=0), progress=False)
