"""Captioning data made in code: procedural scenes, paraphrased references, COCO export.

    from dyrate_ext.data import load_split, export_coco, load_coco, fact_scores
    test = load_split("test", n=200, style="redundant")   # list[CaptionSample]
    s = test[0]; s.load_image(), s.captions, s.prompt, s.scene

Modules: `scenes` (Scene, make_scene, render), `captions` (grammar, styles, facts),
`dataset` (splits, COCO caption format).
"""

from __future__ import annotations

from .captions import (
    PROMPTS,
    STYLES,
    caption_facts,
    caption_words,
    captions,
    fact_scores,
    grammar_words,
    scene_facts,
)
from .dataset import (
    DEFAULT_SIZES,
    CaptionSample,
    CocoCaptions,
    export_coco,
    load_coco,
    load_split,
    scene_id,
)
from .scenes import Scene, SceneObject, make_scene, render

__all__ = [
    "DEFAULT_SIZES",
    "PROMPTS",
    "STYLES",
    "CaptionSample",
    "CocoCaptions",
    "Scene",
    "SceneObject",
    "caption_facts",
    "caption_words",
    "captions",
    "export_coco",
    "fact_scores",
    "grammar_words",
    "load_coco",
    "load_split",
    "make_scene",
    "render",
    "scene_facts",
    "scene_id",
]
