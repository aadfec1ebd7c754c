#!/usr/bin/env bash
# Configure and build the CMake shared library (libdyrate_ops.so) against the torch of $PYTHON.
# Usage: tools/cmake_build.sh BUILD_DIR [extra cmake args...]
# With a CUDA build of torch, torch's CMake config wants the toolkit and libnvrtc even when our
# library is CPU-only; they are found the way setup.py finds them.
set -euo pipefail
build_dir=${1:?usage: tools/cmake_build.sh BUILD_DIR [cmake args]}
shift
PYTHON=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-DCMAKE_PREFIX_PATH="$prefix")
if [ "$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")')" != "" ]; then
  cuda_home=$("$PYTHON" "$here/cuda_toolkit.py")
  [ -n "$cuda_home" ] || { echo "tools/cmake_build.sh: torch has CUDA but no toolkit was found; set CUDA_HOME" >&2; exit 1; }
  nvrtc=$("$PYTHON" - <<'PY'
import glob, os, torch
roots = [os.path.dirname(os.path.dirname(torch.__file__))]
hits = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so*"), recursive=True)]
print(sorted(h for h in hits if "builtins" not in h)[0] if hits else "")
PY
)
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc")
  [ -z "$nvrtc" ] || args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
mkdir -p "$build_dir"
cmake -S "$here/.." -B "$build_dir" -G Ninja "${args[@]}" "$@" >"$build_dir/configure.log" 2>&1 ||
  { cat "$build_dir/configure.log"; exit 1; }
cmake --build "$build_dir" -j "${MAX_JOBS:-2}"
