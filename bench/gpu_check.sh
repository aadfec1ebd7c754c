#!/usr/bin/env bash
# The GPU check in one command, from the repository root of a machine with a CUDA device, torch
# (CUDA build), nvcc, pytest and compute-sanitizer:
#     bash bench/gpu_check.sh
# 1. builds the extension for sm_90 only (DYRATE_CUDA_ARCHS, default 9.0, to build quickly);
# 2. runs every CUDA test (-m cuda: the op suites on the cuda backend, slow shapes included,
#    opcheck, test_cuda_ops.py), then the overlap refusal and the CUDA-graph capture tests
#    again by name, so their result stands out in the log;
# 3. runs bench/sanitize_case.py under compute-sanitizer memcheck and racecheck;
# 4. runs the op benchmark on the GPU, which writes bench/results/ops-<device>.{json,md};
# 5. compares the measured GB/s with bench/kernel_model.py's estimate for this device (SM
#    count from torch, bandwidth BANDWIDTH, default 3.35e12 B/s), written to
#    bench/results/kernel_model-<device>.md;
# 6. where vLLM 0.32 is importable (VLLM_PYTHON, default PYTHON, with dyrate_ext installed in
#    it), the vLLM tier on the GPU model runner: FLASH_ATTN's paged layout, checked by the
#    plugin's layout probe at the first forward, has not run anywhere yet.
# Environment: PYTHON (default python), COMPUTE_SANITIZER (default compute-sanitizer),
# DYRATE_CUDA_ARCHS, MAX_JOBS, BANDWIDTH; SKIP_BENCH=1 stops after the sanitizers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SANITIZER=${COMPUTE_SANITIZER:-compute-sanitizer}
export DYRATE_CUDA_ARCHS=${DYRATE_CUDA_ARCHS:-9.0}
export MAX_JOBS=${MAX_JOBS:-8}

echo "== build (DYRATE_CUDA_ARCHS=$DYRATE_CUDA_ARCHS)"
mkdir -p build
if ! "$PY" -m pip install -v --no-build-isolation --no-deps -e . > build/gpu_check_build.log 2>&1; then
  tail -60 build/gpu_check_build.log
  exit 1
fi
if grep -E "csrc/[^ :]+:[0-9]+:[0-9]+: warning" build/gpu_check_build.log; then
  echo "warnings from our sources (see build/gpu_check_build.log)"
  exit 1
fi
"$PY" - <<'PY'
import torch
import dyrate_ext
assert torch.cuda.is_available(), "no CUDA device visible"
missing = [op for op in dyrate_ext._ext.OP_NAMES if not dyrate_ext.has_kernel(op, "CUDA")]
assert not missing, f"no CUDA kernel for {missing}"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY

echo "== CUDA tests"
DYRATE_EXPECT_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider --tier full -m cuda \
  python_tests/test_cuda_registration.py python_tests/test_cuda_ops.py \
  python_tests/test_attention_stats.py python_tests/test_select_keep.py \
  python_tests/test_compact.py python_tests/test_compact_paged.py python_tests/test_opcheck.py

echo "== overlap refusal and CUDA-graph capture"
"$PY" -m pytest -q -rA -p no:cacheprovider --tier full -m cuda python_tests/test_compact.py \
  -k "overlap or disjoint"
"$PY" -m pytest -q -rA -p no:cacheprovider --tier full -m cuda python_tests/test_cuda_ops.py \
  -k "graph or no_host_sync"

echo "== compute-sanitizer"
for tool in memcheck racecheck; do
  echo "-- $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
    "$PY" bench/sanitize_case.py
done

echo "== vLLM tier (GPU model runner, FLASH_ATTN layout)"
VPY=${VLLM_PYTHON:-$PY}
if "$VPY" -c "import vllm, dyrate_ext.vllm" 2> /dev/null; then
  VLLM_ENABLE_V1_MULTIPROCESSING=0 "$VPY" -m pytest -q -p no:cacheprovider --import-mode=importlib \
    -o pythonpath= vllm_tests -k "not tp2"
else
  echo "vLLM is not installed for $VPY: skipped (pip install 'dyrate_ext[vllm]' where PyPI is reachable)"
fi

if [ "${SKIP_BENCH:-0}" = "1" ]; then
  exit 0
fi
echo "== benchmark"
"$PY" bench/bench_ops.py --device cuda

echo "== measured GB/s against bench/kernel_model.py"
NAME=$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-"))')
SMS=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)')
"$PY" bench/kernel_model.py --sms "$SMS" --bandwidth "${BANDWIDTH:-3.35e12}" \
  --compare "bench/results/ops-$NAME.json" | tee "bench/results/kernel_model-$NAME.md"
