"""Run pruning policies over a caption set (the reference loop or `model.generate()`) and score them.

    data = embedded_set("test", n=200, style="redundant")   # or coco_set("path/to/coco")
    batches = prepare(processor, data, prompt, batch_size=50)
    row = run_policy(model, tokenizer, batches, data, Spec("FastV", "k=2 r=0.5", FastV(2, 0.5)))

A `Row` holds the scores of one policy: CIDEr (corpus and per picture), BLEU-4, fact
precision / recall (embedded data), the decoder's cost in every currency of `dyrate_ext.costs`
as a percentage of NoPrune's, mean image tokens kept, prefill and decode time.

The currencies (CURRENCY_LABELS; Row fields CURRENCY_FIELDS): KV-cache FLOPs
(`flops_percent`), paper-style FLOPs, a reconstruction of the paper's cache-less accounting
(`paper_flops_percent`), KV bytes read while decoding (`kv_read_percent`) and the peak KV bytes
held (`peak_kv_percent`), bytes in the model's dtype. Each is counted per sample over the steps
that sample really ran (its prefill and one step per generated token up to its </s>; the peak:
the most it held after any of those steps), against NoPrune's for the same prompt and the same
number of steps (`dyrate_ext.costs.generation_costs` with every image token kept), then summed
over the samples: % = 100 x sum of the policy's / sum of NoPrune's. That is the saving the
pruning itself buys. A policy that makes captions longer also pays for the extra tokens;
`gflops_per_caption`, `kv_read_mb_per_caption` and `peak_kv_mb_per_caption` give absolute
means per caption. A % whose NoPrune sum is 0 (KV bytes read when every caption stops after
its prefill) is nan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from ..costs import CURRENCIES, Costs, generation_costs, trace_costs
from ..data import CocoCaptions, Scene, load_coco, load_split
from ..flops import DecoderShape
from ..llava import Policy
from .engines import generate_timed
from .metrics import bleu4, cider, facts

__all__ = [
    "CURRENCY_FIELDS",
    "CURRENCY_LABELS",
    "EvalSet",
    "Row",
    "Spec",
    "coco_set",
    "embedded_set",
    "prepare",
    "ran_totals",
    "run_policy",
]

CURRENCY_FIELDS = {
    "flops": "flops_percent",
    "paper_flops": "paper_flops_percent",
    "kv_read_bytes": "kv_read_percent",
    "peak_kv_bytes": "peak_kv_percent",
}
"""The Row field holding each currency of `dyrate_ext.costs.CURRENCIES`, % of NoPrune."""

CURRENCY_LABELS = {
    "flops": "KV-cache FLOPs",
    "paper_flops": "paper-style FLOPs (reconstruction)",
    "kv_read_bytes": "decode KV bytes read",
    "peak_kv_bytes": "peak KV bytes",
}
"""How reports name each currency."""


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


def embedded_set(
    split: str = "test",
    n: int = 200,
    style: str = "redundant",
    pictures: tuple[int, float] = (112, 1.0),
    base: int = 0,
) -> EvalSet:
    """The embedded procedural split (first `n` images) in `style`, drawn at `pictures` =
    (image size, object scale); `base` != 0 shifts the seeds (an unseen split, named so)."""
    size, scale = pictures
    found = load_split(split, n=n, style=style, base=base, image_size=size, object_scale=scale)
    samples = {s.image_id: s for s in found}
    where = f"{split}+{base}" if base else split
    return EvalSet(
        f"embedded {where}[:{n}] {style}",
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
    paper_flops_percent: float
    kv_read_percent: float
    peak_kv_percent: float
    gflops_per_caption: float
    kv_read_mb_per_caption: float
    peak_kv_mb_per_caption: float
    kept_image_tokens: float
    image_tokens: float
    mean_tokens: float
    prefill_ms_per_image: float
    decode_ms_per_step: float
    captions: dict[int, str] = field(default_factory=dict, repr=False)
    cider_per_image: dict[int, float] = field(default_factory=dict, repr=False)
    vs_fastv: dict[str, Any] = field(default_factory=dict)
    """Per currency, the CIDEr difference against the FastV curve at equal cost with its paired
    standard error (`dyrate_ext.evaluate.paired`), None outside the curve's range; filled in
    once every row of the table exists."""

    def cost_percent(self, currency: str) -> float:
        """The cost in `currency` (one of `dyrate_ext.costs.CURRENCIES`), % of NoPrune."""
        return float(getattr(self, CURRENCY_FIELDS[currency]))


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


def ran_totals(costs: Costs, ran: Tensor) -> dict[str, Tensor]:
    """Each currency of `costs` per sample over the steps it ran: `ran` bool [T, B] marks them.
    Sums over those steps (the peak: the most held after any of them), int64 [B] per currency
    of CURRENCIES."""
    mask = ran.to(torch.int64)
    return {
        "flops": (costs.flops.per_step * mask).sum(dim=0),
        "paper_flops": (costs.paper_flops.per_step * mask).sum(dim=0),
        "kv_read_bytes": (costs.kv_read * mask).sum(dim=0),
        "peak_kv_bytes": (costs.kv_held * mask).max(dim=0).values,
    }


@dataclass
class _Tally:
    """Sums over the samples of one policy's run: its cost and NoPrune's per currency, image
    tokens kept and held over the steps run, steps, image tokens, generated tokens."""

    cost: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CURRENCIES, 0))
    base: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CURRENCIES, 0))
    kept: float = 0.0
    steps: float = 0.0
    images: float = 0.0
    tokens: float = 0.0

    def add(self, trace: Any, lengths: Tensor, shape: DecoderShape, dtype: torch.dtype) -> None:
        """One batch: its Trace and the steps each sample ran, `lengths` int64 [B] (CPU)."""
        kept = trace.kept_image.cpu()
        ran = torch.arange(kept.shape[0])[:, None] < lengths[None, :]  # [T, B]
        prompt_len = (trace.token_type >= 0).sum(dim=1).cpu()
        n_img = trace.num_image.cpu()
        costs = trace_costs(trace, shape, dtype=dtype)
        full = generation_costs(shape, prompt_len, n_img, n_img.expand_as(kept), None, dtype=dtype)
        for totals, c in ((self.cost, costs), (self.base, full)):
            for name, v in ran_totals(c, ran).items():
                totals[name] += int(v.sum())
        self.kept += float(kept[ran].sum())
        self.steps += float(ran.sum())
        self.images += float(n_img.sum())
        self.tokens += float(lengths.sum())

    def percent(self, currency: str) -> float:
        """100 x the policy's cost / NoPrune's in `currency`; nan when NoPrune's is 0."""
        base = self.base[currency]
        return 100.0 * self.cost[currency] / base if base else float("nan")


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
    `dyrate_ext.hf.pruning`), as in `dyrate_ext.evaluate.engines`. KV bytes are counted in the
    model's dtype."""
    shape = DecoderShape.from_config(model.config)
    dtype = getattr(model, "dtype", torch.float16)
    eos = int(tokenizer.eos_token_id)
    hyps: dict[int, str] = {}
    tally = _Tally()
    prefill_s = decode_s = 0.0
    decode_steps = 0
    bar = tqdm(total=len(data.image_ids), desc=spec.name, disable=not progress, leave=False)
    for b in batches:
        pixels = b["blank_pixel_values"] if spec.blank_image else b["pixel_values"]
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        inputs["pixel_values"] = pixels
        gen = model.generation_config
        out, clock = generate_timed(
            model, inputs, spec.policy, max_new_tokens, gen.eos_token_id, gen.pad_token_id,
            engine=engine,
        )  # fmt: skip
        prefill_s += clock.prefill_seconds
        decode_s += clock.decode_seconds
        decode_steps += clock.decode_steps
        new = out.new_tokens
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        hyps.update({int(i): t.strip() for i, t in zip(b["ids"], texts)})
        tally.add(out.trace, _lengths(new, eos).cpu(), shape, dtype)
        bar.update(len(b["ids"]))
    bar.close()
    n = len(hyps)
    score, per_image = cider(data.refs, hyps)
    fs = facts(hyps, data.scenes)
    return Row(
        spec.name,
        spec.family,
        spec.knob,
        cider=score,
        bleu4=bleu4(data.refs, hyps),
        fact_precision=None if fs is None else fs.precision,
        fact_recall=None if fs is None else fs.recall,
        flops_percent=tally.percent("flops"),
        paper_flops_percent=tally.percent("paper_flops"),
        kv_read_percent=tally.percent("kv_read_bytes"),
        peak_kv_percent=tally.percent("peak_kv_bytes"),
        gflops_per_caption=tally.cost["flops"] / n / 1e9,
        kv_read_mb_per_caption=tally.cost["kv_read_bytes"] / n / 1e6,
        peak_kv_mb_per_caption=tally.cost["peak_kv_bytes"] / n / 1e6,
        kept_image_tokens=tally.kept / tally.steps,
        image_tokens=tally.images / n,
        mean_tokens=tally.tokens / n,
        prefill_ms_per_image=1e3 * prefill_s / n,
        decode_ms_per_step=1e3 * decode_s / max(decode_steps, 1),
        captions=hyps,
        cider_per_image=per_image,
    )
