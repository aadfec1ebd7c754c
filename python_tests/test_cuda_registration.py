"""A CUDA build registers a CUDA kernel for every dyrate op; needs no GPU.

CI sets DYRATE_EXPECT_CUDA=1 where torch has CUDA and nvcc is installed, so a build that
silently fell back to CPU-only fails there. Elsewhere the test runs when the build has CUDA
kernels at all (detected on one op) and skips on CPU-only builds.
"""

from __future__ import annotations

import os

import pytest
import torch

import dyrate_ext
from dyrate_ext import _ext

EXPECT_CUDA = os.environ.get("DYRATE_EXPECT_CUDA", "0") == "1"


def _build_has_cuda() -> bool:
    return dyrate_ext.has_kernel(_ext.OP_NAMES[0], "CUDA")


def test_every_op_has_a_cuda_kernel():
    if not EXPECT_CUDA and not _build_has_cuda():
        reason = "this torch has no CUDA" if torch.version.cuda is None else "a CPU-only build"
        pytest.skip(f"{reason} (set DYRATE_EXPECT_CUDA=1 to require the CUDA kernels)")
    if EXPECT_CUDA:
        assert torch.version.cuda is not None, "DYRATE_EXPECT_CUDA=1 but this torch has no CUDA"
    missing = [op for op in _ext.OP_NAMES if not dyrate_ext.has_kernel(op, "CUDA")]
    assert not missing, f"ops without a CUDA kernel: {missing}"


def test_cuda_registrations_are_exactly_the_ops():
    if not _build_has_cuda():
        pytest.skip("no CUDA kernels in this build")
    registered = {
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
        if name.startswith("dyrate::")
    }
    assert registered == set(_ext.OP_NAMES)


def test_every_op_has_a_cpu_kernel():
    missing = [op for op in _ext.OP_NAMES if not dyrate_ext.has_kernel(op, "CPU")]
    assert not missing, f"ops without a CPU kernel: {missing}"
