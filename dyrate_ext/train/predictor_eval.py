"""Measure a trained RatePredictor: decoder FLOPs and kept image tokens, generated and forced.

`evaluate_predictor` runs `dyrate_ext.llava.generate` (greedy) with NoPrune and with
DyRate(predictor, k) on caption prompts and reports DyRate's decoder FLOPs as a percentage of
NoPrune's (`dyrate_ext.flops.trace_flops`, ratio of sums), the mean image tokens held by layers
>= k (over steps and samples, and at the prefill), and how often the greedy caption is
unchanged. `forced_flops` is the same FLOPs fraction under teacher forcing on the reference
captions with the predictor's argmax decisions (what training sees at tau -> 0); the
difference between the two is the train/inference gap of the rate decisions (exposure to the
model's own captions, different lengths).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..flops import DecoderShape, trace_flops
from ..llava import DyRate, NoPrune, generate
from ..predictor import RatePredictor
from .gumbel import expected_flops
from .masked_forward import CaptionBatch, MaskedLlava, keep_masks
from .objective import predictor_logits, step_inputs

__all__ = ["evaluate_predictor", "forced_flops"]


@torch.no_grad()
def forced_flops(
    model: Any, batches: list[CaptionBatch], predictor: RatePredictor, k: int
) -> dict[str, float]:
    """Teacher-forced argmax decisions on reference captions: FLOPs % of NoPrune, mean kept
    image tokens, fraction of steps whose asked count was clamped by the never-grow rule."""
    masked = MaskedLlava(model, k)
    device = model.lm_head.weight.device
    shape = DecoderShape.from_config(model.config)
    predictor = predictor.to(device)
    cost = base = kept_sum = clamp_sum = rows = 0.0
    for b in batches:
        p = masked.prepare(b.to(device))
        cls = predictor_logits(predictor, step_inputs(p, predictor.features)).argmax(-1)
        y = F.one_hot(cls, predictor.num_rates).float()
        _, kept, clamped = keep_masks(p.token_score, p.token_type, y, p.row_valid)
        c, n = expected_flops(shape, k, y, p.num_image, p.prompt_length, p.row_valid, parts=True)
        cost, base = cost + float(c), base + float(n)
        kept_sum += float(kept[p.row_valid].float().sum())
        clamp_sum += float(clamped[p.row_valid].float().sum())
        rows += float(p.row_valid.sum())
    return {
        "flops_percent": 100.0 * cost / base,
        "mean_kept_image": kept_sum / rows,
        "clamped_steps": clamp_sum / rows,
    }


def _caption(tokens: torch.Tensor, eos: set[int]) -> list[int]:
    """The generated ids up to and including the first stop token."""
    out = []
    for t in tokens.tolist():
        out.append(t)
        if t in eos:
            break
    return out


@torch.no_grad()
def evaluate_predictor(
    model: Any,
    batches: list[CaptionBatch],
    predictor: RatePredictor,
    k: int,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> dict[str, float]:
    """Greedy generation with NoPrune and DyRate on the batches' prompts (captions unused)."""
    from tqdm.auto import tqdm

    shape = DecoderShape.from_config(model.config)
    device = model.lm_head.weight.device
    totals = {"base": 0.0, "dyrate": 0.0, "kept": 0.0, "steps": 0.0, "prefill": 0.0}
    same = images = num_image = 0
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    for b in tqdm(batches, desc="eval", disable=not progress, leave=False):
        b = b.to(device)
        args = (model, b.input_ids, b.pixel_values, b.attention_mask)
        ref = generate(*args, policy=NoPrune(), max_new_tokens=max_new_tokens)
        out = generate(*args, policy=DyRate(predictor, k), max_new_tokens=max_new_tokens)
        totals["base"] += trace_flops(ref.trace, shape).total
        totals["dyrate"] += trace_flops(out.trace, shape).total
        kept = out.trace.kept_image.float()
        totals["kept"] += float(kept.sum())
        totals["steps"] += kept.numel()
        totals["prefill"] += float(kept[0].sum())
        images += kept.shape[1]
        num_image += int(out.trace.num_image.sum())
        for i in range(kept.shape[1]):
            same += int(_caption(ref.new_tokens[i], eos) == _caption(out.new_tokens[i], eos))
    return {
        "flops_percent": 100.0 * totals["dyrate"] / totals["base"],
        "mean_kept_image": totals["kept"] / totals["steps"],
        "prefill_kept_image": totals["prefill"] / images,
        "num_image": num_image / images,
        "same_caption_fraction": same / images,
        "images": float(images),
    }
