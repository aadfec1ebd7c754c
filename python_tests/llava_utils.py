"""Tiny LLaVA models built offline from configs, prompts, and a masked reference decoder.

Models: the embedded builder (`dyrate_ext.embedded`) at test size: CLIP vision (32x32
images, 4x4 patches: a grid of 64 image tokens) + a 4-layer Llama (hidden 64, 4 heads;
`kv_heads=2` gives grouped-query attention), random weights from a fixed seed. The text
weights are re-drawn larger than HF's default init (q/k std 0.1) so attention
is peaked: image-token scores then differ clearly, keep decisions do not hinge on rounding,
and adaptive policies pick different keep counts for different samples.

The reference (`masked_reference`) is HF's own forward of the whole generated sequence,
every slot kept, with a per-layer 4D mask: in layers >= k a query row of step t cannot see
the image slots removed at steps <= t (it always sees itself). Its logits must equal those of
the physically pruned loop.

`save_tiny_checkpoint` writes a 3-layer trainable tiny LLaVA (`dyrate_ext.train.model`) for
the training commands' smoke runs.

`picture_predictor` is a hand-set RatePredictor on the picture features alone, whose decisions
on these models differ between samples already at the prefill.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from dyrate_ext.embedded import EmbeddedConfig, embedded_llava
from dyrate_ext.picture_features import PICTURE_FEATURES
from dyrate_ext.predictor import RatePredictor

IMAGE_TOKEN = 199
VOCAB = 200
NUM_LAYERS = 4
NUM_HEADS = 4
GRID = 64  # image tokens per image


def tiny_llava(
    kv_heads: int = NUM_HEADS,
    attn: str = "eager",
    seed: int = 0,
    image_size: int = 32,
    num_layers: int = NUM_LAYERS,
) -> LlavaForConditionalGeneration:
    """The embedded builder at test size: a float32 LlavaForConditionalGeneration in eval
    mode, deterministic for a seed.

    The image grid is (image_size / 4)^2 tokens: 64 by default, 576 (LLaVA-1.5's) for 96.
    """
    config = EmbeddedConfig(
        num_layers=num_layers,
        hidden_size=64,
        intermediate_size=128,
        num_heads=NUM_HEADS,
        num_kv_heads=kv_heads,
        image_size=image_size,
        patch_size=4,
        vision_hidden_size=32,
        vision_layers=2,
        qk_std=0.1,
        std=0.02,
        seed=seed,
        attn_implementation=attn,
    )
    return embedded_llava(config, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN)


@dataclass
class Prompts:
    input_ids: Tensor  # int64 [B, S], left padded
    attention_mask: Tensor  # int64 [B, S]
    pixel_values: Tensor  # float32 [B, 3, 32, 32]

    def sample(self, b: int) -> Prompts:
        """Sample b alone, its padding removed."""
        keep = self.attention_mask[b].bool()
        return Prompts(
            self.input_ids[b, keep][None],
            self.attention_mask[b, keep][None],
            self.pixel_values[b : b + 1],
        )


def prompts(
    batch: int,
    seed: int = 0,
    system: tuple[int, ...] = (3, 5, 4),
    instruction: tuple[int, ...] = (6, 9, 3),
    image_size: int = 32,
) -> Prompts:
    """`batch` prompts "system text, image tokens, instruction text" of different lengths,
    left padded, each with its own random image of image_size^2 pixels (4x4 patches)."""
    grid = (image_size // 4) ** 2
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        sys_ids = torch.randint(3, IMAGE_TOKEN - 1, (system[b % len(system)],), generator=gen)
        ins_ids = torch.randint(
            3, IMAGE_TOKEN - 1, (instruction[b % len(instruction)],), generator=gen
        )
        rows.append(torch.cat([sys_ids, torch.full((grid,), IMAGE_TOKEN), ins_ids]))
    length = max(len(r) for r in rows)
    ids = torch.zeros(batch, length, dtype=torch.int64)
    mask = torch.zeros(batch, length, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    pixels = torch.randn(batch, 3, image_size, image_size, generator=gen)
    return Prompts(ids, mask, pixels)


@dataclass
class ReferenceMasks:
    mask2d: Tensor  # int64 [B, N]: the fed sequence's attention mask (prompt + steps - 1)
    step_of_row: Tensor  # int64 [N]: the step that fed each row
    base: Tensor  # float32 [B, 1, N, N] additive: causal over real slots (layers < k)
    late: Tensor  # the same, less the image slots removed at steps <= the row's (layers >= k)


def reference_masks(attention_mask: Tensor, removed_step: Tensor, steps: int) -> ReferenceMasks:
    """The masks of a masked reference of `steps` generated tokens: left-padded prompts'
    attention_mask int64 [B, S] and removed_step int64 [B, S] (-1 never). A row always sees
    its own slot."""
    batch, prompt_len = attention_mask.shape
    mask2d = torch.cat([attention_mask, torch.ones(batch, steps - 1, dtype=torch.int64)], dim=1)
    n = mask2d.shape[1]
    step_of_row = torch.cat([torch.zeros(prompt_len, dtype=torch.int64), torch.arange(1, steps)])
    rows = torch.arange(n)[:, None]
    cols = torch.arange(n)[None, :]
    diag = (rows == cols)[None]
    base = (mask2d.bool()[:, None, :] & (cols <= rows)[None]) | diag  # [B, N, N]
    removed = torch.cat(
        [removed_step, torch.full((batch, steps - 1), -1, dtype=torch.int64)], dim=1
    )  # [B, N]
    gone = (removed[:, None, :] >= 0) & (removed[:, None, :] <= step_of_row[None, :, None])
    late = (base & ~gone) | diag

    def additive(allowed: Tensor) -> Tensor:
        m = torch.zeros(allowed.shape, dtype=torch.float32)
        return m.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

    return ReferenceMasks(mask2d, step_of_row, additive(base), additive(late))


@contextmanager
def late_mask_in(layers: Sequence[torch.nn.Module], k: int | None, late: Tensor) -> Iterator[None]:
    """While inside, decoder layers >= k get `late` as their attention mask (none for None)."""

    def swap(module, args, kwargs):
        kwargs["attention_mask"] = late
        return args, kwargs

    hooks = (
        []
        if k is None
        else [x.register_forward_pre_hook(swap, with_kwargs=True) for x in layers[k:]]
    )
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@dataclass
class Reference:
    logits: Tensor  # float32 [T, B, V]: each step's next-token logits
    keys: list[Tensor]  # per layer [B, H_kv, N, D] rotated keys of every fed slot
    values: list[Tensor]
    attentions: list[Tensor] | None  # per layer [B, H, N, N] (eager models only)
    token_type: Tensor  # int8 [B, N] of the fed sequence
    step_of_row: Tensor  # int64 [N]: the step that fed each row


def masked_reference(
    model: LlavaForConditionalGeneration, p: Prompts, out, k: int | None
) -> Reference:
    """HF forward of prompt + generated tokens with removed image slots masked in layers >= k.

    `out` is a dyrate_ext.llava.GenerateOutput; its trace.removed_step says what was removed
    when. Positions are HF generate's: cumsum(attention_mask) - 1.
    """
    seq = out.sequences
    batch, prompt_len = p.input_ids.shape
    steps = seq.shape[1] - prompt_len
    fed = seq[:, : prompt_len + steps - 1]
    masks = reference_masks(p.attention_mask, out.trace.removed_step, steps)
    positions = (masks.mask2d.cumsum(1) - 1).clamp(min=0)
    layers = model.model.language_model.layers
    eager = model.config.text_config._attn_implementation == "eager"
    with late_mask_in(layers, k, masks.late), torch.no_grad():
        res = model(
            input_ids=fed,
            pixel_values=p.pixel_values,
            attention_mask=masks.base,
            position_ids=positions,
            use_cache=True,
            output_attentions=eager,
        )
    step_of_row = masks.step_of_row
    rows_of_step = torch.arange(steps) + prompt_len - 1
    logits = res.logits[:, rows_of_step].transpose(0, 1).float()
    cache = res.past_key_values
    types = torch.cat(
        [out.trace.token_type, torch.full((batch, steps - 1), 3, dtype=torch.int8)], dim=1
    )
    return Reference(
        logits=logits,
        keys=[layer.keys for layer in cache.layers],
        values=[layer.values for layer in cache.layers],
        attentions=list(res.attentions) if eager else None,
        token_type=types,
        step_of_row=step_of_row,
    )


def save_tiny_checkpoint(path: Path) -> Path:
    """Save a 3-layer trainable tiny LLaVA (56-pixel images, width 48, 4 heads, 2 KV heads,
    float32) with its processor to `path`; returns `path`."""
    from dyrate_ext.train.model import (
        TinyConfig,
        build_tiny_processor,
        build_tiny_tokenizer,
        save_tiny_llava,
    )
    from dyrate_ext.train.model import tiny_llava as tiny_trainable

    cfg = TinyConfig(
        image_size=56, vision_hidden_size=32, vision_layers=1, num_layers=3, hidden_size=48,
        intermediate_size=96, num_heads=4, num_kv_heads=2,
    )  # fmt: skip
    tok = build_tiny_tokenizer()
    save_tiny_llava(tiny_trainable(cfg, tok), build_tiny_processor(tok, cfg), path, half=False)
    return path


def picture_predictor(
    num_heads: int = NUM_HEADS, num_rates: int = 4, low: float = 0.33, high: float = 0.40
) -> RatePredictor:
    """A RatePredictor with both picture features whose class is the integer nearest
    t = (K-1) (m - low) / (high - low), clipped to [0, K-1], m the image_top_mass (weights 0
    on the type mass and the entropy; logit_j = 2 j t - j^2, as `from_image_mass`).

    On `tiny_llava` the top-quarter mass m lies in about [0.335, 0.395], so with the defaults
    the classes differ between samples at the prefill and between steps; a predictor that
    ignored its features would decide one constant class."""
    pred = RatePredictor(num_heads, num_rates, features=PICTURE_FEATURES)
    j = torch.arange(num_rates, dtype=torch.float64)
    b = (num_rates - 1) / (high - low)
    weight = torch.zeros(num_rates, pred.in_features, dtype=torch.float64)
    weight[:, num_heads * 4 + PICTURE_FEATURES.index("image_top_mass")] = 2 * j * b
    with torch.no_grad():
        pred.linear.weight.copy_(weight)
        pred.linear.bias.copy_(2 * j * (-b * low) - j * j)
    return pred
