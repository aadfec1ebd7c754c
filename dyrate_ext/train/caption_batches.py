"""Caption examples -> teacher-forcing batches (`CaptionBatch`) for predictor training.

An example is (image, question, references). They come from a COCO caption file
(`dyrate_ext.data.load_coco`: COCO, Flickr30K or NoCaps in that format, or a set exported by
`dyrate_ext.data.export_coco`) or straight from the embedded procedural split
(`dyrate_ext.data.load_split`, nothing written to disk). Each image contributes one reference
per epoch-independent batch, picked by the seed. The prompt is LLaVA-1.5's template around the
question with the tiny model's short system prompt by default (`default_template`; for a
llava-1.5-hf checkpoint pass "USER: <image>\\n{question} ASSISTANT:"); the
caption is tokenised without special tokens, then the stop token, cut to `max_caption_tokens`.
`greedy_targets` swaps the references for the unpruned model's own greedy captions.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .masked_forward import CaptionBatch

__all__ = [
    "Example",
    "build_batches",
    "check_template",
    "default_template",
    "greedy_targets",
    "load_examples",
]


@dataclass
class Example:
    """One image with its question and reference captions."""

    image: Image.Image
    question: str
    refs: list[str]


def load_examples(
    data: str | os.PathLike[str] | None,
    limit: int | None,
    split: str = "train",
    style: str = "redundant",
    pictures: tuple[int, float] = (112, 1.0),
) -> list[Example]:
    """Examples of a COCO caption file/folder (`data`), or of the embedded procedural `split`
    when `data` is None, in `style` ("redundant", "dense", or several joined by commas: the
    images are shared out among them, interleaved), drawn at `pictures` = (image size, object
    scale): `dyrate_ext.train.model.picture_settings` of the model. `limit` keeps the first
    `limit` images."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if data is None:
        from ..data import load_split

        styles = [s.strip() for s in style.split(",") if s.strip()]
        total = limit if limit is not None else 512
        per = [total // len(styles) + (i < total % len(styles)) for i in range(len(styles))]
        # Different scenes per style: style i starts where style i - 1's images end.
        starts = [sum(per[:i]) for i in range(len(styles))]
        groups = [
            load_split(
                split, n=n, style=st, start=start, image_size=pictures[0], object_scale=pictures[1]
            )
            for st, n, start in zip(styles, per, starts, strict=True)
        ]
        samples = [g[i] for i in range(max(per)) for g in groups if i < len(g)]
        return [Example(s.load_image(), s.prompt, list(s.captions)) for s in samples]
    from ..data import load_coco

    coco = load_coco(data)
    ids = coco.image_ids if limit is None else coco.image_ids[:limit]
    return [Example(coco.image(i), coco.prompt, list(coco.refs[i])) for i in ids]


def default_template() -> str:
    """The tiny LLaVA's prompt with a `{question}` field (LLaVA-1.5's template, short system
    prompt: `dyrate_ext.train.model.tiny_prompt`)."""
    from .model import tiny_prompt

    return tiny_prompt("{question}")


def check_template(template: str) -> str:
    """`template` unless it lacks the `{question}` field or the `<image>` placeholder."""
    if "{question}" not in template or "<image>" not in template:
        raise ValueError(
            f"prompt template must hold '{{question}}' and '<image>', got {template!r}"
        )
    return template


def build_batches(
    examples: list[Example],
    processor: Any,
    batch_size: int,
    max_caption_tokens: int = 64,
    seed: int = 0,
    template: str | None = None,
) -> list[CaptionBatch]:
    """Fixed batches (examples in order, one seeded reference each), prompts
    `template.format(question=...)` (default `default_template()`) left-padded, captions
    right-padded with the tokenizer's pad id."""
    template = check_template(default_template() if template is None else template)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_caption_tokens < 1:
        raise ValueError(f"max_caption_tokens must be >= 1, got {max_caption_tokens}")
    tok = processor.tokenizer
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: captions need a stop token")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rng = random.Random(seed)
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [template.replace("{question}", e.question) for e in chunk]
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = processor(
                text=texts, images=[e.image for e in chunk], return_tensors="pt", padding=True
            )
        finally:
            tok.padding_side = old_side
        caps = []
        for e in chunk:
            ids = tok(rng.choice(e.refs), add_special_tokens=False).input_ids
            caps.append([*ids, eos][:max_caption_tokens])
        width = max(len(c) for c in caps)
        cap_ids = torch.full((len(caps), width), pad, dtype=torch.int64)
        cap_mask = torch.zeros((len(caps), width), dtype=torch.int64)
        for i, c in enumerate(caps):
            cap_ids[i, : len(c)] = torch.tensor(c)
            cap_mask[i, : len(c)] = 1
        batches.append(
            CaptionBatch(
                enc["input_ids"],
                enc["attention_mask"],
                enc["pixel_values"],
                cap_ids,
                cap_mask,
            )
        )
    return batches


@torch.no_grad()
def greedy_targets(
    model: Any, batches: list[CaptionBatch], max_new_tokens: int, progress: bool = True
) -> list[CaptionBatch]:
    """The batches with their captions replaced by the unpruned model's own greedy captions
    (`dyrate_ext.llava.generate`, NoPrune), each up to and including its stop token: teacher
    forcing then follows the tokens inference actually decodes."""
    from tqdm.auto import tqdm

    from ..llava import NoPrune, generate

    eos = model.generation_config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    device = model.lm_head.weight.device
    out = []
    for b in tqdm(batches, desc="greedy captions", disable=not progress, leave=False):
        g = generate(
            model,
            b.input_ids.to(device),
            b.pixel_values.to(device),
            b.attention_mask.to(device),
            policy=NoPrune(),
            max_new_tokens=max_new_tokens,
        ).new_tokens.cpu()
        stop = torch.isin(g, eos).to(torch.int64)
        before = stop.cumsum(dim=1) - stop  # stop tokens seen before each position
        mask = (before == 0).to(torch.int64)
        out.append(CaptionBatch(b.input_ids, b.attention_mask, b.pixel_values, g, mask))
    return out
