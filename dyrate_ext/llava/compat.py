"""The transformers versions the LLaVA tier is written for, checked once at import.

Every module of `dyrate_ext.llava` imports transformers through here, so a missing or
unsupported transformers fails with one clear message instead of an AttributeError later.
"""

from __future__ import annotations

try:
    import transformers
    from packaging.version import Version
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dyrate_ext.llava needs transformers>=5,<6: pip install 'dyrate_ext[llava]' "
        "(or: pip install 'transformers>=5,<6' safetensors)"
    ) from exc

TRANSFORMERS_REQUIREMENT = "transformers>=5,<6"
"""The transformers versions this tier is written for (tested with 5.23)."""

if Version(transformers.__version__).major != 5:  # pragma: no cover
    raise ImportError(
        f"dyrate_ext.llava needs {TRANSFORMERS_REQUIREMENT}, found {transformers.__version__}"
    )

SUPPORTED_TEXT_MODELS = ("llama",)
"""`text_config.model_type` values the decoder reimplementation is exact for."""
