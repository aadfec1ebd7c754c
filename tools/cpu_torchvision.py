"""Lets PyPI's torchvision import beside a CPU build of torch (the vLLM test environment only).

PyPI's torchvision 0.28 is a CUDA build: its C++ ops link libtorch_cuda and do not load beside
torch 2.13.0+cpu. torchvision's import survives that, except that it registers fake kernels for
two of those ops (nms, qnms) unconditionally, which fails when the ops were never defined.
`make test-vllm` installs this file as a module with a .pth line that imports it at interpreter
start (vLLM's workers included); the first `import torchvision` then defines those two schemas,
without kernels, when torch has no CUDA. The transforms that transformers' image processors use
are Python over torch ops and work; calling nms raises (vLLM's LLaVA and Qwen2-VL never do).
Importing this module costs nothing until torchvision is imported: torch is imported then.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: Any = None  # the torch.library fragment; it must outlive the import


def define_schemas() -> None:
    """Define SCHEMAS in the torchvision namespace when this torch has no CUDA."""
    global _LIBRARY
    import torch

    if torch.version.cuda is not None or _LIBRARY is not None:
        return
    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    for schema in SCHEMAS:
        _LIBRARY.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs define_schemas once, just before torchvision is first imported; finds nothing."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_schemas()
        return None


if "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _BeforeTorchvision())
