// A small cooperative SIMT emulator that runs dyrate's CUDA kernels on the host, so their
// indexing, barriers and warp collectives can be tested on a machine without a GPU.
//
// Each block runs its threads as ucontext coroutines on one OS thread. A thread runs until it
// reaches __syncthreads or a warp collective (shuffle, ballot, match); the scheduler then
// resumes the other threads in a random order. Collectives complete only when every lane of the
// warp (or every live thread of the block) has arrived at the same kind of operation, so a
// collective reached from divergent code, a lane that exited early, or a barrier skipped by
// part of the block is reported as an error instead of silently working. Because a thread runs
// from one barrier to the next without interruption, a missing barrier between a load and a
// store of another thread shows up as wrong results for many interleavings.
//
// Not emulated: memory-model subtleties beyond barrier ordering, real concurrency between
// blocks (blocks run one after another), timing. This is a testing aid, not a simulator.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// ---------------------------------------------------------------------------------------------
// CUDA runtime types and qualifiers
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct float2 {
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

inline float __half2float(__half h) {
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
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t out = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &out, 4);
  return f;
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return {__bfloat162float(h.x), __bfloat162float(h.y)};
}

// ---------------------------------------------------------------------------------------------
// The block scheduler
// ---------------------------------------------------------------------------------------------
namespace emu {

enum Wait { kRunnable, kAtBarrier, kAtWarpOp, kDone };
enum WarpOp { kShflXor, kShflDown, kShflIdx, kBallot, kMatchAny };

struct Thread {
  ucontext_t ctx;
  Wait wait = kRunnable;
  int op = 0;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0;
  uint64_t result = 0;
};

struct State {
  std::vector<Thread> threads;
  std::vector<std::vector<char>> stacks;
  ucontext_t scheduler;
  unsigned current = 0;
  dim3 grid{1, 1, 1}, block{1, 1, 1};
  uint3 block_idx{0, 0, 0};
  std::function<void()> body;
  std::mt19937 rng{12345};
  std::vector<float4> dyn_smem;
  std::string error;
  cudaError_t last_error = cudaSuccess;
  int sm_count = 132;
};

inline State& st() {
  static State s;
  return s;
}

inline void fail(const std::string& msg) {
  State& s = st();
  if (s.error.empty()) s.error = msg;
}

inline void trampoline() {
  State& s = st();
  s.body();
  s.threads[s.current].wait = kDone;
  // Returning resumes the scheduler through uc_link.
}

inline void yield_to_scheduler() {
  State& s = st();
  Thread& t = s.threads[s.current];
  swapcontext(&t.ctx, &s.scheduler);
}

inline uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg) {
  State& s = st();
  const unsigned me = s.current;
  Thread& t = s.threads[me];
  t.wait = kAtWarpOp;
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.arg = arg;
  yield_to_scheduler();
  return s.threads[me].result;
}

inline int block_barrier(int predicate) {
  State& s = st();
  const unsigned me = s.current;
  Thread& t = s.threads[me];
  t.wait = kAtBarrier;
  t.value = predicate != 0;
  yield_to_scheduler();
  return static_cast<int>(s.threads[me].result);
}

inline bool release_warp(unsigned w) {
  State& s = st();
  const unsigned n = static_cast<unsigned>(s.threads.size());
  const unsigned first = 32 * w, last = std::min(n, first + 32);
  if (last - first != 32) {
    fail("a warp collective in a block whose size is not a multiple of 32");
    return false;
  }
  for (unsigned i = first; i < last; ++i) {
    if (s.threads[i].wait != kAtWarpOp) return false;
  }
  const Thread& lead = s.threads[first];
  for (unsigned i = first; i < last; ++i) {
    if (s.threads[i].op != lead.op || s.threads[i].mask != 0xffffffffu) {
      fail("lanes of one warp reached different collectives or used a partial mask");
      return false;
    }
  }
  uint64_t vals[32];
  for (unsigned l = 0; l < 32; ++l) vals[l] = s.threads[first + l].value;
  for (unsigned l = 0; l < 32; ++l) {
    Thread& t = s.threads[first + l];
    switch (t.op) {
      case kShflXor: {
        const unsigned src = l ^ static_cast<unsigned>(t.arg);
        t.result = src < 32 ? vals[src] : vals[l];
        break;
      }
      case kShflDown: {
        const unsigned src = l + static_cast<unsigned>(t.arg);
        t.result = src < 32 ? vals[src] : vals[l];
        break;
      }
      case kShflIdx:
        t.result = vals[static_cast<unsigned>(t.arg) & 31u];
        break;
      case kBallot: {
        uint64_t bits = 0;
        for (unsigned k = 0; k < 32; ++k) bits |= (vals[k] != 0 ? 1ull : 0ull) << k;
        t.result = bits;
        break;
      }
      case kMatchAny: {
        uint64_t bits = 0;
        for (unsigned k = 0; k < 32; ++k) bits |= (vals[k] == vals[l] ? 1ull : 0ull) << k;
        t.result = bits;
        break;
      }
      default:
        fail("unknown warp collective");
        return false;
    }
    t.wait = kRunnable;
  }
  return true;
}

inline bool release_block_barrier() {
  State& s = st();
  bool any = false;
  uint64_t orv = 0;
  for (const Thread& t : s.threads) {
    if (t.wait == kDone) continue;
    if (t.wait != kAtBarrier) return false;
    any = true;
    orv |= t.value;
  }
  if (!any) return false;
  for (Thread& t : s.threads) {
    if (t.wait == kAtBarrier) {
      t.result = orv;
      t.wait = kRunnable;
    }
  }
  return true;
}

inline void run_block() {
  State& s = st();
  const unsigned n = s.block.x * s.block.y * s.block.z;
  constexpr size_t kStack = 128 * 1024;
  s.threads.assign(n, Thread{});
  if (s.stacks.size() < n) s.stacks.resize(n);
  for (unsigned i = 0; i < n; ++i) {
    s.stacks[i].resize(kStack);
    getcontext(&s.threads[i].ctx);
    s.threads[i].ctx.uc_stack.ss_sp = s.stacks[i].data();
    s.threads[i].ctx.uc_stack.ss_size = kStack;
    s.threads[i].ctx.uc_link = &s.scheduler;
    makecontext(&s.threads[i].ctx, trampoline, 0);
  }
  std::vector<unsigned> order;
  while (s.error.empty()) {
    order.clear();
    for (unsigned i = 0; i < n; ++i) {
      if (s.threads[i].wait == kRunnable) order.push_back(i);
    }
    if (!order.empty()) {
      std::shuffle(order.begin(), order.end(), s.rng);
      for (unsigned i : order) {
        s.current = i;
        swapcontext(&s.scheduler, &s.threads[i].ctx);
        if (!s.error.empty()) return;
      }
      continue;
    }
    bool released = false;
    for (unsigned w = 0; w * 32 < n; ++w) released |= release_warp(w);
    if (!s.error.empty()) return;
    if (!released) released = release_block_barrier();
    if (released) continue;
    bool all_done = true;
    for (const Thread& t : s.threads) all_done &= t.wait == kDone;
    if (!all_done) {
      fail("deadlock: threads wait at a barrier or warp collective that others never reach");
    }
    return;
  }
}

template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, Kernel kernel, Args... args) {
  State& s = st();
  const unsigned threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || smem > 48 * 1024 || grid.x == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  s.grid = grid;
  s.block = block;
  // Poisoned dynamic shared memory: reads before writes give NaN.
  s.dyn_smem.assign((smem + 15) / 16, float4{NAN, NAN, NAN, NAN});
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        s.block_idx = {x, y, z};
        s.body = [&] { kernel(args...); };
        run_block();
        if (!s.error.empty()) {
          std::string msg = "SIMT emulator, block (" + std::to_string(x) + ", " +
                            std::to_string(y) + ", " + std::to_string(z) + "): " + s.error;
          s.error.clear();
          throw std::runtime_error(msg);
        }
      }
    }
  }
}

inline uint3 thread_idx() {
  const State& s = st();
  const unsigned i = s.current;
  return {i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y)};
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::st().block_idx)
#define blockDim (::emu::st().block)
#define gridDim (::emu::st().grid)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::st().last_error;
  emu::st().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
  *value = emu::st().sm_count;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Device intrinsics
// ---------------------------------------------------------------------------------------------
inline void __syncthreads() { emu::block_barrier(0); }
inline int __syncthreads_or(int p) { return emu::block_barrier(p); }

inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return __uint_as_float(static_cast<uint32_t>(
      emu::warp_collective(emu::kShflXor, mask, __float_as_uint(v), lane_mask)));
}
inline unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask) {
  return static_cast<unsigned>(emu::warp_collective(emu::kShflXor, mask, v, lane_mask));
}
inline float __shfl_down_sync(unsigned mask, float v, unsigned delta) {
  return __uint_as_float(static_cast<uint32_t>(
      emu::warp_collective(emu::kShflDown, mask, __float_as_uint(v), static_cast<int>(delta))));
}
inline unsigned __shfl_down_sync(unsigned mask, unsigned v, unsigned delta) {
  return static_cast<unsigned>(
      emu::warp_collective(emu::kShflDown, mask, v, static_cast<int>(delta)));
}
inline unsigned __shfl_sync(unsigned mask, unsigned v, int src) {
  return static_cast<unsigned>(emu::warp_collective(emu::kShflIdx, mask, v, src));
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return static_cast<unsigned>(emu::warp_collective(emu::kBallot, mask, p != 0, 0));
}
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(emu::warp_collective(emu::kMatchAny, mask, v, 0));
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }

// One OS thread runs all emulated threads and never switches inside an atomic.
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

using std::isnan;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
