"""The transformers versions the transformers tiers (`dyrate_ext.llava`, `dyrate_ext.hf`,
`dyrate_ext.embedded`) are written for, checked once at import.

Every module of those tiers imports this module before transformers, so a missing or
unsupported transformers fails with one clear message instead of an AttributeError later. The
torch-only core never imports it.
"""

from __future__ import annotations

try:
    import transformers
    from packaging.version import Version
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "dyrate_ext's transformers tiers need transformers>=5,<6: pip install "
        "'dyrate_ext[llava]' (or: pip install 'transformers>=5,<6' safetensors)"
    ) from exc

TRANSFORMERS_REQUIREMENT = "transformers>=5,<6"
"""The transformers versions these tiers are written for."""

TESTED_TRANSFORMERS = "5.24.0"
"""The transformers release the tests ran on."""


def check_transformers_version(version: str) -> None:
    """Raise ImportError naming the requirement unless `version` is a transformers 5.x."""
    if Version(version).major != 5:
        raise ImportError(
            f"dyrate_ext needs {TRANSFORMERS_REQUIREMENT} (tested with {TESTED_TRANSFORMERS}), "
            f"found transformers {version}"
        )


check_transformers_version(transformers.__version__)
