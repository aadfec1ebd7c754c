// Emulator stand-in: C10_CUDA_CHECK raises like the real one.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(expr)                                           \
  do {                                                                 \
    const cudaError_t dyrate_emu_err = (expr);                         \
    TORCH_CHECK(dyrate_emu_err == cudaSuccess, "emulated CUDA error ", \
                static_cast<int>(dyrate_emu_err));                     \
  } while (0)
