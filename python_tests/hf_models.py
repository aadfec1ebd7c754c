"""Tiny models of each family `dyrate_ext.hf` supports, their prompts, and a masked reference.

Every model is built in code from transformers' own config classes with random weights from a
fixed seed (hidden 64, 4 layers, 4 query heads, 2 kv heads, tiny vision towers), float32, eval
mode. The text weights are re-drawn larger than HF's default init (q/k std 0.1, as in
llava_utils) so attention is peaked and keep decisions do not hinge on rounding.

- `tiny_model(family, attn)`: "llava" (llava_utils' model), "qwen2_vl", "qwen2_5_vl",
  "onevision", "internvl", "smolvlm".
- `tiny_batch(family, model, batch, seed)`: left-padded prompts "system, image(s),
  instruction" as a dict for `model.generate(**inputs)`. Qwen2-VL/2.5-VL prompts hold two
  images of different sizes; LLaVA-OneVision images have different sizes, so AnyRes gives
  different numbers of image tokens per sample; InternVL images have 1-3 tiles of 16 tokens,
  SmolVLM prompts 1-2 images of 16 tokens.
- `masked_reference(model, inputs, sequences, removed_step, k)`: HF's own forward of prompt +
  generated tokens, every slot kept, in which a query row of step t cannot see, in layers >= k,
  the image slots removed at steps <= t. Its logits must equal the pruned generate()'s.
"""

from __future__ import annotations

import torch
from llava_utils import late_mask_in, reference_masks, tiny_llava
from llava_utils import prompts as llava_prompts
from torch import Tensor

from dyrate_ext.embedded import peak_text_weights
from dyrate_ext.hf._compat import decoder_layers

VOCAB = 200
IMAGE, VIDEO, VSTART, VEND = 190, 191, 192, 193
NUM_LAYERS, NUM_HEADS, KV_HEADS = 4, 4, 2
FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "onevision", "internvl", "smolvlm")


def _text_kwargs() -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _qwen_vl(version: str, seed: int):
    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
            window_size=8,
        )
    vision.update(patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = _text_kwargs()
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": [2, 3, 3],
        "rope_theta": 1e4,
    }
    config = Config(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    torch.manual_seed(seed)
    return Model(config).eval()


def _onevision(seed: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_kwargs()),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def _internvl(seed: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=(32, 32),
        patch_size=(4, 4),
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_text_kwargs()),
        image_token_id=IMAGE,
        image_seq_length=INTERNVL_TILE_TOKENS,
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config).eval()


def _smolvlm(seed: int):
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration

    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
    )
    config = SmolVLMConfig(
        vision_config=vision,
        text_config=LlamaConfig(**_text_kwargs()),
        image_token_id=IMAGE,
        scale_factor=2,
    )
    torch.manual_seed(seed)
    return SmolVLMForConditionalGeneration(config).eval()


def tiny_model(family: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A tiny float32 model of `family` with `attn` attention, deterministic for a seed."""
    if family == "llava":
        return tiny_llava(KV_HEADS, attn, seed=seed)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        model = _qwen_vl("2" if family == "qwen2_vl" else "2.5", seed)
    elif family == "onevision":
        model = _onevision(seed)
    elif family == "internvl":
        model = _internvl(seed)
    elif family == "smolvlm":
        model = _smolvlm(seed)
    else:
        raise ValueError(f"unknown family {family!r}")
    peak_text_weights(model, seed + 1, std=0.02, qk_std=0.1)
    model.set_attn_implementation(attn)
    return model


def _left_pad(rows: list[Tensor], extra: list[Tensor] | None = None) -> tuple[Tensor, ...]:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.int64)
    mask = torch.zeros(len(rows), length, dtype=torch.int64)
    types = torch.zeros(len(rows), length, dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
        if extra is not None:
            types[b, length - len(r) :] = extra[b]
    return ids, mask, types


def _text(gen: torch.Generator, n: int) -> Tensor:
    return torch.randint(3, IMAGE - 1, (n,), generator=gen)


# Per sample: the (h, w) patch grids of its two images (multiples of the merge size 2).
QWEN_GRIDS = [((8, 8), (4, 10)), ((6, 6), (8, 4)), ((4, 4), (10, 6))]


def _qwen_batch(model, batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows, kinds, grids = [], [], []
    for b in range(batch):
        parts, kind = [_text(gen, 3 + b)], [torch.zeros(3 + b, dtype=torch.int64)]
        for h, w in QWEN_GRIDS[b % len(QWEN_GRIDS)]:
            n = h * w // 4
            parts += [torch.tensor([VSTART]), torch.full((n,), IMAGE), torch.tensor([VEND])]
            kind += [torch.zeros(1, dtype=torch.int64), torch.ones(n, dtype=torch.int64)]
            kind += [torch.zeros(1, dtype=torch.int64)]
            parts.append(_text(gen, 2))
            kind.append(torch.zeros(2, dtype=torch.int64))
            grids.append((1, h, w))
        parts.append(_text(gen, 4 + b % 2))
        kind.append(torch.zeros(4 + b % 2, dtype=torch.int64))
        rows.append(torch.cat(parts))
        kinds.append(torch.cat(kind))
    ids, mask, mm = _left_pad(rows, kinds)
    grid = torch.tensor(grids, dtype=torch.int64)
    dim = 3 * 2 * 2 * 2  # channels * temporal patch * patch * patch
    pixels = torch.randn(int(grid.prod(dim=1).sum()), dim, generator=gen)
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        image_grid_thw=grid,
        mm_token_type_ids=mm,
    )


ONEVISION_SIZES = [(16, 32), (32, 32), (16, 16)]


def _onevision_batch(model, batch: int, seed: int) -> dict:
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        image_size_to_num_patches,
    )

    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    sizes = [ONEVISION_SIZES[b % len(ONEVISION_SIZES)] for b in range(batch)]
    patches = [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        for s in sizes
    ]
    side = cfg.vision_config.image_size
    pixels = torch.randn(batch, max(patches), 3, side, side, generator=gen)
    image_sizes = torch.tensor(sizes, dtype=torch.int64)
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pixels, image_sizes=image_sizes, return_dict=True
        ).pooler_output
    rows = []
    for b in range(batch):
        n = feats[b].shape[0]
        rows.append(torch.cat([_text(gen, 3 + b), torch.full((n,), IMAGE), _text(gen, 4 + b)]))
    ids, mask, _ = _left_pad(rows)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=image_sizes)


INTERNVL_TILE_TOKENS = 16  # (32 / 4)^2 patches, pixel-shuffled by 0.5 x 0.5
INTERNVL_TILES = [2, 1, 3]  # tiles per sample's image


def _internvl_batch(model, batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tiles = [INTERNVL_TILES[b % len(INTERNVL_TILES)] for b in range(batch)]
    rows = []
    for b in range(batch):
        n = tiles[b] * INTERNVL_TILE_TOKENS
        rows.append(torch.cat([_text(gen, 3 + b), torch.full((n,), IMAGE), _text(gen, 4 + b)]))
    ids, mask, _ = _left_pad(rows)
    pixels = torch.randn(sum(tiles), 3, 32, 32, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


SMOLVLM_IMAGES = [1, 2, 1]  # images per sample, 16 tokens each ((32 / 4)^2 / 2^2)


def _smolvlm_batch(model, batch: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    counts = [SMOLVLM_IMAGES[b % len(SMOLVLM_IMAGES)] for b in range(batch)]
    rows = []
    for b in range(batch):
        parts = [_text(gen, 3 + b)]
        for _ in range(counts[b]):
            parts += [torch.full((16,), IMAGE), _text(gen, 2)]
        rows.append(torch.cat([*parts, _text(gen, 3)]))
    ids, mask, _ = _left_pad(rows)
    pixels = torch.zeros(batch, max(counts), 3, 32, 32)  # all-zero images are padding
    for b in range(batch):
        pixels[b, : counts[b]] = torch.randn(counts[b], 3, 32, 32, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def tiny_batch(family: str, model, batch: int, seed: int = 0) -> dict:
    """Left-padded prompts for `model.generate(**inputs)` (see the module docstring)."""
    if family == "llava":
        p = llava_prompts(batch, seed=seed)
        return dict(
            input_ids=p.input_ids, attention_mask=p.attention_mask, pixel_values=p.pixel_values
        )
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _qwen_batch(model, batch, seed)
    if family == "onevision":
        return _onevision_batch(model, batch, seed)
    if family == "internvl":
        return _internvl_batch(model, batch, seed)
    if family == "smolvlm":
        return _smolvlm_batch(model, batch, seed)
    raise ValueError(f"unknown family {family!r}")


def _positions(model, inputs: dict, fed: Tensor, mask2d: Tensor) -> Tensor:
    """Rotary position ids of the fed sequence as generate() gives them."""
    if "image_grid_thw" not in inputs:
        return (mask2d.cumsum(1) - 1).clamp(min=0)
    extra = fed.shape[1] - inputs["input_ids"].shape[1]
    mm = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(fed.shape[0], extra, dtype=torch.int64)], 1
    )
    pos, _ = model.model.get_rope_index(
        fed, mm_token_type_ids=mm, image_grid_thw=inputs["image_grid_thw"], attention_mask=mask2d
    )
    return pos


def masked_reference(
    model, inputs: dict, sequences: Tensor, removed_step: Tensor, k: int | None
) -> Tensor:
    """float32 [T, B, V]: each step's next-token logits from HF's forward of the whole fed
    sequence, every slot kept, with the image slots removed at steps <= t masked in layers >= k
    for the query row of step t (see the module docstring)."""
    prompt_len = inputs["input_ids"].shape[1]
    steps = sequences.shape[1] - prompt_len
    fed = sequences[:, : prompt_len + steps - 1]
    masks = reference_masks(inputs["attention_mask"], removed_step, steps)
    media = {key: v for key, v in inputs.items() if key not in ("input_ids", "attention_mask")}
    media.pop("mm_token_type_ids", None)
    with late_mask_in(decoder_layers(model), k, masks.late), torch.no_grad():
        res = model(
            input_ids=fed,
            attention_mask=masks.base,
            position_ids=_positions(model, inputs, fed, masks.mask2d),
            use_cache=False,
            **media,
        )
    rows_of_step = torch.arange(steps) + prompt_len - 1
    return res.logits[:, rows_of_step].transpose(0, 1).float()
