// Emulator stand-in: one null stream; the device is the emulator's (one per SM setting).
#pragma once
#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
inline int current_device() { return ::emu::st().device; }
}  // namespace c10::cuda
