"""Caption metrics: CIDEr (pycocoevalcap's CIDEr-D scorer), BLEU-4, fact precision / recall.

pycocoevalcap's own PTB tokenizer runs Java; `coco_tokenize` replaces it: lower case, words
only (punctuation dropped, as the PTB tokenizer's post-processing drops it), joined by
spaces, which is the input the scorers expect.

    cider(refs, hyps)   # refs {id: [str, ...]}, hyps {id: str} -> (corpus CIDEr x 100, per id)
    bleu4(refs, hyps)   # corpus BLEU-4 x 100
    facts(hyps, scenes) # FactScore: precision, recall (embedded data only)

Scores are x 100, the convention of caption papers (the DyRate paper's Table II/III).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..data import Scene, fact_scores

__all__ = ["FactScore", "bleu4", "cider", "coco_tokenize", "facts"]

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def coco_tokenize(text: str) -> str:
    """Lower-cased words (and numbers) of `text` separated by single spaces."""
    return " ".join(_TOKEN.findall(text.lower()))


def _prepare(refs: Mapping[int, list[str]], hyps: Mapping[int, str]) -> tuple[dict, dict]:
    if not hyps:
        raise ValueError("no captions to score")
    missing = [i for i in hyps if i not in refs or not refs[i]]
    if missing:
        raise ValueError(f"no references for image id {missing[0]}")
    gts = {i: [coco_tokenize(r) for r in refs[i]] for i in hyps}
    res = {i: [coco_tokenize(h)] for i, h in hyps.items()}
    return gts, res


def cider(refs: Mapping[int, list[str]], hyps: Mapping[int, str]) -> tuple[float, dict[int, float]]:
    """Corpus CIDEr-D x 100 of `hyps` against `refs` (document frequencies from the refs of
    the scored images, as pycocoevalcap does), and the per-image scores x 100."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    gts, res = _prepare(refs, hyps)
    scorer = CiderScorer(n=4, sigma=6.0)
    ids = list(res)
    for i in ids:
        scorer += (res[i][0], gts[i])
    score, per_image = scorer.compute_score()
    return 100.0 * float(score), {i: 100.0 * float(s) for i, s in zip(ids, per_image)}


def bleu4(refs: Mapping[int, list[str]], hyps: Mapping[int, str]) -> float:
    """Corpus BLEU-4 x 100 (pycocoevalcap's "closest" reference length)."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    gts, res = _prepare(refs, hyps)
    scorer = BleuScorer(n=4)
    for i in res:
        scorer += (res[i][0], gts[i])
    scores, _ = scorer.compute_score(option="closest", verbose=0)
    return 100.0 * float(scores[3])


@dataclass
class FactScore:
    """Fact-level scores summed over images: `correct` stated facts that hold, `stated` facts,
    `true` facts of the scenes (objects and their places)."""

    correct: int
    stated: int
    true: int

    @property
    def precision(self) -> float | None:
        """correct / stated x 100 (None when nothing is stated): hallucinations lower it."""
        return 100.0 * self.correct / self.stated if self.stated else None

    @property
    def recall(self) -> float:
        """correct / true x 100: facts of the scene the captions got right."""
        return 100.0 * self.correct / self.true if self.true else 0.0


def facts(hyps: Mapping[int, str], scenes: Mapping[int, Scene]) -> FactScore | None:
    """Fact precision / recall of the captions of the images that have a scene (None when no
    image has one, e.g. a COCO set)."""
    total = FactScore(0, 0, 0)
    seen = False
    for i, text in hyps.items():
        if i in scenes:
            c, s, t = fact_scores(text, scenes[i])
            total = FactScore(total.correct + c, total.stated + s, total.true + t)
            seen = True
    return total if seen else None
