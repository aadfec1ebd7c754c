// The merge side of attention_stats and attention_stats_from_probs (torch-free): from the
// q.k kernel's per-chunk softmax partials and kept logits (Q <= kStatsMaxStoredRows) to
// token_score and type_mass in one launch, and the last pass of the other paths (from
// head_score). Every output element is written by one thread and every sum runs in a fixed
// order. See attention_stats.cuh.
#pragma once

#include "common.cuh"
#include "dyrate_kernels.h"

namespace dyrate {
namespace kernels {
namespace detail {

// Slots and heads per round of independent loads in the merge and finalize loops.
constexpr int kFinBatch = 4, kFinHeads = 8;
// logits_stats_kernel: a token block covers kTokSlots slots with kTokParts threads per slot
// (each a contiguous range of heads), and merges the partials of kMergeRows rows at a time.
constexpr int kTokSlots = 64, kTokParts = 256 / kTokSlots, kMergeRows = 256;
// Chunk partials per round of independent loads when a row's partials are merged.
constexpr int kMergeBatch = 12;

// One head's row of head_score as a value for type_mass_row.
struct RowValue {
  const float* row;  // [L]
  __device__ __forceinline__ float operator()(int j) const { return row[j]; }
};

// Slot j's probability mass in one head from its kept logits: the sum over its Q query rows,
// in order, of exp(logit - row max) / row sum (0 where the logit is -inf, even in a row with no
// allowed slot, whose max is -inf too).
struct HeadProb {
  const float* logits;   // [Q, L] of one (b, h)
  const float* row_max;  // [Q], shared
  const float* row_inv;  // [Q], shared
  int Q, L;
  __device__ __forceinline__ float operator()(int j) const {
    float p = 0.f;
    for (int i = 0; i < Q; ++i) {
      const float l = logits[static_cast<int64_t>(i) * L + j];
      if (l != -INFINITY) p += expf(l - row_max[i]) * row_inv[i];
    }
    return p;
  }
};

// token_score[b, j] = inv_heads_rows * sum_h head_score[b, h, j] (heads in order) for the slots
// j = j0, j0 + step, ... below j_end of one sample (rows of L slots); kFinHeads heads of
// kFinBatch slots per round of loads.
__device__ __forceinline__ void token_score_slots(const float* head_score, float* token_score,
                                                  int H, int L, int j0, int j_end, int step,
                                                  float inv_heads_rows) {
  for (int j = j0; j < j_end; j += kFinBatch * step) {
    float sum[kFinBatch];
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) sum[u] = 0.f;
    for (int h0 = 0; h0 < H; h0 += kFinHeads) {
      float v[kFinHeads][kFinBatch];
#pragma unroll
      for (int h = 0; h < kFinHeads; ++h) {
#pragma unroll
        for (int u = 0; u < kFinBatch; ++u) {
          const bool in = h0 + h < H && j + u * step < j_end;
          v[h][u] = in ? head_score[static_cast<int64_t>(h0 + h) * L + j + u * step] : 0.f;
        }
      }
#pragma unroll
      for (int h = 0; h < kFinHeads; ++h) {
#pragma unroll
        for (int u = 0; u < kFinBatch; ++u) {
          if (h0 + h < H) sum[u] += v[h][u];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) {
      if (j + u * step < j_end) token_score[j + u * step] = sum[u] * inv_heads_rows;
    }
  }
}

// type_mass[t] = inv_rows * sum of value(j) over the slots j < L of type t, eight types per
// sweep; value(j) is slot j's probability mass in one head, summed over the query rows. Called
// by a whole block of 256 threads; partial is shared [8 warps][8].
template <typename Value>
__device__ __forceinline__ void type_mass_row(const Value& value, const int8_t* types,
                                              int64_t tt_stride_l, int L, int num_types,
                                              float inv_rows, float* type_mass, float* partial) {
  constexpr int kTypes = 8, kWarps = 256 / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int t0 = 0; t0 < num_types; t0 += kTypes) {
    float acc[kTypes];
#pragma unroll
    for (int u = 0; u < kTypes; ++u) acc[u] = 0.f;
    for (int j0 = threadIdx.x; j0 < L; j0 += 256 * kFinBatch) {
      int t[kFinBatch];  // kFinBatch slots' loads issued before any is used
      float v[kFinBatch];
#pragma unroll
      for (int b = 0; b < kFinBatch; ++b) {
        const int j = j0 + b * 256;
        t[b] = j < L ? static_cast<int>(types[static_cast<int64_t>(j) * tt_stride_l]) - t0 : -1;
        v[b] = j < L ? value(j) : 0.f;
      }
#pragma unroll
      for (int b = 0; b < kFinBatch; ++b) {
        // A select per type, not acc[t[b]]: a dynamic index would put acc in local memory.
        const float x = t[b] >= 0 && t[b] < kTypes && t0 + t[b] < num_types ? v[b] : 0.f;
#pragma unroll
        for (int u = 0; u < kTypes; ++u) acc[u] += t[b] == u ? x : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < kTypes; ++u) {
      float v = acc[u];
      for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) partial[warp * kTypes + u] = v;
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < kTypes && t0 + static_cast<int>(threadIdx.x) < num_types) {
      float sum = 0.f;
      for (int w = 0; w < kWarps; ++w) sum += partial[w * kTypes + threadIdx.x];
      type_mass[t0 + threadIdx.x] = sum * inv_rows;
    }
    __syncthreads();  // partial is rewritten by the next sweep
  }
}

// The softmax statistics of n consecutive query rows of [B * H_q * Q] from row0 on: each row's
// C chunk partials merged in chunk order, then row_max[r] and row_inv[r] = 1 / sum (0 for a row
// without an allowed slot). Threads take rows and load kMergeBatch partials before merging any
// (one round of loads for C <= kMergeBatch); the caller syncs before reading the rows.
__device__ __forceinline__ void merge_rows(const float* __restrict__ part_max,
                                           const float* __restrict__ part_sum, int64_t row0, int n,
                                           int C, float* row_max, float* row_inv) {
  for (int r = threadIdx.x; r < n; r += blockDim.x) {
    const int64_t at = (row0 + r) * C;
    float m = -INFINITY, s = 0.f;
    for (int c0 = 0; c0 < C; c0 += kMergeBatch) {
      float pm[kMergeBatch], ps[kMergeBatch];
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        pm[u] = c0 + u < C ? part_max[at + c0 + u] : -INFINITY;
        ps[u] = c0 + u < C ? part_sum[at + c0 + u] : 0.f;
      }
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) softmax_merge(m, s, pm[u], ps[u]);  // (-inf, 0): no-op
    }
    row_max[r] = m;
    row_inv[r] = m == -INFINITY ? 0.f : 1.f / s;
  }
}

// acc + slot j's probability mass in heads [hb, he) of a batch, heads in order; logits points
// at the batch's first head ([heads, Q, L]) and row_max/row_inv hold the batch's rows.
// kFinHeads heads' loads are in flight at once.
__device__ __forceinline__ float heads_prob(const float* __restrict__ logits, const float* row_max,
                                            const float* row_inv, int hb, int he, int Q, int L,
                                            int j, float acc) {
  for (int h = hb; h < he; h += kFinHeads) {
    float hs[kFinHeads];
#pragma unroll
    for (int u = 0; u < kFinHeads; ++u) hs[u] = 0.f;
    for (int i = 0; i < Q; ++i) {
      float l[kFinHeads];
#pragma unroll
      for (int u = 0; u < kFinHeads; ++u) {
        l[u] = h + u < he ? logits[(static_cast<int64_t>(h + u) * Q + i) * L + j] : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < kFinHeads; ++u) {
        const int r = (h + u) * Q + i;
        if (l[u] != -INFINITY) hs[u] += expf(l[u] - row_max[r]) * row_inv[r];
      }
    }
#pragma unroll
    for (int u = 0; u < kFinHeads; ++u) {
      if (h + u < he) acc += hs[u];
    }
  }
  return acc;
}

// The merge for kept logits (Q <= kStatsMaxStoredRows), one launch with two kinds of blocks.
// Blocks [0, score_blocks), one per (kTokSlots-slot tile, sample b), write token_score: thread
// (slot, part) adds the mass of a contiguous range of heads, the kTokParts ranges are then added
// in order. The next B * H blocks write type_mass[b, h, :]. Both merge the partials themselves
// (a few floats per row), so no block waits for another.
__global__ void __launch_bounds__(256)
    logits_stats_kernel(const float* __restrict__ logits,       // [B, H, Q, L]
                        const float* __restrict__ part_max,     // [B, H, Q, C]
                        const float* __restrict__ part_sum,     // [B, H, Q, C]
                        const int8_t* __restrict__ token_type,  // [B, L]
                        int64_t tt_stride_b, int64_t tt_stride_l, int H, int Q, int L, int C,
                        int num_types, float inv_rows, float inv_heads_rows, int score_blocks,
                        float* __restrict__ type_mass,    // [B, H, num_types]
                        float* __restrict__ token_score)  // [B, L]
{
  __shared__ float row_max[kMergeRows];
  __shared__ float row_inv[kMergeRows];
  __shared__ float part_acc[kTokParts][kTokSlots];
  __shared__ float partial[(256 / 32) * 8];
  if (static_cast<int>(blockIdx.x) < score_blocks) {
    const int tiles = (L + kTokSlots - 1) / kTokSlots;
    const int64_t b = blockIdx.x / tiles;
    const int slot = threadIdx.x % kTokSlots, part = threadIdx.x / kTokSlots;
    const int j = static_cast<int>(blockIdx.x % tiles) * kTokSlots + slot;
    const int batch = kMergeRows / Q;  // heads whose rows fit in row_max at once
    float acc = 0.f;
    for (int h0 = 0; h0 < H; h0 += batch) {
      const int hn = min(batch, H - h0);
      __syncthreads();  // readers of the previous batch's rows are done
      merge_rows(part_max, part_sum, (b * H + h0) * Q, hn * Q, C, row_max, row_inv);
      __syncthreads();
      const int per = (hn + kTokParts - 1) / kTokParts;
      const int hb = min(hn, part * per), he = min(hn, hb + per);
      if (j < L) {
        acc = heads_prob(logits + (b * H + h0) * Q * L, row_max, row_inv, hb, he, Q, L, j, acc);
      }
    }
    part_acc[part][slot] = acc;
    __syncthreads();
    if (part == 0 && j < L) {
      float sum = 0.f;
#pragma unroll
      for (int p = 0; p < kTokParts; ++p) sum += part_acc[p][slot];
      token_score[b * L + j] = sum * inv_heads_rows;
    }
    return;
  }
  const int64_t bh = blockIdx.x - score_blocks;
  merge_rows(part_max, part_sum, bh * Q, Q, C, row_max, row_inv);
  __syncthreads();
  type_mass_row(HeadProb{logits + bh * Q * L, row_max, row_inv, Q, L},
                token_type + (bh / H) * tt_stride_b, tt_stride_l, L, num_types, inv_rows,
                type_mass + bh * num_types, partial);
}

// attention_stats_from_probs' first pass. Block = (256-slot tile, b * H + h).
template <typename T>
__global__ void __launch_bounds__(256)
    probs_head_scores_kernel(const T* __restrict__ probs,  // [B, H, Q, L]
                             int64_t p_stride_b, int64_t p_stride_h, int64_t p_stride_q,
                             const int8_t* __restrict__ token_type,  // [B, L]
                             int64_t tt_stride_b, int64_t tt_stride_l, int H, int Q, int L,
                             int num_types,
                             float* __restrict__ head_score)  // [B, H, L]
{
  const int tiles = (L + 255) / 256;
  const int tile = static_cast<int>(blockIdx.x % tiles);
  const int64_t bh = blockIdx.x / tiles;
  const int64_t b = bh / H, h = bh % H;
  const int j = tile * 256 + threadIdx.x;
  if (j >= L) return;
  const int t = token_type[b * tt_stride_b + j * tt_stride_l];
  float sum = 0.f;
  if (t >= 0 && t < num_types) {
    const T* p = probs + b * p_stride_b + h * p_stride_h + j;
#pragma unroll 4
    for (int i = 0; i < Q; ++i) sum += to_float(p[i * p_stride_q]);
  }
  head_score[bh * L + j] = sum;
}

// The last pass from head_score (Q > kStatsMaxStoredRows, and the probs op). Blocks [0,
// score_blocks) write token_score, kFinBatch slots per thread; the next B * H blocks write
// type_mass[b, h, :], eight types per sweep over the slots.
__global__ void __launch_bounds__(256)
    finalize_stats_kernel(const float* __restrict__ head_score,   // [B, H, L]
                          const int8_t* __restrict__ token_type,  // [B, L]
                          int64_t tt_stride_b, int64_t tt_stride_l, int B, int H, int L,
                          int num_types, float inv_rows, float inv_heads_rows, int score_blocks,
                          float* __restrict__ type_mass,    // [B, H, num_types]
                          float* __restrict__ token_score)  // [B, L]
{
  __shared__ float partial[(256 / 32) * 8];
  if (static_cast<int>(blockIdx.x) < score_blocks) {
    // Block = (256 * kFinBatch-slot tile, sample b).
    const int tiles = (L + 256 * kFinBatch - 1) / (256 * kFinBatch);
    const int64_t b = blockIdx.x / tiles;
    const int tile0 = static_cast<int>(blockIdx.x % tiles) * 256 * kFinBatch;
    token_score_slots(head_score + b * H * L, token_score + b * L, H, L, tile0 + threadIdx.x,
                      min(L, tile0 + 256 * kFinBatch), 256, inv_heads_rows);
    return;
  }
  const int64_t bh = blockIdx.x - score_blocks;
  type_mass_row(RowValue{head_score + bh * L}, token_type + (bh / H) * tt_stride_b, tt_stride_l, L,
                num_types, inv_rows, type_mass + bh * num_types, partial);
}

}  // namespace detail
}  // namespace kernels
}  // namespace dyrate
