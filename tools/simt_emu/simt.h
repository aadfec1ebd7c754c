// A small cooperative SIMT emulator that runs dyrate's CUDA kernels on the host, so their
// indexing, barriers, warp collectives and memory discipline can be tested without a GPU.
//
// Threads are ucontext coroutines on one OS thread (scheduler.h). A thread runs until it
// reaches __syncthreads or a warp collective (shuffle, ballot, match); the scheduler then
// resumes runnable threads of every resident block in a random order, and admits the blocks of
// the grid in a random order, several at a time, so both thread and block interleavings vary.
// Collectives complete only when every lane of the warp (or every live thread of the block) has
// arrived at the same kind of operation: a collective reached from divergent code, a lane that
// exited early, or a barrier skipped by part of the block is an error, not a silent success.
//
// Memory checks (memcheck.cpp; the kernels are compiled with -fsanitize=thread so that every
// load and store calls back into the emulator, with no sanitizer runtime linked):
//   - static __shared__ variables live per block and start poisoned (0xff bytes: NaN floats,
//     -1 ints), like dynamic shared memory; static + dynamic shared memory must fit in 48 KiB
//     unless the kernel opted in with cudaFuncSetAttribute;
//   - every load and store of N = 2..16 bytes must be N-byte aligned, as on the device;
//   - within one launch, a byte written by one block and read or written by another is an
//     error (a race on a GPU, whatever the emulated order), unless a handshake orders the two:
//     every thread of the writing block ran __threadfence after its writes, then the block did
//     an atomic on a counter, and the other block's atomic on that counter came later (the
//     "last block done" pattern). Acquired order is not transitive.
//
// Not emulated: the memory model beyond barriers, timing. A testing aid, not a simulator.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// Emulator code is never instrumented: only kernel code reports its memory accesses.
#define EMU_NOSAN __attribute__((no_sanitize("thread")))

// ---------------------------------------------------------------------------------------------
// CUDA runtime types and qualifiers
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __grid_constant__
#define __launch_bounds__(...)
// __shared__ declarations are rewritten by build.py into per-block storage (scheduler.h); one
// left in the source fails to compile.

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// ---------------------------------------------------------------------------------------------
// Half types (bit layouts of IEEE binary16 and bfloat16)
// ---------------------------------------------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

EMU_NOSAN inline float __half2float(__half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t man = h.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0) {
    if (man == 0) {
      out = sign;
    } else {  // subnormal: value = man * 2^-24
      float v = std::ldexp(static_cast<float>(man), -24);
      std::memcpy(&out, &v, 4);
      out |= sign;
    }
  } else if (exp == 31) {
    out = sign | 0x7f800000u | (man << 13);
  } else {
    out = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}
EMU_NOSAN inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t out = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}
EMU_NOSAN inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
EMU_NOSAN inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {__bfloat162float(h.x), __bfloat162float(h.y)};
}

#include "scheduler.h"

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::cur_block().idx)
#define blockDim (::emu::st().block)
#define gridDim (::emu::st().grid)

EMU_NOSAN inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::st().last_error;
  emu::st().last_error = cudaSuccess;
  return e;
}
// The opt-in a kernel needs before it may use more than 48 KiB of shared memory.
template <typename Kernel>
EMU_NOSAN inline cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr,
                                                  int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > emu::kMaxSharedOptIn) {
    return cudaErrorInvalidValue;
  }
  // Up to the default, the opt-in changes nothing: forget it.
  const void* key = reinterpret_cast<const void*>(kernel);
  if (static_cast<size_t>(value) <= emu::kSharedDefault) {
    emu::st().smem_opt_in.erase(key);
  } else {
    emu::st().smem_opt_in[key] = value;
  }
  return cudaSuccess;
}
// The emulator's occupancy answer is a setting (set_blocks_per_sm), not a model of the SM.
template <typename Kernel>
EMU_NOSAN inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int,
                                                                           size_t) {
  *blocks = emu::st().blocks_per_sm;
  return cudaSuccess;
}
EMU_NOSAN inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::st().sm_count;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Device intrinsics
// ---------------------------------------------------------------------------------------------
EMU_NOSAN inline void __syncthreads() { emu::block_barrier(0); }
EMU_NOSAN inline int __syncthreads_or(int p) { return emu::block_barrier(p); }

EMU_NOSAN inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
EMU_NOSAN inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

EMU_NOSAN inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return __uint_as_float(static_cast<uint32_t>(
      emu::warp_collective(emu::kShflXor, mask, __float_as_uint(v), lane_mask)));
}
EMU_NOSAN inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask) {
  return static_cast<unsigned>(emu::warp_collective(emu::kShflXor, mask, v, lane_mask));
}
EMU_NOSAN inline float __shfl_down_sync(unsigned mask, float v, unsigned delta) {
  return __uint_as_float(static_cast<uint32_t>(
      emu::warp_collective(emu::kShflDown, mask, __float_as_uint(v), static_cast<int>(delta))));
}
EMU_NOSAN inline unsigned __shfl_down_sync(unsigned mask, unsigned v, unsigned delta) {
  return static_cast<unsigned>(
      emu::warp_collective(emu::kShflDown, mask, v, static_cast<int>(delta)));
}
EMU_NOSAN inline unsigned __shfl_sync(unsigned mask, unsigned v, int src) {
  return static_cast<unsigned>(emu::warp_collective(emu::kShflIdx, mask, v, src));
}
EMU_NOSAN inline unsigned __ballot_sync(unsigned mask, int p) {
  return static_cast<unsigned>(emu::warp_collective(emu::kBallot, mask, p != 0, 0));
}
EMU_NOSAN inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::kMatchAny, mask, v, 0));
}

EMU_NOSAN inline int __popc(unsigned v) { return __builtin_popcount(v); }
EMU_NOSAN inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }

// One OS thread runs all emulated threads and never switches inside an atomic. Atomics and
// __ldg are instrumented like kernel code, so their accesses are checked.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline int atomicMin(int* p, int v) {
  const int old = *p;
  *p = std::min(old, v);
  return old;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

// Global atomics and fences take part in the write-set check (memcheck.cpp): an atomic is never
// a race, and a fence followed by an atomic on a counter orders the block's earlier writes
// before the accesses of every block whose atomic on that counter comes later.
namespace emu {
void fence();
void atomic_sync(const void* p, int size);
}  // namespace emu
EMU_NOSAN inline void __threadfence() { emu::fence(); }
EMU_NOSAN inline unsigned atomicInc(unsigned* p, unsigned limit) {
  emu::atomic_sync(p, 4);
  const unsigned old = *p;
  *p = old >= limit ? 0u : old + 1u;
  return old;
}

using std::isnan;
EMU_NOSAN inline int min(int a, int b) { return a < b ? a : b; }
EMU_NOSAN inline int max(int a, int b) { return a > b ? a : b; }
