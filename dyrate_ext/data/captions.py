"""Reference captions of a Scene from a small grammar with paraphrases, and caption facts.

Two styles:

* "redundant" (answers "Describe the image in detail."): the objects (image-dependent), the
  background (image-dependent), then parts predictable from the text already written: a count
  ("so there are three shapes in total."), a restatement of one object's place ("the red
  circle is at the top left."), a closing phrase ("it is a simple picture."). This is the
  redundancy of long captions that DyRate exploits: late tokens need the image less.
* "dense" (answers "List every shape with its color, size and place."): one sentence per
  object and one for the background; every sentence needs the image.

Every caption is 16-64 words-or-punctuation (the tokenizer's pre-tokens), lower case.
`captions(scene, style, n, seed)` gives n paraphrases (the references), deterministic.

Facts: `scene_facts(scene)` is the set of ("object", color, shape) and ("place", color, shape,
cell) facts of a scene; `caption_facts(text)` parses the same facts out of a caption (a colour
word followed within two words by a shape word is an object; the first place words after it,
before the next object or sentence end, give its cell); `fact_scores` compares them.
"""

from __future__ import annotations

import random
import re

from .scenes import CELL_NAMES, COLORS, SHAPES, Scene, SceneObject

__all__ = [
    "PROMPTS",
    "STYLES",
    "caption_facts",
    "caption_words",
    "captions",
    "fact_scores",
    "grammar_words",
    "scene_facts",
]

STYLES = ("redundant", "dense")
PROMPTS = {
    "redundant": "Describe the image in detail.",
    "dense": "List every shape with its color, size and place.",
}
"""The question asked for each style (the user turn of the LLaVA prompt)."""

MIN_WORDS, MAX_WORDS = 16, 64
_NUMBERS = ("zero", "one", "two", "three", "four")
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_WORD = re.compile(r"\w+|[^\w\s]")


def caption_words(text: str) -> list[str]:
    """The caption's pre-tokens (words and single punctuation marks), lower-cased: what the
    word-level tokenizer and the CIDEr tokenizer see."""
    return _WORD.findall(text.lower())


def _place(cell: int, rng: random.Random) -> str:
    name = CELL_NAMES[cell]
    if name == "center":
        return rng.choice(("in the center", "in the middle"))
    if name in ("left", "right"):
        return rng.choice((f"on the {name}", f"at the {name}", f"on the {name} side"))
    if " " in name:  # a corner
        return rng.choice((f"at the {name}", f"in the {name} corner", f"at the {name}"))
    return rng.choice((f"at the {name}", f"near the {name}", f"at the {name}"))


def _thing(obj: SceneObject, rng: random.Random) -> str:
    return f"a {rng.choice(_SIZE_WORDS[obj.size])} {obj.color} {obj.shape}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _background(scene: Scene, rng: random.Random) -> str:
    bg = scene.background
    clutter = {"dots": " with a few dots", "lines": " with some thin lines", "none": ""}
    extra = clutter[scene.clutter]
    one = len(scene.objects) == 1
    drawn = "the shape is drawn" if one else "the shapes are drawn"
    return rng.choice(
        (
            f"the background is {bg}{extra}.",
            f"{drawn} on a {bg} background{extra}.",
            f"behind {'it' if one else 'them'} is a plain {bg} background{extra}.",
        )
    )


def _redundant(scene: Scene, rng: random.Random) -> list[str]:
    objs = scene.objects
    listing = _join([f"{_thing(o, rng)} {_place(o.cell, rng)}" for o in objs])
    opener = rng.choice(
        ("the picture shows {}.", "this image shows {}.", "in this picture we see {}.")
    )
    n = len(objs)
    noun = "shape" if n == 1 else "shapes"
    verb = "is" if n == 1 else "are"
    count = rng.choice(
        (
            f"so there {verb} {_NUMBERS[n]} {noun} in total.",
            f"that makes {_NUMBERS[n]} {noun} in the picture.",
            f"in total the image has {_NUMBERS[n]} {noun}.",
        )
    )
    o = rng.choice(objs)
    restate = f"the {o.color} {o.shape} is {_place(o.cell, rng)}."
    closing = rng.choice(
        (
            "it is a simple picture.",
            "nothing else is in the picture.",
            "that is all there is to see.",
        )
    )
    return [opener.format(listing), _background(scene, rng), count, restate, closing]


def _dense(scene: Scene, rng: random.Random) -> list[str]:
    sentences = []
    for o in scene.objects:
        form = rng.choice(("there is {} {}.", "{} sits {}.", "we see {} {}."))
        sentences.append(form.format(_thing(o, rng), _place(o.cell, rng)))
    clutter = {"dots": "a few dots", "lines": "some thin lines", "none": "nothing else on it"}
    bg = rng.choice(("the {} background has {}.", "the {} background shows {}."))
    return [*sentences, bg.format(scene.background, clutter[scene.clutter])]


def _fit(sentences: list[str], style: str) -> str:
    """Drop optional redundant sentences (restatement, closing, then count) until <= MAX_WORDS."""
    parts = list(sentences)
    optional = [2, 4, 3] if style == "redundant" else []
    while sum(len(caption_words(s)) for s in parts) > MAX_WORDS and optional:
        parts[optional.pop()] = ""
    text = " ".join(p for p in parts if p)
    words = len(caption_words(text))
    if not MIN_WORDS <= words <= MAX_WORDS:
        raise AssertionError(f"caption of {words} words outside [{MIN_WORDS}, {MAX_WORDS}]")
    return text


def captions(scene: Scene, style: str = "redundant", n: int = 5, seed: int = 0) -> list[str]:
    """`n` distinct-where-possible paraphrases of the scene in `style` (deterministic)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"{scene.seed}/{style}/{seed}")
    make = _redundant if style == "redundant" else _dense
    out: list[str] = []
    for _ in range(8 * n):
        text = _fit(make(scene, rng), style)
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    while len(out) < n:  # few paraphrases exist (possible only for tiny scenes)
        out.append(out[len(out) % max(1, len(out))])
    return out


def grammar_words() -> list[str]:
    """Every word and punctuation mark a caption or prompt can contain (for a tokenizer)."""
    words = set(CELL_NAMES[0].split())
    text = " ".join(
        [
            *PROMPTS.values(),
            *COLORS,
            *SHAPES,
            *(w for pair in _SIZE_WORDS.values() for w in pair),
            *_NUMBERS,
            *CELL_NAMES,
            "the picture shows this image in we see , and . is are so there shape shapes",
            "total that makes has on at side near corner middle a sits with few dots some",
            "thin lines background drawn behind them plain it simple nothing else all to",
            "white gray black on else it nothing",
        ]
    )
    words |= set(caption_words(text))
    return sorted(words)


def scene_facts(scene: Scene) -> set[tuple]:
    """("object", color, shape) and ("place", color, shape, cell) for each object."""
    facts: set[tuple] = set()
    for o in scene.objects:
        facts.add(("object", o.color, o.shape))
        facts.add(("place", o.color, o.shape, o.cell))
    return facts


def _cell(words: list[str]) -> int | None:
    marks = set(words)
    if not marks & {"top", "bottom", "left", "right", "center", "middle"}:
        return None
    row = 0 if "top" in marks else 2 if "bottom" in marks else 1
    col = 0 if "left" in marks else 2 if "right" in marks else 1
    return row * 3 + col


def caption_facts(text: str) -> set[tuple]:
    """The object and place facts a caption states (see the module docstring)."""
    words = caption_words(text)
    mentions = []  # (index of the shape word, color, shape)
    for i, w in enumerate(words):
        if w in SHAPES:
            for j in range(max(0, i - 3), i):
                if words[j] in COLORS:
                    mentions.append((i, words[j], w))
    facts: set[tuple] = set()
    for m, (i, color, shape) in enumerate(mentions):
        facts.add(("object", color, shape))
        end = mentions[m + 1][0] - 3 if m + 1 < len(mentions) else len(words)
        window: list[str] = []
        for w in words[i + 1 : max(i + 1, end)]:
            if w in (".", ",", "and"):
                break
            window.append(w)
        cell = _cell(window)
        if cell is not None:
            facts.add(("place", color, shape, cell))
    return facts


def fact_scores(text: str, scene: Scene) -> tuple[int, int, int]:
    """(correct, stated, true): facts of the caption that hold, facts it states, facts of the
    scene. Precision = correct / stated (hallucinations lower it), recall = correct / true."""
    stated = caption_facts(text)
    true = scene_facts(scene)
    return len(stated & true), len(stated), len(true)
