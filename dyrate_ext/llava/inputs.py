"""Checks and layout of the loop's inputs: the model, left-padded prompts, their slot types,
the image features and the stop tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

__all__ = [
    "SUPPORTED_TEXT_MODELS",
    "check_left_padded",
    "check_model",
    "eos_ids",
    "image_features",
]

SUPPORTED_TEXT_MODELS = ("llama",)
"""`text_config.model_type` values the reference loop's decoder reimplementation is exact for."""


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
