"""Builds dyrate_ext._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc exists.

Knobs (environment): DYRATE_FORCE_CPU=1 builds CPU only; DYRATE_CUDA_ARCHS picks the GPU
architectures (default "8.0;8.6;8.9;9.0", plus PTX of the last); DEBUG=1 builds with -O0 -g.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT / "tools"))
from cuda_toolkit import arch_flags, find_cuda_home  # noqa: E402

FORCE_CPU = os.environ.get("DYRATE_FORCE_CPU", "0") == "1"
DEBUG = os.environ.get("DEBUG", "0") == "1"

# torch.utils.cpp_extension reads CUDA_HOME once, at import: point it at the real toolkit first.
cuda_home = None if FORCE_CPU else find_cuda_home()
if cuda_home is not None:
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def build_with_cuda() -> bool:
    if FORCE_CPU:
        return False
    if torch.version.cuda is None:
        print("dyrate_ext: this torch has no CUDA; building the CPU kernels only")
        return False
    if cuda_home is None:
        print("dyrate_ext: no CUDA toolkit found (set CUDA_HOME); building the CPU kernels only")
        return False
    return True


def extension():
    with_cuda = build_with_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    # -fopenmp: at::parallel_for is an inline OpenMP region in torch's headers; compiled
    # without it, every CPU kernel runs on one thread. The runtime is torch's own libgomp.so.1
    # (already loaded by import torch, so the soname resolves to it).
    cxx = [*opt, "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link = ["-fopenmp"]
    if not with_cuda:
        return CppExtension(
            "dyrate_ext._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc = [*opt, "--expt-relaxed-constexpr", "-Xcompiler=-Wall", "--threads=2"]
    nvcc += arch_flags(os.environ.get("DYRATE_CUDA_ARCHS", "8.0;8.6;8.9;9.0"))
    if DEBUG:
        nvcc.append("-lineinfo")
    print(f"dyrate_ext: building CUDA kernels with the toolkit in {cuda_home}")
    return CUDAExtension(
        "dyrate_ext._C",
        sources,
        define_macros=[("DYRATE_WITH_CUDA", None)],
        extra_compile_args={"cxx": [*cxx, "-DDYRATE_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    )


if shutil.which("ninja") is None:
    print("dyrate_ext: ninja not found; the build will be slow (pip install ninja)")

# Metadata, dependencies and extras live in pyproject.toml; this file only adds the extension.
# The extension uses the stable ABI (Py_LIMITED_API, set by torch for py_limited_api
# extensions): it registers its ops through the dispatcher and needs nothing from
# libtorch_python, so one wheel serves every CPython >= 3.10 of a given torch.
setup(
    ext_modules=[extension()],
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    cmdclass={
        "build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    },
)
