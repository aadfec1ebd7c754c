"""The other two builds register working ops: the CMake library (libdyrate_ops.so) and the
CPU-only Python extension (DYRATE_FORCE_CPU=1). Each loads in a fresh process, since a process
can hold only one library defining the dyrate namespace, and is compared with the reference."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _first(pattern: str) -> Path | None:
    hits = sorted(glob.glob(str(ROOT / pattern)))
    return Path(hits[0]) if hits else None


BUILDS = {
    "cmake": Path(os.environ.get("DYRATE_CMAKE_LIB", ROOT / "build-cmake" / "libdyrate_ops.so")),
    "cpu_only": _first("build-cpu/lib/dyrate_ext/_C*.so"),
}

SCRIPT = r"""
import importlib, os, sys, types, torch
torch.ops.load_library(sys.argv[1])
# The reference module and its siblings without the package's __init__, which would load
# dyrate_ext._C too: an empty package object whose path is the source directory.
pkg = types.ModuleType("dyrate_ext")
pkg.__path__ = [os.path.dirname(sys.argv[2])]
sys.modules["dyrate_ext"] = pkg
ref = importlib.import_module("dyrate_ext.reference")
g = torch.Generator().manual_seed(0)
types = torch.randint(-1, 4, (2, 40), generator=g).to(torch.int8)
q, k = torch.randn(2, 4, 1, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
mass, score = torch.ops.dyrate.attention_stats(q, k, types, 0.25, 4, True)
rmass, rscore = ref.attention_stats(q.double(), k.double(), types, 0.25)
torch.testing.assert_close(score.double(), rscore, atol=1e-6, rtol=1e-5)
idx, n = torch.ops.dyrate.select_keep(score, types, torch.tensor([3, 5]), 1)
x = torch.randn(2, 3, 40, 8, generator=g)
expected = ref.compact(x, idx, n)
torch.ops.dyrate.compact_([x], idx, n)
assert torch.equal(x, expected)
paged, table = torch.randn(4, 5, 3, 8, generator=g), torch.tensor([[2, 0, 3], [1, 0, 0]])
idx = torch.full((2, 10), -1)
idx[0, :3], idx[1, :3] = torch.tensor([0, 3, 9]), torch.tensor([1, 2, 3])
n = torch.tensor([3, 3])
want = ref.compact_paged(paged, "NHD", table, idx, n)
torch.ops.dyrate.compact_paged_([paged], ["NHD"], table, idx, n)
assert torch.equal(paged, want)
has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("dyrate::compact_", "CUDA")
print("ops ok; cuda kernels:", has_cuda)
"""


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_build_registers_working_ops(build):
    lib = BUILDS[build]
    if lib is None or not lib.exists():
        pytest.skip(f"{build} build not present (make other-builds)")
    reference = ROOT / "dyrate_ext" / "reference.py"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(lib), str(reference)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ops ok" in out.stdout
    if build == "cpu_only":
        assert "cuda kernels: False" in out.stdout, "DYRATE_FORCE_CPU=1 must build no CUDA kernels"


@pytest.mark.parametrize("build", ["python", *sorted(BUILDS)])
def test_cpu_kernels_run_on_threads(build):
    """at::parallel_for is an inline OpenMP region in torch's headers: a library compiled
    without -fopenmp runs every CPU kernel on one thread (all of them did until 2026-12-01).
    The region shows as a reference to GOMP_parallel, resolved by torch's own libgomp."""
    import dyrate_ext._C

    lib = Path(dyrate_ext._C.__file__) if build == "python" else BUILDS[build]
    if lib is None or not lib.exists():
        pytest.skip(f"{build} build not present (make other-builds)")
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm (binutils)")
    out = subprocess.run([nm, "-D", "--undefined-only", str(lib)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "GOMP_parallel" in out.stdout, f"{lib.name} has no OpenMP region"
