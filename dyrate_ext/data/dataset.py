"""Fixed splits of the procedural caption data, and COCO caption-format export and loading.

Scene ids are split by range, so the splits are disjoint by construction and fixed for a
seed: sample i of split s is the scene of seed `base + SPLIT_OFFSET[s] + i`.

    samples = load_split("test", n=200, style="redundant")   # list[CaptionSample]
    export_coco(samples, "out/test")   # out/test/images/*.png + out/test/annotations.json
    data = load_coco("out/test")        # CocoCaptions: images, refs, prompt, scenes

A COCO caption file is `{"images": [{"id", "file_name", "width", "height"}, ...],
"annotations": [{"id", "image_id", "caption"}, ...]}`; the export adds `"scene"` to each
image (the ground truth for fact scores) and `"info": {"style", "prompt"}`. `load_coco` reads
any such file (COCO, Flickr30K or NoCaps in this format), with or without those extras.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from .captions import PROMPTS, STYLES, captions
from .scenes import Scene, make_scene, render

__all__ = [
    "DEFAULT_SIZES",
    "SPLIT_OFFSET",
    "CaptionSample",
    "CocoCaptions",
    "export_coco",
    "load_coco",
    "load_split",
    "scene_id",
]

SPLIT_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
DEFAULT_SIZES = {"train": 20_000, "val": 200, "test": 200}
"""Scenes per split (train is drawn from lazily; nothing forces materialising it)."""
NUM_REFERENCES = 5


@dataclass
class CaptionSample:
    """One image with its references. `image` is rendered lazily by `load_image`."""

    image_id: int
    scene: Scene
    style: str
    captions: list[str]
    image_size: int = 112
    object_scale: float = 1.0

    @property
    def prompt(self) -> str:
        """The question of this style."""
        return PROMPTS[self.style]

    def load_image(self) -> Image.Image:
        """The rendered picture."""
        return render(self.scene, self.image_size, self.object_scale)


def scene_id(split: str, index: int, base: int = 0) -> int:
    """The seed (= image id) of sample `index` of `split`."""
    if split not in SPLIT_OFFSET:
        raise ValueError(f"split must be one of {tuple(SPLIT_OFFSET)}, got {split!r}")
    if not 0 <= index < 1_000_000:
        raise ValueError(f"index must be in [0, 1e6), got {index}")
    return base + SPLIT_OFFSET[split] + index


def load_split(
    split: str,
    n: int | None = None,
    style: str = "redundant",
    base: int = 0,
    start: int = 0,
    image_size: int = 112,
    num_references: int = NUM_REFERENCES,
    object_scale: float = 1.0,
) -> list[CaptionSample]:
    """Samples `start .. start + n - 1` of `split` (n defaults to the split's size), each with
    `num_references` captions of `style`, rendered at `image_size` with `object_scale`
    (`render`). `base` shifts every seed: a `base` no run used gives unseen scenes."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    n = DEFAULT_SIZES[split] if n is None else int(n)
    out = []
    for i in range(start, start + n):
        sid = scene_id(split, i, base)
        scene = make_scene(sid)
        out.append(
            CaptionSample(
                sid, scene, style, captions(scene, style, num_references), image_size, object_scale
            )
        )
    return out


@dataclass
class CocoCaptions:
    """A loaded COCO caption set.

    Attributes:
        root: the folder the image file names are relative to.
        image_ids: ids in file order.
        files: image id -> path of the image.
        refs: image id -> reference captions.
        scenes: image id -> Scene (only for sets exported by `export_coco`).
        prompt: the question to ask (info.prompt, else the redundant style's).
        style: info.style or "external".
    """

    root: Path
    image_ids: list[int]
    files: dict[int, Path]
    refs: dict[int, list[str]]
    scenes: dict[int, Scene] = field(default_factory=dict)
    prompt: str = PROMPTS["redundant"]
    style: str = "external"

    def image(self, image_id: int) -> Image.Image:
        """The image as RGB."""
        with Image.open(self.files[image_id]) as im:
            return im.convert("RGB")


def export_coco(
    samples: list[CaptionSample], out_dir: str | os.PathLike[str], progress: bool = False
) -> Path:
    """Write `out_dir/images/<id>.png` and `out_dir/annotations.json`; returns the JSON path.

    The JSON is written to a temporary name and renamed, so a failed export leaves no
    half-written annotations file."""
    if not samples:
        raise ValueError("export_coco: no samples")
    styles = {s.style for s in samples}
    if len(styles) != 1:
        raise ValueError(f"export_coco: samples mix styles {sorted(styles)}; export one at a time")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    for s in tqdm(samples, desc="export", disable=not progress):
        name = f"images/{s.image_id}.png"
        s.load_image().save(out / name)
        images.append(
            {
                "id": s.image_id,
                "file_name": name,
                "width": s.image_size,
                "height": s.image_size,
                "scene": s.scene.to_dict(),
            }
        )
        for c in s.captions:
            annotations.append({"id": len(annotations) + 1, "image_id": s.image_id, "caption": c})
    style = styles.pop()
    info = {
        "description": "dyrate_ext procedural captions",
        "style": style,
        "prompt": PROMPTS[style],
    }
    doc = {"info": info, "images": images, "annotations": annotations}
    path = out / "annotations.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def load_coco(path: str | os.PathLike[str]) -> CocoCaptions:
    """Read a COCO caption set: a folder holding `annotations.json` or the JSON file itself
    (image file names are relative to the JSON's folder, or to its `images/` subfolder)."""
    p = Path(path)
    js = p / "annotations.json" if p.is_dir() else p
    if not js.is_file():
        raise FileNotFoundError(f"load_coco: no annotations file at {js}")
    doc = json.loads(js.read_text())
    if "images" not in doc or "annotations" not in doc:
        raise ValueError(f"{js} is not a COCO caption file (needs 'images' and 'annotations')")
    root = js.parent
    ids, files, scenes = [], {}, {}
    for im in doc["images"]:
        iid = int(im["id"])
        f = root / im["file_name"]
        if not f.exists() and (root / "images" / im["file_name"]).exists():
            f = root / "images" / im["file_name"]
        ids.append(iid)
        files[iid] = f
        if "scene" in im:
            scenes[iid] = Scene.from_dict(im["scene"])
    refs: dict[int, list[str]] = {i: [] for i in ids}
    for a in doc["annotations"]:
        refs.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
    empty = [i for i in ids if not refs[i]]
    if empty:
        raise ValueError(f"{js}: images without a caption, e.g. id {empty[0]}")
    info = doc.get("info") or {}
    return CocoCaptions(
        root,
        ids,
        files,
        refs,
        scenes,
        prompt=info.get("prompt", PROMPTS["redundant"]),
        style=info.get("style", "external"),
    )
