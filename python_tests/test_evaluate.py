"""Evaluation: CIDEr / BLEU-4 / facts on known cases, FLOPs accounting, the CLI's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("pycocoevalcap")

from dyrate_ext.costs import CURRENCIES
from dyrate_ext.data import export_coco, load_split
from dyrate_ext.data.scenes import Scene, SceneObject
from dyrate_ext.evaluate import bleu4, cider, coco_tokenize, facts
from dyrate_ext.evaluate.__main__ import main as evaluate_main
from dyrate_ext.evaluate.report import pareto_paths, rows_by_set
from dyrate_ext.evaluate.runner import CURRENCY_FIELDS, embedded_set
from dyrate_ext.evaluate.specs import (
    BEST_PREDICTOR,
    best_predictor,
    find_predictors,
    predictor_specs,
)
from dyrate_ext.predictor import RatePredictor
from dyrate_ext.train.model import CHECKPOINTS, MICRO
from dyrate_ext.train.vlm import TrainConfig, train_vlm

TINY = MICRO


def test_tokenizer_drops_punctuation():
    assert coco_tokenize("The Red circle, at the TOP left.") == "the red circle at the top left"


def test_cider_of_references_high_of_shuffled_low():
    samples = load_split("val", n=40)
    refs = {s.image_id: s.captions[1:] for s in samples}
    own = {s.image_id: s.captions[0] for s in samples}
    ids = list(own)
    perm = ids[1:] + ids[:1]
    shuffled = {i: own[j] for i, j in zip(ids, perm)}
    high, per_image = cider(refs, own)
    low, _ = cider(refs, shuffled)
    assert high > 150 and low < high / 2, (high, low)
    assert set(per_image) == set(ids)
    assert bleu4(refs, own) > 2 * bleu4(refs, shuffled)
    assert bleu4({1: ["a red circle on the left side"]}, {1: "a red circle on the left side"}) == (
        pytest.approx(100.0)
    )
    with pytest.raises(ValueError, match="no references"):
        cider({}, {5: "a caption"})


def test_fact_precision_recall_on_hand_made_captions():
    scene = Scene(
        0,
        (SceneObject("circle", "red", "small", 0), SceneObject("star", "blue", "large", 8)),
        "white",
        "none",
        0,
    )
    hyps = {
        1: "a red circle at the top left and a blue star at the bottom right.",  # 4/4 right
        2: "a red circle at the bottom and a green square in the middle.",  # 1 of 4 right
    }
    fs = facts(hyps, {1: scene, 2: scene})
    assert (fs.correct, fs.stated, fs.true) == (5, 8, 8)
    assert fs.precision == pytest.approx(62.5) and fs.recall == pytest.approx(62.5)
    assert facts(hyps, {}) is None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A micro LLaVA trained for 3 steps by the trainer (train + evaluate end to end) and a
    constant-rate predictor file."""
    root = tmp_path_factory.mktemp("eval")
    cfg = TrainConfig(steps=3, batch_size=2, warmup=1, val_samples=2, val_every=0, model=TINY)
    train_vlm(cfg, out=root / "model", progress=False)
    predictor = RatePredictor(num_heads=TINY.num_heads, num_rates=4)
    with torch.no_grad():
        predictor.linear.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))  # always rate 2/4
    predictor.save(root / "p.safetensors", metadata={"k": "2", "budget": "0.8"})
    return root


def test_evaluate_cli_smoke(tiny_checkpoint, tmp_path):
    out = tmp_path / "res" / "eval"
    args = ["--model", str(tiny_checkpoint / "model"), "--n", "4", "--batch-size", "3"]
    args += ["--max-new-tokens", "4", "--sweep", "small", "--styles", "redundant,dense"]
    args += ["--predictor", str(tiny_checkpoint / "p.safetensors"), "--out", str(out), "--quiet"]
    assert evaluate_main(args) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert {"date", "machine", "commit", "model"} <= doc["meta"].keys()
    tables = rows_by_set(doc)
    assert len(tables) == 2
    rows = {r["name"]: r for r in next(iter(tables.values()))}
    assert rows["NoPrune"]["flops_percent"] == pytest.approx(100.0)
    assert rows["NoPrune"]["kept_image_tokens"] == pytest.approx(TINY.image_tokens)
    assert rows["VTW(k=1)"]["kept_image_tokens"] == 0
    assert rows["VTW(k=1)"]["flops_percent"] < rows["VTW(k=2)"]["flops_percent"] < 100
    dy = rows["DyRate(k=2 budget=0.80 K=4)"]
    assert dy["kept_image_tokens"] == pytest.approx(TINY.image_tokens / 2)
    assert rows["FastV(k=2 r=0.5)"]["flops_percent"] == pytest.approx(dy["flops_percent"])
    for r in rows.values():
        assert len(r["examples"]) == 4 and 0 <= r["cider"]
        assert len(r["cider_per_image"]) == 4
        assert sum(r["cider_per_image"].values()) / 4 == pytest.approx(r["cider"])
        assert set(r["vs_fastv"]) == set(CURRENCIES)
    for field in CURRENCY_FIELDS.values():
        assert rows["NoPrune"][field] == pytest.approx(100.0), field
        assert rows["VTW(k=1)"][field] < rows["VTW(k=2)"][field] < 100, field
        assert rows["FastV(k=2 r=0.5)"][field] < 100, field
    assert doc["meta"]["currencies"]["paper_flops_percent"] == "paper-style FLOPs (reconstruction)"
    # The FastV curve's own points compare as exactly 0; VTW(k=1) is cheaper than all of it.
    # (FastV is compared at its best k, so its own k=2 row is at or below that curve.)
    for currency in CURRENCIES:
        assert rows["NoPrune"]["vs_fastv"][currency]["delta"] == 0.0, currency
        assert rows["FastV(k=2 r=0.5)"]["vs_fastv"][currency]["delta"] <= 0.0, currency
    assert rows["VTW(k=1)"]["vs_fastv"]["flops"] is None
    md = out.with_suffix(".md").read_text()
    assert "| NoPrune | 100.0 | 100.0 | 100.0 | 100.0 |" in md and "CIDEr" in md
    assert "NoPrune, blank image" in md and "paper-style" in md.lower() and "outside" in md
    for style in ("redundant", "dense"):
        for path in pareto_paths(out, style).values():
            assert Path(path).stat().st_size > 1000, path
    assert (out.parent / "eval_redundant.png").stat().st_size > 1000
    assert (out.parent / "eval_redundant_kv_read_bytes.png").stat().st_size > 1000


def test_predictors_beside_the_model_are_found(tiny_checkpoint, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(tiny_checkpoint / "model" / name, folder / name)
    assert find_predictors(folder) == []
    shutil.copy(tiny_checkpoint / "p.safetensors", folder / "dyrate_b80.safetensors")
    assert find_predictors(folder) == [str(folder / "dyrate_b80.safetensors")]
    (spec,) = predictor_specs(find_predictors(folder), default_k=3)
    assert spec.name == "DyRate(k=2 budget=0.80 K=4)" and spec.policy.k == 2
    predictor = RatePredictor.load(folder / "dyrate_b80.safetensors")
    meta = {"k": "1", "budget": "0.38", "budget_currency": "paper-flops"}
    predictor.save(folder / "dyrate_paper.safetensors", metadata=meta)
    spec = predictor_specs([str(folder / "dyrate_paper.safetensors")], default_k=3)[0]
    assert spec.name == "DyRate(k=1 budget=0.38 paper-flops K=4)" and spec.policy.k == 1


def test_best_predictor_and_unseen_split(tiny_checkpoint, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert best_predictor(folder) is None
    shutil.copy(tiny_checkpoint / "p.safetensors", folder / "dyrate_b80.safetensors")
    (folder / BEST_PREDICTOR).write_text(json.dumps({"file": "dyrate_b80.safetensors"}))
    assert best_predictor(folder) == str(folder / "dyrate_b80.safetensors")
    (folder / BEST_PREDICTOR).write_text(json.dumps({"file": "gone.safetensors"}))
    with pytest.raises(FileNotFoundError, match=r"gone\.safetensors"):
        best_predictor(folder)
    seen = embedded_set("test", 3, "dense", (56, 0.5))
    unseen = embedded_set("test", 3, "dense", (56, 0.5), base=10_000_000)
    assert "test+10000000" in unseen.name and not set(seen.image_ids) & set(unseen.image_ids)
    assert seen.load_image(seen.image_ids[0]).size == (56, 56)


@pytest.mark.parametrize("size", sorted(CHECKPOINTS))
def test_committed_models_name_their_best_predictor(size):
    """The demo runs each committed model's best predictor: the note names a committed file
    trained for that model, and says why."""
    folder = Path(CHECKPOINTS[size])
    path = best_predictor(folder)
    assert path is not None and path in find_predictors(folder)
    assert len(json.loads((folder / BEST_PREDICTOR).read_text())["why"]) > 40
    assert RatePredictor.metadata(path)["model"] == folder.name


def test_cli_on_a_coco_caption_set(tiny_checkpoint, tmp_path):
    export_coco(load_split("test", n=3, style="dense"), tmp_path / "coco")
    out = tmp_path / "coco_eval"
    args = ["--model", str(tiny_checkpoint / "model"), "--data", str(tmp_path / "coco")]
    args += ["--max-new-tokens", "3", "--sweep", "small", "--no-folder-predictors", "--quiet"]
    assert evaluate_main([*args, "--out", str(out)]) == 0
    ((name, rows),) = rows_by_set(json.loads(out.with_suffix(".json").read_text())).items()
    assert name.startswith(str(tmp_path / "coco")) and name.endswith("dense")
    assert {r["name"] for r in rows} >= {"NoPrune", "VTW(k=1)", "FastV(k=2 r=0.5)"}
    assert not any(r["family"] == "DyRate" for r in rows)
    assert all(len(r["examples"]) == 3 for r in rows)
