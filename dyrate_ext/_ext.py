"""Loads the compiled op library (dyrate_ext._C) and says clearly how to build it if absent.

Importing dyrate_ext never fails for want of the extension: the reference module and the
pure-Python parts stay usable, and the first call of a compiled op raises the build hint.
"""

from __future__ import annotations

import importlib

import torch

BUILD_HINT = (
    "dyrate_ext's compiled ops are not built. From the repository root run\n"
    "    pip install --no-build-isolation -e .\n"
    "with torch already installed (or `make test`, which installs what is missing). "
    "Set DYRATE_FORCE_CPU=1 for a CPU-only build."
)

_load_error: Exception | None = None
try:
    importlib.import_module("dyrate_ext._C")
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _load_error = exc


def available() -> bool:
    """True when the compiled ops are registered under torch.ops.dyrate."""
    return _load_error is None


def require() -> None:
    """Raise a RuntimeError with the build hint when the compiled ops are missing."""
    if _load_error is not None:
        raise RuntimeError(f"{BUILD_HINT}\n(import error: {_load_error})")


def has_kernel(op: str, backend: str) -> bool:
    """Whether `dyrate::<op>` has a kernel for `backend` ('CPU', 'CUDA') in this build."""
    if not available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"dyrate::{op}", backend)


OP_NAMES = (
    "attention_stats",
    "attention_stats_from_probs",
    "select_keep",
    "compact_",
    "compact_token_type_",
    "compact_paged_",
)
