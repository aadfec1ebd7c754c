"""The tiny LLaVA trained here: its config, tokenizer, processor, and the committed checkpoint.

A real `transformers.LlavaForConditionalGeneration`: a CLIP vision tower (112-pixel images,
14-pixel patches -> 8 x 8 = 64 image tokens, class token dropped, features of the
penultimate layer), LLaVA's two-layer GELU projector, and a Llama decoder with grouped-query
attention (6 layers, width 128, 4 query heads of 32 sharing 2 key/value heads). The tokenizer
is the embedded word-level tokenizer (`dyrate_ext.embedded.build_tokenizer`) with the
caption grammar's words added. Prompts use LLaVA-1.5's template with a shorter system prompt
(`TINY_SYSTEM`, to save CPU time in training): build them with `tiny_prompt(question)`.

    model, processor, tokenizer = load_tiny_llava()          # the committed checkpoint
    inputs = processor(text=[tiny_prompt("Describe the image in detail.")], images=[image],
                       return_tensors="pt")
    model = tiny_llava(TinyConfig(), tokenizer)               # random init (for training)

`load_tiny_llava(path)` loads any folder written by `save_tiny_llava` (or `python -m
dyrate_ext.train vlm --out PATH`) in float32 on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..data import grammar_words
from ..embedded import (
    IMAGE_TOKEN,
    build_processor,
    build_tokenizer,
    llava_config,
    llava_prompt,
)

__all__ = [
    "CHECKPOINTS",
    "DEFAULT_CHECKPOINT",
    "LARGE",
    "MICRO",
    "OBJECT_SCALE_KEY",
    "SIZES",
    "TINY_SYSTEM",
    "TinyConfig",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "load_tiny_llava",
    "picture_settings",
    "resolve_checkpoint",
    "save_tiny_llava",
    "tiny_llava",
    "tiny_prompt",
]

TINY_SYSTEM = "A chat between a curious human and an artificial intelligence assistant."
"""The system prompt the tiny LLaVA was trained with (the first sentence of LLaVA-1.5's)."""


def tiny_prompt(question: str) -> str:
    """LLaVA-1.5's template with the tiny system prompt:
    "{TINY_SYSTEM} USER: <image>\\n{question} ASSISTANT:"."""
    return llava_prompt(question, system=TINY_SYSTEM)


DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "tiny_llava"
"""The committed checkpoint folder (save_pretrained files + tokenizer/processor files)."""


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of the tiny LLaVA (defaults: what `make train-vlm` trains)."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden_size: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    num_layers: int = 6
    hidden_size: int = 128
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    object_scale: float = 1.0
    """Radius of the drawn objects relative to `dyrate_ext.data.render`'s (the pictures this
    model is trained and evaluated on; stored in the checkpoint's config.json)."""
    seed: int = 0

    @property
    def image_tokens(self) -> int:
        """Image tokens per image: (image_size / patch_size)^2."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """The fields as a dict (stored in the training log)."""
        return asdict(self)


MICRO = TinyConfig(
    image_size=28,
    patch_size=14,
    vision_hidden_size=16,
    vision_layers=2,
    vision_heads=2,
    num_layers=4,
    hidden_size=32,
    intermediate_size=64,
    num_heads=4,
    num_kv_heads=2,
)
"""A micro config (4 image tokens, 4 decoder layers of width 32) for tests and smoke runs."""

LARGE = TinyConfig(image_size=224, num_layers=8, object_scale=0.5)
"""The large tiny LLaVA, in the paper's regime: 224-pixel pictures -> 16 x 16 = 256 image
tokens (92 % of the prompt), objects drawn at half the radius (most patches are background),
8 decoder layers of width 128."""

SIZES: dict[str, TinyConfig] = {"small": TinyConfig(), "large": LARGE}
"""The embedded tiny LLaVAs by name (`--size` / `--model` on the command lines)."""

CHECKPOINTS: dict[str, Path] = {
    "small": DEFAULT_CHECKPOINT,
    "large": DEFAULT_CHECKPOINT.with_name("tiny_llava_large"),
}
"""Where each size's trained checkpoint is committed."""

OBJECT_SCALE_KEY = "dyrate_object_scale"
"""The config.json attribute that carries `TinyConfig.object_scale` with a checkpoint."""


def resolve_checkpoint(model: str | os.PathLike[str] | None) -> Path:
    """The checkpoint folder of `model`: a size name of `CHECKPOINTS` ("small", "large"), a
    folder path, or None for the small one."""
    if model is None:
        return DEFAULT_CHECKPOINT
    if isinstance(model, str) and model in CHECKPOINTS:
        return CHECKPOINTS[model]
    return Path(model)


def picture_settings(model: Any) -> tuple[int, float]:
    """(image size in pixels, object scale) of the pictures `model` (a tiny LLaVA) reads."""
    config = model.config
    return int(config.vision_config.image_size), float(getattr(config, OBJECT_SCALE_KEY, 1.0))


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded word-level tokenizer plus every word of the caption grammar."""
    return build_tokenizer(extra_words=grammar_words())


def build_tiny_processor(
    tokenizer: PreTrainedTokenizerFast, config: TinyConfig = TinyConfig()
) -> LlavaProcessor:
    """LLaVA-1.5's processor at the tiny model's image and patch size."""
    return build_processor(tokenizer, image_size=config.image_size, patch_size=config.patch_size)


def tiny_llava(
    config: TinyConfig, tokenizer: PreTrainedTokenizerFast
) -> LlavaForConditionalGeneration:
    """A randomly initialised float32 tiny LLaVA (HF's init, seeded by `config.seed`)."""
    c = config
    ids = (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert isinstance(image_token_id, int)  # one token in, one id out
    llava = llava_config(
        c,
        len(tokenizer),
        image_token_id,
        vision_heads=c.vision_heads,
        vision_mlp_ratio=4,
        max_position_embeddings=512,
        special_ids=(*ids, tokenizer.pad_token_id),
    )
    setattr(llava, OBJECT_SCALE_KEY, c.object_scale)
    torch.manual_seed(c.seed)
    model = LlavaForConditionalGeneration(llava)
    model.set_attn_implementation("sdpa")
    g = model.generation_config
    g.pad_token_id, g.eos_token_id, g.bos_token_id = (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    return model


def save_tiny_llava(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    path: str | os.PathLike[str],
    half: bool = True,
) -> Path:
    """`save_pretrained` the model (its weights in float16 when `half`) and the processor (with
    its tokenizer) into `path`; the model in memory is not touched."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if half:  # a float16 copy: the model keeps its own weights untouched
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(out, state_dict=state)
    processor.save_pretrained(out)
    return out


def load_tiny_llava(
    path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, Any]:
    """(model in eval mode, in `dtype`; processor; tokenizer) from a saved folder (the tiny
    LLaVA's or any llava-hf checkpoint's, or a size name: `resolve_checkpoint`), by default the
    committed `DEFAULT_CHECKPOINT`."""
    folder = resolve_checkpoint(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no tiny LLaVA checkpoint at {folder} (config.json missing): train one with "
            "`python -m dyrate_ext.train vlm`"
        )
    # Any: transformers wraps PreTrainedModel.to in functools.wraps(nn.Module.to), which mypy
    # reads as an unbound function (it asks for `self`).
    model: Any = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation
    )
    processor = LlavaProcessor.from_pretrained(folder)
    return model.to(device).eval(), processor, processor.tokenizer
