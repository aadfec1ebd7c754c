"""The transformers versions and model families `dyrate_ext.hf` supports, checked up front.

Importing `dyrate_ext.hf` fails with one clear message when transformers is missing or outside
`TRANSFORMERS_REQUIREMENT`; `family_of(model)` refuses any model class not in `FAMILIES`,
listing the supported ones, before anything is installed on the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..llava.compat import (  # noqa: F401  (the one version check, run at import)
    TESTED_TRANSFORMERS,
    TRANSFORMERS_REQUIREMENT,
    check_transformers_version,
)


@dataclass(frozen=True)
class Family:
    """A supported model class.

    Attributes:
        text_models: `text_config.model_type` values tested with this class.
        mrope: whether the model uses multimodal rotary positions (Qwen2-VL's rope deltas).
    """

    text_models: tuple[str, ...]
    mrope: bool = False


FAMILIES: dict[str, Family] = {
    "LlavaForConditionalGeneration": Family(("llama",)),
    "LlavaOnevisionForConditionalGeneration": Family(("qwen2",)),
    "Qwen2VLForConditionalGeneration": Family(("qwen2_vl_text",), mrope=True),
    "Qwen2_5_VLForConditionalGeneration": Family(("qwen2_5_vl_text",), mrope=True),
    "InternVLForConditionalGeneration": Family(("qwen2",)),
    "SmolVLMForConditionalGeneration": Family(("llama",)),
}
"""Supported model classes (transformers' own), by class name."""


def supported_models() -> str:
    """The supported classes and text models, for error messages."""
    return ", ".join(f"{name} ({'/'.join(f.text_models)})" for name, f in FAMILIES.items())


def family_of(model: object) -> Family:
    """The model's Family; TypeError listing the supported ones otherwise."""
    name = type(model).__name__
    family = FAMILIES.get(name)
    if family is None or not isinstance(model, nn.Module):
        raise TypeError(
            f"dyrate_ext.hf does not support {type(model).__module__}.{name}; supported: "
            f"{supported_models()}"
        )
    text_type = getattr(text_config(model), "model_type", None)
    if text_type not in family.text_models:
        raise TypeError(
            f"dyrate_ext.hf supports {name} with text model(s) {family.text_models}, got "
            f"{text_type!r}; supported: {supported_models()}"
        )
    return family


def text_config(model: nn.Module):
    """The decoder's config (the model's `text_config`)."""
    return model.config.get_text_config(decoder=True)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layers (`model.model.language_model.layers`, SmolVLM's
    `model.model.text_model.layers`)."""
    inner = model.model
    text = inner.language_model if hasattr(inner, "language_model") else inner.text_model
    layers = text.layers
    assert isinstance(layers, nn.ModuleList)
    return layers


def media_token_ids(model: nn.Module) -> tuple[int, ...]:
    """The token ids whose slots are image tokens: the image token and, where the model has
    one, the video token."""
    cfg = model.config
    ids = []
    for name in ("image_token_id", "video_token_id"):
        value = getattr(cfg, name, None)
        if value is not None:
            ids.append(int(value))
    if not ids:
        raise TypeError(f"{type(model).__name__}'s config has no image_token_id")
    return tuple(ids)
