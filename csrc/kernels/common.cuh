// Device helpers shared by the dyrate kernels: element conversion, vector loads of keys,
// the merge rule of softmax partials and a block-wide exclusive count. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dyrate {
namespace kernels {
namespace detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }

// Elements per 16-byte load.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// V consecutive elements at p as float, in two halves so that a caller can issue several
// loads before it converts any: load() returns the raw vector, convert() unpacks it. For V > 1,
// p must be 16-byte aligned and V * sizeof(T) must be 16 (the launch plan guarantees both).
template <typename T, int V>
struct VecLoad {
  static_assert(V == 1, "vector loads exist for V == 16 / sizeof(T) only");
  using Raw = T;
  __device__ __forceinline__ static Raw load(const T* p) { return p[0]; }
  __device__ __forceinline__ static void convert(const Raw& raw, float (&out)[V]) {
    out[0] = to_float(raw);
  }
};

template <>
struct VecLoad<float, 4> {
  using Raw = float4;
  __device__ __forceinline__ static Raw load(const float* p) {
    return __ldg(reinterpret_cast<const float4*>(p));
  }
  __device__ __forceinline__ static void convert(const Raw& v, float (&out)[4]) {
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
};

// Eight 16-bit floats in one 16-byte load; Pair is their two-element vector type.
template <typename T, typename Pair>
struct HalfVecLoad {
  using Raw = uint4;
  __device__ __forceinline__ static Raw load(const T* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  }
  __device__ __forceinline__ static void convert(const Raw& raw, float (&out)[8]) {
    const Pair* h = reinterpret_cast<const Pair*>(&raw);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = to_float2(h[e]);
      out[2 * e] = f.x;
      out[2 * e + 1] = f.y;
    }
  }
};

template <>
struct VecLoad<__half, 8> : HalfVecLoad<__half, __half2> {};
template <>
struct VecLoad<__nv_bfloat16, 8> : HalfVecLoad<__nv_bfloat16, __nv_bfloat162> {};

// Merges the softmax partial (m2, s2) into (m, s): s is a sum of exp(logit - m). An empty
// partial is (-inf, 0); merging two empty ones must not produce exp(-inf - -inf) = NaN.
// The result does not depend on the argument order (IEEE + and * commute), so butterfly
// shuffles leave every lane with the same value.
__device__ __forceinline__ void softmax_merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;
  s = s * expf(m - mx) + s2 * expf(m2 - mx);
  m = mx;
}

// Exclusive count of `flag` over the block's threads in thread order, and the block total.
// warp_counts holds one int per warp. Every thread of the block must call it. It ends without
// a barrier: callers alternate two warp_counts buffers so that a buffer is only rewritten after
// a later barrier.
__device__ __forceinline__ int block_exclusive_count(bool flag, int* warp_counts, int& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, all = 0;
  const int warps = static_cast<int>(blockDim.x >> 5);
  for (int w = 0; w < warps; ++w) {
    const int c = warp_counts[w];
    before += w < warp ? c : 0;
    all += c;
  }
  total = all;
  return before + __popc(ballot & ((1u << lane) - 1u));
}

}  // namespace detail
}  // namespace kernels
}  // namespace dyrate
