// CUDA kernel of select_keep (torch-free): one block per sample, no host synchronisation.
//
// The ranking key of a target slot is (score, -slot): higher score first, the lower slot on
// equal scores. Scores map to order-preserving uint32 keys (NaN ranks as -inf and -0 as +0,
// the CPU kernel's comparison). A 4-pass radix select with 8-bit digits finds the key K of the
// want-th best target slot and k', how many slots with key K are kept; slots with key K are
// taken in ascending slot order, which is exactly the index tie-break. A final ascending
// block scan writes the kept slots, then -1. Histograms use integer shared-memory atomics,
// whose result does not depend on their order, so the output is deterministic.
//
// The row is read from global memory once: rows of up to kSelectStagedSlots slots are staged
// in shared memory (keys and types, 5 bytes a slot) and the five passes read them there;
// longer rows read global memory in every pass.
#pragma once

#include "common.cuh"
#include "dyrate_kernels.h"

namespace dyrate {
namespace kernels {
namespace detail {

constexpr int kSelectThreads = 512;

__device__ __forceinline__ uint32_t score_key(float v) {
  if (isnan(v)) v = -INFINITY;
  if (v == 0.f) v = 0.f;  // -0 ties with +0
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Key and type of slot j: from the staged copy in shared memory or from global memory.
template <bool kStaged>
struct RowView {
  const float* score;
  const int8_t* types;
  int64_t ts_stride, tt_stride;
  const uint32_t* keys_s;  // [L] staged keys (target slots only), or unused
  const int8_t* types_s;   // [L] staged types, or unused
  __device__ __forceinline__ int type(int j) const {
    return kStaged ? types_s[j] : static_cast<int>(types[j * tt_stride]);
  }
  __device__ __forceinline__ uint32_t key(int j) const {
    return kStaged ? keys_s[j] : score_key(score[j * ts_stride]);
  }
};

// Modes of one sample, decided once its target count n is known.
constexpr int kKeepNoTarget = 0;    // want == 0
constexpr int kKeepAllTargets = 1;  // want == n
constexpr int kSelectTargets = 2;   // 0 < want < n

template <bool kStaged>
__global__ void __launch_bounds__(kSelectThreads, 1) select_keep_kernel(const SelectArgs a) {
  constexpr int kWarps = kSelectThreads / 32;
  extern __shared__ uint4 select_smem[];
  __shared__ unsigned hist[256];
  __shared__ int counts_a[kWarps];
  __shared__ int counts_b[kWarps];
  __shared__ uint32_t sh_prefix;
  __shared__ unsigned sh_remaining;
  __shared__ int sh_mode;

  const int b = blockIdx.x;
  const int L = a.L;
  RowView<kStaged> row{a.token_score + b * a.ts_stride_b,
                       a.token_type + b * a.tt_stride_b,
                       a.ts_stride_l,
                       a.tt_stride_l,
                       reinterpret_cast<const uint32_t*>(select_smem),
                       reinterpret_cast<const int8_t*>(select_smem) + 4 * static_cast<int64_t>(L)};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int iters = (L + kSelectThreads - 1) / kSelectThreads;
  if constexpr (kStaged) {
    uint32_t* keys_s = reinterpret_cast<uint32_t*>(select_smem);
    int8_t* types_s = reinterpret_cast<int8_t*>(select_smem) + 4 * static_cast<int64_t>(L);
    const RowView<false> global{row.score,     row.types, row.ts_stride,
                                row.tt_stride, nullptr,   nullptr};
    for (int j = threadIdx.x; j < L; j += kSelectThreads) {
      const int t = global.type(j);
      types_s[j] = static_cast<int8_t>(t);
      keys_s[j] = static_cast<int64_t>(t) == a.target_type ? global.key(j) : 0u;
    }
    // The first pass's barrier (after clearing hist) orders these stores before any read.
  }

  uint32_t prefix = 0, mask = 0;
  unsigned remaining = 0;
  int mode = kKeepNoTarget;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int u = threadIdx.x; u < 256; u += kSelectThreads) hist[u] = 0;
    __syncthreads();
    for (int it = 0; it < iters; ++it) {
      const int j = it * kSelectThreads + threadIdx.x;
      unsigned digit = 256;  // not counted
      if (j < L && static_cast<int64_t>(row.type(j)) == a.target_type) {
        const uint32_t key = row.key(j);
        if ((key & mask) == prefix) digit = (key >> shift) & 255u;
      }
      // One atomic per distinct digit in the warp: many equal scores would serialise on a bin.
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l owns bins [8l, 8l + 8); suffix counts from the top bin find the bin holding
      // the remaining-th best key.
      unsigned h[8], own = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        h[e] = hist[8 * lane + e];
        own += h[e];
      }
      unsigned suffix = own;
      for (int off = 1; off < 32; off <<= 1) {
        const unsigned y = __shfl_down_sync(0xffffffffu, suffix, off);
        if (lane + off < 32) suffix += y;
      }
      unsigned rem = remaining;
      int m = mode;
      if (shift == 24) {
        const unsigned n = __shfl_sync(0xffffffffu, suffix, 0);
        const int64_t kc = a.keep_count[b * a.kc_stride];
        const unsigned want =
            kc <= 0 ? 0u : (kc >= static_cast<int64_t>(n) ? n : static_cast<unsigned>(kc));
        m = want == 0 ? kKeepNoTarget : (want == n ? kKeepAllTargets : kSelectTargets);
        rem = want;
        if (lane == 0) sh_mode = m;
      }
      if (m == kSelectTargets) {
        unsigned above = suffix - own;
#pragma unroll
        for (int e = 7; e >= 0; --e) {
          if (above < rem && rem <= above + h[e]) {
            sh_prefix = prefix | (static_cast<uint32_t>(8 * lane + e) << shift);
            sh_remaining = rem - above;
          }
          above += h[e];
        }
      }
    }
    __syncthreads();
    mode = sh_mode;
    if (mode != kSelectTargets) break;
    prefix = sh_prefix;
    remaining = sh_remaining;
    mask |= 255u << shift;
  }
  // Now, in select mode: targets with key > prefix are kept, and of those with key == prefix
  // the first `remaining` in slot order.

  int64_t* out = a.keep_index + static_cast<int64_t>(b) * L;
  int kept = 0, ties = 0;
  for (int it = 0; it < iters; ++it) {
    const int j = it * kSelectThreads + threadIdx.x;
    const int t = j < L ? row.type(j) : -1;
    const bool is_target = j < L && static_cast<int64_t>(t) == a.target_type;
    uint32_t key = 0;
    if (mode == kSelectTargets && is_target) key = row.key(j);
    const bool tie = mode == kSelectTargets && is_target && key == prefix;
    int tie_total;
    const int tie_rank = ties + block_exclusive_count(tie, counts_a, tie_total);
    const bool keep_target =
        is_target && (mode == kKeepAllTargets ||
                      (mode == kSelectTargets &&
                       (key > prefix || (tie && static_cast<unsigned>(tie_rank) < remaining))));
    const bool keep = (t >= 0 && static_cast<int64_t>(t) != a.target_type) || keep_target;
    int keep_total;
    const int pos = kept + block_exclusive_count(keep, counts_b, keep_total);
    if (keep) out[pos] = j;
    ties += tie_total;
    kept += keep_total;
  }
  for (int p = kept + threadIdx.x; p < L; p += kSelectThreads) out[p] = -1;
  if (threadIdx.x == 0) a.new_length[b] = kept;
}

}  // namespace detail

cudaError_t launch_select_keep(const SelectArgs& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (a.L <= kSelectStagedSlots) {
    const size_t smem = (static_cast<size_t>(a.L) * 5 + 15) / 16 * 16;
    detail::select_keep_kernel<true><<<a.B, detail::kSelectThreads, smem, stream>>>(a);
  } else {
    detail::select_keep_kernel<false><<<a.B, detail::kSelectThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dyrate
