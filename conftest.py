"""The test tiers and markers of python_tests/, defined here and nowhere else (the Makefile
only names a tier). A rootdir conftest, so `--tier` works wherever pytest starts from.

    pytest [--tier fast]    `make test`, CI: every test not marked `slow`
    pytest --tier full      `make test-full`: every test

A `slow` test (a large shape grid, a long integration run) belongs to the full tier only; its
smoke-sized sibling, named `test_<command>_smoke`, keeps the fast tier running the same
command. In both tiers the `slow` grids stay off the SIMT emulator (the `backend` fixture's
"emulated" parameter), where each would take minutes. `-m` and `-k` select within the tier.
Fixtures: python_tests/conftest.py.
"""

from __future__ import annotations

import pytest

TIERS = ("fast", "full")

MARKERS = (
    "slow: in the full tier only (`--tier full`, `make test-full`): large grids, long runs",
    "cuda: needs a CUDA device; skipped without one",
    "emulated: the CUDA kernels run on the host SIMT emulator (both tiers)",
    "needs_ext: needs the compiled extension (skipped without a build)",
)


def pytest_addoption(parser):
    parser.addoption(
        "--tier",
        choices=TIERS,
        default="fast",
        help="test tier: fast (the default; `make test`, CI: the tests not marked slow) or "
        "full (`make test-full`: every test)",
    )


def pytest_configure(config):
    for line in MARKERS:
        config.addinivalue_line("markers", line)


def _backend(item) -> str | None:
    params = getattr(item, "callspec", None)
    return params.params.get("backend") if params else None


def pytest_collection_modifyitems(config, items):
    slow = [item for item in items if item.get_closest_marker("slow")]
    if config.getoption("--tier") == "fast":
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]
        return
    too_slow = pytest.mark.skip(reason="large shapes are not run on the SIMT emulator")
    for item in slow:
        if _backend(item) == "emulated":
            item.add_marker(too_slow)
