"""Run pruning policies over a caption set (the reference loop or `model.generate()`) and score them.

    data = embedded_set("test", n=200, style="redundant")   # or coco_set("path/to/coco")
    batches = prepare(processor, data, prompt, batch_size=50)
    row = run_policy(model, tokenizer, batches, data, Spec("FastV", "k=2 r=0.5", FastV(2, 0.5)))

A `Row` holds the scores of one policy: CIDEr, BLEU-4, fact precision / recall (embedded
data), decoder FLOPs as a percentage of NoPrune's, mean image tokens kept, prefill and decode
time.

FLOPs % is counted per sample over the steps that sample really ran (its prefill and one
step per generated token up to its </s>), against NoPrune's FLOPs for the same prompt and the
same number of steps (`dyrate_ext.flops.generation_flops` with every image token kept): the
saving the pruning itself buys. A policy that makes captions longer also pays for the extra
tokens; `gflops_per_caption` gives the absolute count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..data import CocoCaptions, Scene, load_coco, load_split
from ..flops import DecoderShape, generation_flops, trace_flops
from ..hf.engines import run_policy as run_engine
from ..llava import Policy
from .metrics import bleu4, cider, facts

__all__ = ["EvalSet", "Row", "Spec", "coco_set", "embedded_set", "prepare", "run_policy"]


@dataclass
class EvalSet:
    """Images, references and (embedded data) scenes to evaluate on."""

    name: str
    style: str
    question: str
    image_ids: list[int]
    refs: dict[int, list[str]]
    scenes: dict[int, Scene]
    load_image: Callable[[int], Image.Image]


def embedded_set(split: str = "test", n: int = 200, style: str = "redundant") -> EvalSet:
    """The embedded procedural split (first `n` images) in `style`."""
    samples = {s.image_id: s for s in load_split(split, n=n, style=style)}
    return EvalSet(
        f"embedded {split}[:{n}] {style}",
        style,
        next(iter(samples.values())).prompt,
        list(samples),
        {i: s.captions for i, s in samples.items()},
        {i: s.scene for i, s in samples.items()},
        lambda i: samples[i].load_image(),
    )


def coco_set(path: str, n: int | None = None) -> EvalSet:
    """A COCO-format caption set (first `n` images); its info.prompt is the question."""
    data: CocoCaptions = load_coco(path)
    ids = data.image_ids[:n] if n else data.image_ids
    return EvalSet(
        f"{path}[:{len(ids)}] {data.style}",
        data.style,
        data.prompt,
        ids,
        {i: data.refs[i] for i in ids},
        {i: data.scenes[i] for i in ids if i in data.scenes},
        data.image,
    )


@dataclass
class Spec:
    """A policy to evaluate: `family` (curve of the Pareto plot), `knob` (its setting)."""

    family: str
    knob: str
    policy: Policy
    blank_image: bool = False

    @property
    def name(self) -> str:
        """The family's name with its settings, e.g. "FastV(k=2 r=0.5)" for family "FastV k=2"
        and knob "r=0.5"."""
        if not self.knob:
            return self.family
        base, *fixed = self.family.split(" ")
        return f"{base}({' '.join([*fixed, self.knob])})"


@dataclass
class Row:
    """Scores of one policy on one EvalSet (see the module docstring)."""

    name: str
    family: str
    knob: str
    cider: float
    bleu4: float
    fact_precision: float | None
    fact_recall: float | None
    flops_percent: float
    gflops_per_caption: float
    kept_image_tokens: float
    image_tokens: float
    mean_tokens: float
    prefill_ms_per_image: float
    decode_ms_per_step: float
    captions: dict[int, str] = field(default_factory=dict, repr=False)


def prepare(processor, data: EvalSet, prompt: str, batch_size: int) -> list[dict[str, Tensor]]:
    """Processor outputs (input_ids, attention_mask, pixel_values, blank_pixel_values, ids)
    per batch, computed once and shared by every policy."""
    batches = []
    for start in range(0, len(data.image_ids), batch_size):
        ids = data.image_ids[start : start + batch_size]
        images = [data.load_image(i) for i in ids]
        enc = processor(text=[prompt] * len(ids), images=images, return_tensors="pt", padding=True)
        blank = [Image.new("RGB", im.size, (128, 128, 128)) for im in images]
        enc["blank_pixel_values"] = processor.image_processor(blank, return_tensors="pt")[
            "pixel_values"
        ]
        enc["ids"] = torch.tensor(ids)
        batches.append(dict(enc))
    return batches


def _lengths(new_tokens: Tensor, eos: int) -> Tensor:
    """int64 [B]: generated tokens per sample up to and including its first </s>."""
    is_eos = new_tokens == eos
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, new_tokens.shape[1])
    return first.to(torch.int64)


@torch.no_grad()
def run_policy(
    model,
    tokenizer,
    batches: list[dict[str, Tensor]],
    data: EvalSet,
    spec: Spec,
    max_new_tokens: int = 72,
    progress: bool = True,
    engine: str = "loop",
) -> Row:
    """Generate greedily with `spec.policy` on every batch and score the captions. `engine`:
    "loop" (`dyrate_ext.llava.generate`) or "hf" (`model.generate()` under
    `dyrate_ext.hf.pruning`), as in `dyrate_ext.hf.engines`."""
    shape = DecoderShape.from_config(model.config)
    eos = int(tokenizer.eos_token_id)
    hyps: dict[int, str] = {}
    flops = base = 0
    kept_sum = steps_sum = images_sum = tokens = 0.0
    prefill_s = decode_s = 0.0
    decode_steps = 0
    bar = tqdm(total=len(data.image_ids), desc=spec.name, disable=not progress, leave=False)
    for b in batches:
        pixels = b["blank_pixel_values"] if spec.blank_image else b["pixel_values"]
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        inputs["pixel_values"] = pixels
        gen = model.generation_config
        out, clock = run_engine(
            model, inputs, spec.policy, max_new_tokens, gen.eos_token_id, gen.pad_token_id,
            engine=engine,
        )  # fmt: skip
        prefill_s += clock.prefill_seconds
        decode_s += clock.decode_seconds
        decode_steps += clock.decode_steps
        new = out.new_tokens
        lengths = _lengths(new, eos).cpu()  # the trace sums below are on the CPU
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        hyps.update({int(i): t.strip() for i, t in zip(b["ids"], texts)})
        t = torch.arange(out.trace.kept_image.shape[0])[:, None]
        ran = t < lengths[None, :]  # [T, B]: prefill + one step per generated token
        per_step = trace_flops(out.trace, shape).per_step
        prompt_len = (out.trace.token_type >= 0).sum(dim=1).cpu()
        n_img = out.trace.num_image.cpu()
        full = generation_flops(shape, prompt_len, n_img, n_img.expand_as(per_step), None)
        flops += int(per_step[ran].sum())
        base += int(full.per_step[ran].sum())
        kept_sum += float(out.trace.kept_image.cpu()[ran].sum())
        steps_sum += float(ran.sum())
        images_sum += float(n_img.sum())
        tokens += float(lengths.sum())
        bar.update(len(b["ids"]))
    bar.close()
    n = len(hyps)
    score, per_image = cider(data.refs, hyps)
    fs = facts(hyps, data.scenes)
    return Row(
        spec.name,
        spec.family,
        spec.knob,
        score,
        bleu4(data.refs, hyps),
        None if fs is None else fs.precision,
        None if fs is None else fs.recall,
        100.0 * flops / base,
        flops / n / 1e9,
        kept_sum / steps_sum,
        images_sum / n,
        tokens / n,
        1e3 * prefill_s / n,
        1e3 * decode_s / max(decode_steps, 1),
        hyps,
    )
