"""Locating the CUDA toolkit and turning an arch list into nvcc flags (used by setup.py and
the Makefile's CMake build).

torch guesses the toolkit from the directory of the `nvcc` on PATH, which is wrong when that
`nvcc` is a wrapper script living outside the toolkit. Here the toolkit is the directory that
holds both `include/cuda_runtime.h` and `lib64/libcudart.so`.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from pathlib import Path


def _is_toolkit(path: Path) -> bool:
    return (path / "include" / "cuda_runtime.h").is_file() and any(
        (path / lib).exists() for lib in ("lib64/libcudart.so", "lib/libcudart.so")
    )


def _wrapper_targets(nvcc: Path) -> list[Path]:
    """Toolkit directories named inside a small wrapper script, e.g. `exec /opt/cuda/bin/nvcc`."""
    try:
        if nvcc.stat().st_size > 64 * 1024:
            return []
        text = nvcc.read_text(errors="ignore")
    except OSError:
        return []
    return [Path(m).parent.parent for m in re.findall(r"(/[^\s\"']+/bin/nvcc)\b", text)]


def find_cuda_home() -> str | None:
    """The toolkit root: CUDA_HOME/CUDA_PATH when set, else derived from nvcc, else usual places."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates += [real.parent.parent, *_wrapper_targets(real)]
    candidates += [Path("/usr/local/cuda")]
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    candidates += [Path("/opt/cuda")]
    for c in candidates:
        if _is_toolkit(c):
            return str(c)
    return None


def arch_flags(archs: str) -> list[str]:
    """'8.0;9.0' -> gencode flags for SASS of each arch plus PTX of the last one."""
    items = [a.strip().replace("+PTX", "") for a in re.split(r"[;, ]+", archs) if a.strip()]
    if not items:
        raise ValueError("DYRATE_CUDA_ARCHS is empty")
    nums = []
    for a in items:
        if not re.fullmatch(r"\d+\.\d+a?", a):
            raise ValueError(f"DYRATE_CUDA_ARCHS: bad architecture {a!r}, expected e.g. '9.0'")
        nums.append(a.replace(".", ""))
    flags = [f"-gencode=arch=compute_{n},code=sm_{n}" for n in nums]
    flags.append(f"-gencode=arch=compute_{nums[-1]},code=compute_{nums[-1]}")
    return flags


if __name__ == "__main__":
    print(find_cuda_home() or "")
