"""The transformers versions, internals and model families `dyrate_ext.hf` relies on, checked
up front.

Importing `dyrate_ext.hf` fails with one clear message when transformers is missing or outside
`TRANSFORMERS_REQUIREMENT`; `family_of(model)` refuses any model class not in `FAMILIES`,
listing the supported ones, and `check_api` refuses a transformers whose internals differ from
what the session hooks into, naming the version, before anything is installed on the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .._transformers import (  # noqa: F401  (the one version check, run at import)
    TESTED_TRANSFORMERS,
    TRANSFORMERS_REQUIREMENT,
    check_transformers_version,
)

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - _transformers raised first
    raise ImportError(TRANSFORMERS_REQUIREMENT) from exc

TRANSFORMERS_VERSION = transformers.__version__
"""The transformers release in use."""


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


def text_config(model: Any) -> Any:
    """The decoder's config (the model's `text_config`). Models and configs are typed Any in
    this tier: transformers types submodules `Tensor | Module` and configs `dict | None`."""
    return model.config.get_text_config(decoder=True)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The text decoder's layers (`model.model.language_model.layers`, SmolVLM's
    `model.model.text_model.layers`)."""
    inner: Any = model.model
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


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _api_error(what: str) -> RuntimeError:
    return RuntimeError(
        f"dyrate_ext.hf: transformers {TRANSFORMERS_VERSION} differs from what the pruning "
        f"session hooks into (tested with {TESTED_TRANSFORMERS}): {what}"
    )


_CACHE_METHODS = {
    "update": ["self", "key_states", "value_states", "layer_idx", "args", "kwargs"],
    "get_seq_length": ["self", "layer_idx"],
    "get_mask_sizes": ["self", "query_length", "layer_idx"],
}
"""The Cache methods PruningCache overrides, with transformers' parameter names."""

_LAYER_METHODS = {"lazy_initialization", "update", "get_mask_sizes", "get_seq_length"}
"""CacheLayerMixin's abstract methods PruningCache's layers implement (and get_max_length)."""


def _check_cache_api() -> None:
    for name, params in _CACHE_METHODS.items():
        if _params(getattr(Cache, name)) != params:
            raise _api_error(f"Cache.{name} takes {_params(getattr(Cache, name))}, not {params}")
    abstract = set(getattr(CacheLayerMixin, "__abstractmethods__", ())) - {"get_max_length"}
    if abstract != _LAYER_METHODS:
        raise _api_error(f"CacheLayerMixin's abstract methods are {sorted(abstract)}")
    probe = type("_Probe", (CacheLayerMixin,), dict.fromkeys(_LAYER_METHODS | {"get_max_length"}))
    layer = probe()
    if not all(hasattr(layer, a) for a in ("keys", "values", "is_initialized")):
        raise _api_error("cache layers no longer hold keys / values / is_initialized")


def check_api(model: nn.Module, layers: Iterable[nn.Module]) -> Callable[..., Any]:
    """Check the transformers internals a pruning session uses on this model (RuntimeError
    naming the transformers version otherwise); returns the modeling file's eager attention.

    Checked: the Cache / cache-layer methods PruningCache overrides; that `generate()` hands
    the cache to the model's forward as `cache=` with `input_ids` and `attention_mask`, and
    that no other wrapper already replaced the instance's `generate`; that decoder layers take
    `hidden_states`, `position_embeddings` and `position_ids` (the prefill hook swaps them) and
    their attention modules have `layer_idx` and `scaling`; that the attention's modeling file
    defines `eager_attention_forward` (the function `dyrate_eager` wraps).
    """
    _check_cache_api()
    forward = _params(type(model).forward)
    for name in ("input_ids", "attention_mask", "cache"):
        if name not in forward:
            raise _api_error(f"{type(model).__name__}.forward has no `{name}` parameter")
    if "generate" in vars(model):
        raise RuntimeError(
            f"{type(model).__name__}.generate is already replaced on this instance (another "
            "wrapper or pruning block); dyrate_ext.hf.pruning wraps the class's generate"
        )
    eager = None
    for layer in layers:
        params = _params(type(layer).forward)
        for name in ("hidden_states", "position_embeddings", "position_ids"):
            if name not in params:
                raise _api_error(f"{type(layer).__name__}.forward has no `{name}` parameter")
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "layer_idx") or not hasattr(attn, "scaling"):
            raise _api_error(f"{type(layer).__name__}.self_attn has no layer_idx / scaling")
        fn = getattr(inspect.getmodule(type(attn)), "eager_attention_forward", None)
        if not callable(fn):
            raise _api_error(f"{type(attn).__module__} defines no eager_attention_forward")
        eager = fn
    assert eager is not None
    return eager
