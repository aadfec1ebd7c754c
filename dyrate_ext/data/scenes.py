"""Procedural scenes: 1-4 coloured shapes on a plain background with some clutter, drawn with PIL.

A `Scene` is the ground truth a caption is checked against (its "scene description"): every
object's shape, colour, size and place (one cell of a 3 x 3 grid, at most one object per
cell, no two objects with the same colour and shape), the background colour and the clutter
(dots, lines or none). `make_scene(seed)` draws one from a seed, `render(scene, size)` paints
it; both are deterministic (same seed, same scene, same pixels on any machine).

    scene = make_scene(1234)
    image = render(scene, 112)        # PIL RGB image, 112 x 112
    scene.to_dict()                   # JSON-able (what the COCO export stores per image)
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "CELL_NAMES",
    "COLORS",
    "SHAPES",
    "SIZES",
    "Scene",
    "SceneObject",
    "make_scene",
    "render",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 180),
    "brown": (130, 80, 40),
}
"""Object colours and their RGB values."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
"""Background colours and their RGB values."""

SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES = ("small", "large")
CLUTTER = ("none", "dots", "lines")

CELL_NAMES = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""Name of grid cell `row * 3 + col` (row 0 is the top, col 0 the left)."""

_RADIUS = {"small": 0.085, "large": 0.15}  # fraction of the image side


@dataclass(frozen=True)
class SceneObject:
    """One shape: `cell` in 0..8 (row-major 3 x 3 grid), `dx`, `dy` its offset from the cell
    centre as a fraction of the image side."""

    shape: str
    color: str
    size: str
    cell: int
    dx: float = 0.0
    dy: float = 0.0

    @property
    def place(self) -> str:
        """The cell's name, e.g. "top left"."""
        return CELL_NAMES[self.cell]


@dataclass(frozen=True)
class Scene:
    """Ground truth of one picture; objects are in reading order (by cell)."""

    seed: int
    objects: tuple[SceneObject, ...]
    background: str
    clutter: str
    clutter_seed: int

    def to_dict(self) -> dict:
        """A JSON-able dict; `Scene.from_dict` reverses it."""
        d = asdict(self)
        d["objects"] = [asdict(o) for o in self.objects]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        """The Scene of a `to_dict` result."""
        objects = tuple(SceneObject(**o) for o in d["objects"])
        return cls(int(d["seed"]), objects, d["background"], d["clutter"], int(d["clutter_seed"]))


def make_scene(seed: int) -> Scene:
    """A random scene from `seed`: 1-4 objects in distinct cells with distinct (colour, shape),
    a background colour and a clutter kind."""
    rng = random.Random(seed)
    count = rng.randint(1, 4)
    cells = sorted(rng.sample(range(9), count))
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], count)
    objects = []
    for cell, (color, shape) in zip(cells, kinds):
        size = rng.choice(SIZES)
        slack = max(0.0, 1 / 6 - _RADIUS[size]) * 0.8
        dx, dy = (round(rng.uniform(-slack, slack), 4) for _ in range(2))
        objects.append(SceneObject(shape, color, size, cell, dx, dy))
    background = rng.choice(list(BACKGROUNDS))
    clutter = rng.choice(CLUTTER)
    return Scene(seed, tuple(objects), background, clutter, rng.randrange(2**31))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        q = r * 0.85
        return [(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if shape == "star":
        import math

        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _clutter_color(background: str) -> tuple[int, int, int]:
    return {"white": (185, 185, 185), "gray": (95, 95, 95), "black": (70, 70, 70)}[background]


def render(scene: Scene, size: int = 112, object_scale: float = 1.0) -> Image.Image:
    """The scene as a `size` x `size` RGB image (drawn at 2x and downsampled, so edges are
    smooth). `object_scale` multiplies every object's radius (the places and the clutter stay):
    0.5 draws objects at a quarter of their area, so most patches show only background, as in
    natural photos."""
    if size < 16:
        raise ValueError(f"render: size must be >= 16 pixels, got {size}")
    if not 0.0 < object_scale <= 1.0:
        raise ValueError(f"render: object_scale must be in (0, 1], got {object_scale}")
    big = size * 2
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    rng = random.Random(scene.clutter_seed)
    grey = _clutter_color(scene.background)
    if scene.clutter == "dots":
        for _ in range(rng.randint(12, 24)):
            x, y, r = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(1.0, 2.5) * big / 224
            draw.ellipse([x - r, y - r, x + r, y + r], fill=grey)
    elif scene.clutter == "lines":
        for _ in range(rng.randint(3, 6)):
            pts = [(rng.uniform(0, big), rng.uniform(0, big)) for _ in range(2)]
            draw.line(pts, fill=grey, width=max(1, big // 112))
    for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        cx = ((col + 0.5) / 3 + obj.dx) * big
        cy = ((row + 0.5) / 3 + obj.dy) * big
        r = _RADIUS[obj.size] * object_scale * big
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)
