"""Checks and layout of the loop's inputs: the model, left-padded prompts, their slot types,
the image features and the stop tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from ..token_types import TokenType
from .compat import SUPPORTED_TEXT_MODELS

__all__ = ["check_left_padded", "check_model", "eos_ids", "image_features", "prompt_token_type"]


def check_model(model: object) -> None:
    if not isinstance(model, LlavaForConditionalGeneration):
        raise TypeError(
            "dyrate_ext.llava.generate supports transformers.LlavaForConditionalGeneration, got "
            f"{type(model).__module__}.{type(model).__name__}"
        )
    model_type = getattr(model.config.text_config, "model_type", None)
    if model_type not in SUPPORTED_TEXT_MODELS:
        raise TypeError(
            f"unsupported LLaVA text model {model_type!r} "
            f"({type(model.model.language_model).__name__}); supported: {SUPPORTED_TEXT_MODELS}"
        )


def check_left_padded(attention_mask: Tensor) -> None:
    m = attention_mask.to(torch.int64)
    if ((m != 0) & (m != 1)).any():
        raise ValueError("attention_mask must hold only 0 and 1")
    if (m[:, 1:] < m[:, :-1]).any():
        bad = int(torch.nonzero((m[:, 1:] < m[:, :-1]).any(dim=1))[0])
        raise ValueError(
            f"attention_mask row {bad} is not left-padded (a 0 after a 1); pad prompts on the left"
        )
    if (m.sum(dim=1) == 0).any():
        raise ValueError("attention_mask has a row with no real token")


def prompt_token_type(input_ids: Tensor, attention_mask: Tensor, image_token_id: int) -> Tensor:
    """int8 [B, S]: 0 system (before the first image token), 1 image, 2 instruction (text after
    the first image token), -1 padding.

    Raises ValueError when a sample has no image token or ends with one.
    """
    real = attention_mask.bool()
    image = (input_ids == image_token_id) & real
    counts = image.sum(dim=1)
    if (counts == 0).any():
        bad = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"no image token (image_token_id={image_token_id}) in the prompt of sample(s) {bad}"
        )
    if image[:, -1].any():
        bad = torch.nonzero(image[:, -1]).flatten().tolist()
        raise ValueError(
            f"the prompt of sample(s) {bad} ends with an image token; it must end with text "
            "(the last prompt token is never pruned and gives the first logits)"
        )
    after_first = image.to(torch.int64).cumsum(dim=1) > 0
    types = torch.full(input_ids.shape, TokenType.EMPTY, dtype=torch.int8, device=input_ids.device)
    types[real & ~after_first] = TokenType.SYSTEM
    types[real & after_first] = TokenType.INSTRUCTION
    types[image] = TokenType.IMAGE
    return types


def image_features(
    model: LlavaForConditionalGeneration,
    pixel_values: Tensor | None,
    image_features: Tensor | Sequence[Tensor] | None,
    image_sizes: Tensor | None,
) -> Tensor:
    if (pixel_values is None) == (image_features is None):
        raise ValueError("give exactly one of pixel_values and image_features")
    if pixel_values is not None:
        out = model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes, return_dict=True
        )
        feats = out.pooler_output
    else:
        feats = image_features
    if isinstance(feats, Tensor):
        return feats.reshape(-1, feats.shape[-1])
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)


def eos_ids(eos_token_id: int | Sequence[int] | None, device: torch.device) -> Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.tensor(ids, dtype=torch.int64, device=device)
