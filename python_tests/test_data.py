"""The procedural caption data: determinism, splits, caption lengths and styles, facts, COCO."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dyrate_ext.data import (
    PROMPTS,
    STYLES,
    caption_facts,
    caption_words,
    captions,
    export_coco,
    fact_scores,
    load_coco,
    load_split,
    make_scene,
    render,
    scene_facts,
    scene_id,
)
from dyrate_ext.data.captions import MAX_WORDS, MIN_WORDS
from dyrate_ext.data.scenes import CELL_NAMES, Scene, SceneObject


def test_scenes_and_pixels_are_deterministic():
    a, b = make_scene(123), make_scene(123)
    assert a == b
    assert np.array_equal(np.asarray(render(a, 64)), np.asarray(render(b, 64)))
    assert make_scene(124) != a
    assert captions(a, "redundant") == captions(b, "redundant")


def test_scene_constraints():
    for seed in range(200):
        s = make_scene(seed)
        assert 1 <= len(s.objects) <= 4
        cells = [o.cell for o in s.objects]
        assert cells == sorted(set(cells))  # distinct cells in reading order
        assert len({(o.color, o.shape) for o in s.objects}) == len(s.objects)
        assert Scene.from_dict(s.to_dict()) == s


def test_object_colour_is_where_the_scene_says():
    obj = SceneObject("square", "blue", "large", cell=8)
    scene = Scene(0, (obj,), "white", "none", 0)
    img = np.asarray(render(scene, 96)).astype(int)
    assert tuple(img[80, 80]) == pytest.approx((40, 80, 220), abs=3)  # bottom right
    assert tuple(img[15, 15]) == (245, 245, 245)  # background at the top left


def test_object_scale_shrinks_objects_not_places():
    """render(object_scale=0.5) draws each object at half the radius (about a quarter of the
    pixels) at the same place; the large model's pictures are mostly background."""
    obj = SceneObject("circle", "red", "large", cell=4)
    scene = Scene(0, (obj,), "white", "none", 0)
    full, half = (np.asarray(render(scene, 224, s)).astype(int) for s in (1.0, 0.5))
    red = [int((np.abs(im - (220, 40, 40)).sum(axis=2) < 30).sum()) for im in (full, half)]
    assert 0.2 < red[1] / red[0] < 0.3, red
    assert tuple(half[112, 112]) == pytest.approx((220, 40, 40), abs=3)  # still at the centre
    sample = load_split("test", n=1, image_size=64, object_scale=0.5)[0]
    assert np.array_equal(
        np.asarray(sample.load_image()), np.asarray(render(sample.scene, 64, 0.5))
    )
    with pytest.raises(ValueError, match="object_scale"):
        render(scene, 64, 0.0)


def test_splits_disjoint_and_fixed():
    ids = {split: {scene_id(split, i) for i in range(300)} for split in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    test = load_split("test", n=30)
    assert [s.image_id for s in test] == [scene_id("test", i) for i in range(30)]
    train = {
        tuple(map(tuple, np.asarray(s.load_image())[::16, ::16, 0]))
        for s in load_split("train", n=30)
    }
    assert not train & {tuple(map(tuple, np.asarray(s.load_image())[::16, ::16, 0])) for s in test}
    with pytest.raises(ValueError, match="split"):
        scene_id("dev", 0)


@pytest.mark.parametrize("style", STYLES)
def test_caption_lengths_references_and_truth(style):
    for s in load_split("val", n=60, style=style):
        assert len(s.captions) >= 3
        assert len(set(s.captions)) >= 3
        for c in s.captions:
            assert MIN_WORDS <= len(caption_words(c)) <= MAX_WORDS
            correct, stated, true = fact_scores(c, s.scene)
            assert correct == stated == true  # references state every fact, all true
        assert s.prompt == PROMPTS[style]


def test_redundant_has_text_predictable_parts_dense_does_not():
    scene = make_scene(7)
    red = " ".join(captions(scene, "redundant", 5))
    dense = " ".join(captions(scene, "dense", 5))
    assert any(p in red for p in ("in total", "that makes", "simple picture", "nothing else is"))
    assert "in total" not in dense and "simple picture" not in dense
    with pytest.raises(ValueError, match="style"):
        captions(scene, "short")


def test_caption_facts_on_hand_made_captions():
    scene = Scene(
        0,
        (SceneObject("circle", "red", "small", 0), SceneObject("square", "blue", "large", 4)),
        "white",
        "none",
        0,
    )
    assert CELL_NAMES[0] == "top left"
    good = "a small red circle at the top left and a big blue square in the middle."
    assert caption_facts(good) == scene_facts(scene)
    assert fact_scores(good, scene) == (4, 4, 4)
    # wrong place for the circle, a hallucinated green star, the square not mentioned
    bad = "a red circle on the right. a green star at the bottom."
    assert caption_facts(bad) == {
        ("object", "red", "circle"),
        ("place", "red", "circle", 5),
        ("object", "green", "star"),
        ("place", "green", "star", 7),
    }
    assert fact_scores(bad, scene) == (1, 4, 4)
    assert fact_scores("the picture is simple.", scene) == (0, 0, 4)


def test_coco_export_round_trip(tmp_path):
    samples = load_split("test", n=4, style="dense")
    path = export_coco(samples, tmp_path / "set")
    doc = json.loads(path.read_text())
    assert {"images", "annotations", "info"} <= doc.keys()
    assert len(doc["annotations"]) == sum(len(s.captions) for s in samples)
    data = load_coco(tmp_path / "set")
    assert data.image_ids == [s.image_id for s in samples]
    assert data.style == "dense" and data.prompt == PROMPTS["dense"]
    for s in samples:
        assert data.refs[s.image_id] == s.captions
        assert data.scenes[s.image_id] == s.scene
        assert np.array_equal(np.asarray(data.image(s.image_id)), np.asarray(s.load_image()))
    assert not list((tmp_path / "set").glob("*.tmp"))
    # a plain COCO file (no scene, no info) loads too
    for im in doc["images"]:
        del im["scene"]
    del doc["info"]
    (tmp_path / "plain.json").write_text(json.dumps(doc))
    (tmp_path / "images").symlink_to(tmp_path / "set" / "images")
    plain = load_coco(tmp_path / "plain.json")
    assert not plain.scenes and plain.style == "external"
    assert plain.image(samples[0].image_id).size == (112, 112)


def test_export_rejects_mixed_styles(tmp_path):
    mixed = load_split("test", n=1) + load_split("test", n=1, style="dense")
    with pytest.raises(ValueError, match="mix styles"):
        export_coco(mixed, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_coco(tmp_path / "nothing")


def test_longest_scenes_fit_in_every_paraphrase():
    corners = ((0, "purple", "triangle"), (2, "orange", "diamond"), (6, "yellow", "triangle"))
    objects = [SceneObject(shape, color, "small", cell) for cell, color, shape in corners]
    scene = Scene(0, (*objects, SceneObject("diamond", "purple", "large", 8)), "black", "lines", 0)
    for seed in range(40):
        for style in STYLES:
            for c in captions(scene, style, n=5, seed=seed):
                assert MIN_WORDS <= len(caption_words(c)) <= MAX_WORDS, c


def test_every_caption_of_sampled_train_scenes_fits():
    for i in range(0, 20_000, 50):
        scene = make_scene(scene_id("train", i))
        for style in STYLES:
            for c in captions(scene, style):
                assert MIN_WORDS <= len(caption_words(c)) <= MAX_WORDS, c


def test_export_cli(tmp_path):
    from dyrate_ext.data.__main__ import main

    assert main(["--split", "val", "--style", "dense", "--n", "2", "--out", str(tmp_path)]) == 0
    data = load_coco(tmp_path)
    assert data.image_ids == [scene_id("val", 0), scene_id("val", 1)] and data.style == "dense"
