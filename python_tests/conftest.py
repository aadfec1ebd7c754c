"""Shared fixtures of the tests: the random generator, the SIMT emulator and `backend`, which
runs each op test on every backend (cpu; cuda, skipped without a GPU; emulated, the CUDA kernels
on the host SIMT emulator). Tolerances, shapes and checkers live in dyrate_ext.testing; the
test tiers and the markers in the repository root's conftest.py.
"""

from __future__ import annotations

import pytest
import torch

import dyrate_ext
from dyrate_ext.testing import Backend, cuda_ready
from tools.simt_emu import build as simt_build


def pytest_collection_modifyitems(config, items):
    if dyrate_ext.extension_available():
        return
    skip = pytest.mark.skip(reason="dyrate_ext._C is not built")
    for item in items:
        if "needs_ext" in item.keywords or "reference" not in item.nodeid:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def emu_module():
    """The CUDA kernels and glue built for the host against the SIMT emulator (tools/simt_emu);
    the first use compiles it (about a minute on two cores)."""
    try:
        return simt_build.build()
    except Exception as exc:  # pragma: no cover - no compiler
        pytest.skip(f"the SIMT emulator does not build here: {exc}")


@pytest.fixture
def emu(emu_module):
    """The emulator with every check on, a fixed seed and 132 SMs, reset for each test."""
    emu_module.set_sm_count(132)
    emu_module.set_seed(1)
    emu_module.set_checks(True, True, True, 4)
    yield emu_module
    emu_module.set_checks(True, True, True, 4)


BACKENDS = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.cuda),
    pytest.param("emulated", marks=pytest.mark.emulated),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    """One op-test backend; cuda skips without a CUDA device and a CUDA build."""
    if request.param == "cuda":
        if not cuda_ready():
            pytest.skip("needs a CUDA device and dyrate_ext built with its CUDA kernels")
        return Backend("cuda", torch.ops.dyrate)
    if request.param == "emulated":
        return Backend("emulated", request.getfixturevalue("emu"))
    return Backend("cpu", torch.ops.dyrate)
