"""What the evaluation and the caption demo run: the policy sweep, DyRate specs from predictor
files, and the model to evaluate (the committed tiny LLaVA by default)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..llava import VTW, AttentionMass, DyRate, FastV, NoPrune
from ..policies import DEFAULT_RANKING, check_ranking
from ..predictor import RatePredictor
from .runner import Spec

__all__ = [
    "BEST_PREDICTOR",
    "FASTV_K",
    "FASTV_R",
    "MASS_P",
    "VTW_K",
    "best_predictor",
    "find_predictors",
    "load_model",
    "predictor_specs",
    "sweep",
]

FASTV_R = (0.25, 0.5, 0.75, 0.9)
FASTV_K = (1, 2, 3)
VTW_K = (1, 2, 3, 4)
MASS_P = (0.5, 0.8, 0.95)


def predictor_specs(paths: list[str], default_k: int) -> list[Spec]:
    """DyRate specs from RatePredictor files (k, budget and its currency from their metadata
    when there)."""
    specs = []
    for p in paths:
        meta = RatePredictor.metadata(p)
        k = int(meta.get("k", default_k))
        budget = meta.get("budget")
        predictor = RatePredictor.load(p)
        knob = f"k={k} budget={float(budget):.2f}" if budget else f"k={k} {Path(p).stem}"
        if "budget_currency" in meta:  # a budget in another currency than KV-cache FLOPs
            knob += f" {meta['budget_currency']}"
        if predictor.num_rates != 8:  # the paper's K; other grids are named
            knob += f" K={predictor.num_rates}"
        if predictor.features:
            knob += " +picture"
        specs.append(Spec("DyRate", knob, DyRate(predictor, k=k)))
    return specs


def find_predictors(folder: Path) -> list[str]:
    """The RatePredictor files in a model folder (e.g. the ones committed beside the tiny
    LLaVA), sorted by name."""
    from ..predictor import _FORMAT

    found = []
    for f in sorted(folder.glob("*.safetensors")):
        if RatePredictor.metadata(f).get("format") == _FORMAT:
            found.append(str(f))
    return found


BEST_PREDICTOR = "best_predictor.json"
"""The file beside a model that names its best committed predictor: {"file": NAME, "why": TEXT}."""


def best_predictor(folder: Path) -> str | None:
    """The path of the predictor `folder`'s BEST_PREDICTOR names, or None without that file."""
    import json

    note = folder / BEST_PREDICTOR
    if not note.is_file():
        return None
    path = folder / json.loads(note.read_text())["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{note} names {path.name}, which is not in {folder}")
    return str(path)


def sweep(
    full: bool, dyrate: list[Spec], rankings: tuple[str, ...] = (DEFAULT_RANKING,)
) -> list[Spec]:
    """NoPrune, the blank-image baseline, FastV r x k (FASTV_R x FASTV_K: each k is a curve, so
    FastV is compared at its best k), VTW k, AttentionMass p and the DyRate predictors;
    `full=False` keeps one or two settings per family. The dynamic policies
    (AttentionMass, DyRate) run once per decode-time ranking of `rankings`; a ranking other
    than the default names its own family (e.g. "AttentionMass current")."""
    specs = [Spec("NoPrune", "", NoPrune()), Spec("NoPrune, blank image", "", NoPrune(), True)]
    rs, ks, vtw_k, ps = (
        (FASTV_R, FASTV_K, VTW_K, MASS_P) if full else ((0.5,), (2, 3), (1, 2), (0.8,))
    )
    specs += [Spec(f"FastV k={k}", f"r={r}", FastV(k, r)) for k in ks for r in rs]
    specs += [Spec("VTW", f"k={k}", VTW(k)) for k in vtw_k]
    dynamic = [Spec("AttentionMass", f"p={p} k=2", AttentionMass(p, k=2)) for p in ps]
    if full:  # its best k, as FastV's (k=1 beats k=2 on the tiny LLaVAs)
        dynamic.append(Spec("AttentionMass", "p=0.8 k=1", AttentionMass(0.8, k=1)))
    dynamic += dyrate
    for ranking in rankings:
        for spec in dynamic:
            if ranking == spec.policy.ranking:
                specs.append(spec)
                continue
            policy = copy.copy(spec.policy)
            policy.ranking = check_ranking(type(policy).__name__, ranking)
            specs.append(Spec(f"{spec.family} {ranking}", spec.knob, policy, spec.blank_image))
    return specs


def load_model(path: str | None, device: str, dtype: str = "float32"):
    """(model, processor, tokenizer, prompt builder, folder) of a llava-hf folder or a tiny
    LLaVA size name ("small", "large"); the committed small tiny LLaVA when `path` is None."""
    from ..embedded import llava_prompt
    from ..train.model import load_tiny_llava, resolve_checkpoint, tiny_prompt

    folder = resolve_checkpoint(path)
    model, processor, tokenizer = load_tiny_llava(folder, device, dtype=getattr(torch, dtype))
    tiny = (folder / "train_log.json").is_file()
    return model, processor, tokenizer, (tiny_prompt if tiny else llava_prompt), folder
