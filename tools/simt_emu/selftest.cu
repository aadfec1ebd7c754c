// Deliberately broken kernels, one per check of the SIMT emulator: python_tests/test_simt_emu.py
// runs each and shows that the check fires (and that the emulator before the check would have
// passed it). Built into the emulated extension only; never part of dyrate_ext.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace emu_selftest {

// Block 0 sets a static shared variable that block 1 only reads. Shared memory is per
// block on a GPU: block 1 must see the poison, not block 0's 42.
__global__ void shared_leak(int* out) {
  __shared__ int value;
  if (blockIdx.x == 0 && threadIdx.x == 0) value = 42;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = value;
}

// A 16-byte load from in + offset floats: misaligned unless offset is a multiple of 4.
__global__ void vector_load(const float* in, float* out, int offset) {
  const float4 v = *reinterpret_cast<const float4*>(in + offset + 4 * threadIdx.x);
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// 40 KiB of static shared memory plus the launch's dynamic shared memory.
__global__ void big_shared(float* out) {
  extern __shared__ float4 extra[];
  __shared__ float table[10240];
  table[threadIdx.x] = static_cast<float>(threadIdx.x);
  extra[threadIdx.x].x = 1.f;
  __syncthreads();
  out[threadIdx.x] = table[threadIdx.x] + extra[threadIdx.x].x;
}

// Block b writes out[4b .. 4b + 4]: its last element is the next block's first.
__global__ void overlapping_writes(int* out) {
  if (threadIdx.x < 5) out[4 * blockIdx.x + threadIdx.x] = static_cast<int>(blockIdx.x);
}

// Block 1 reads what block 0 writes: right only when block 0 happens to run first.
__global__ void ordered_blocks(int* out) {
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 0) {
    out[0] = 7;
  } else {
    out[1] = out[0] + 1;
  }
}

// "Last block done": block b writes out[1 + b]; the last block to arrive at the counter
// out[0] writes their sum to out[1 + gridDim.x]. mode 0 is the correct handshake; mode 1
// drops the __threadfence, mode 2 picks the last block by index instead of the counter.
__global__ void last_block_sum(unsigned* out, int mode) {
  __shared__ int last;
  if (threadIdx.x == 0) out[1 + blockIdx.x] = 10u + blockIdx.x;
  if (mode != 1) __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned arrived = atomicInc(out, gridDim.x - 1u);
    last = mode == 2 ? blockIdx.x == gridDim.x - 1u : arrived == gridDim.x - 1u;
  }
  __syncthreads();
  if (!last || threadIdx.x != 0) return;
  __threadfence();
  unsigned sum = 0;
  for (unsigned b = 0; b < gridDim.x; ++b) sum += __ldcg(out + 1 + b);
  out[1 + gridDim.x] = sum;
}

// Runs the named kernel; returns the launch error.
int run(const std::string& name, void* out, const void* in, int arg) {
  int* iout = static_cast<int*>(out);
  float* fout = static_cast<float*>(out);
  if (name == "shared_leak") {
    shared_leak<<<2, 32, 0, nullptr>>>(iout);
  } else if (name == "vector_load") {
    vector_load<<<1, 32, 0, nullptr>>>(static_cast<const float*>(in), fout, arg);
  } else if (name == "big_shared") {
    // arg: dynamic bytes; negative asks for the opt-in first.
    const int bytes = arg < 0 ? -arg : arg;
    const int opt_in = arg < 0 ? 64 * 1024 : 0;
    cudaFuncSetAttribute(big_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, opt_in);
    big_shared<<<1, 32, static_cast<size_t>(bytes), nullptr>>>(fout);
  } else if (name == "overlapping_writes") {
    overlapping_writes<<<arg, 32, 0, nullptr>>>(iout);
  } else if (name == "last_block_sum") {
    last_block_sum<<<8, 32, 0, nullptr>>>(static_cast<unsigned*>(out), arg);
  } else if (name == "ordered_blocks") {
    ordered_blocks<<<2, 32, 0, nullptr>>>(iout);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace emu_selftest
