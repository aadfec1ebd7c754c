// The q.k kernel of attention_stats (torch-free): pass 1 (softmax partials per key chunk, and
// the logits when Q is small) and, for large Q, pass 2 by recomputation. See attention_stats.cuh.
#pragma once

#include "common.cuh"
#include "dyrate_kernels.h"

namespace dyrate {
namespace kernels {
namespace detail {

// acc + <q[0:V], k[0:V]>; q is 16-byte aligned shared memory when V is a multiple of 4.
template <int V>
__device__ __forceinline__ float dot_acc(const float* q, const float (&k)[V], float acc) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      const float4 qv = *reinterpret_cast<const float4*>(q + e);
      acc = fmaf(qv.x, k[e], acc);
      acc = fmaf(qv.y, k[e + 1], acc);
      acc = fmaf(qv.z, k[e + 2], acc);
      acc = fmaf(qv.w, k[e + 3], acc);
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) acc = fmaf(q[e], k[e], acc);
  }
  return acc;
}

// Types of chunk slots [j0, min(j_end, j0 + kStatsTypeTile)) into tile (-1 past j_end), one
// byte per thread and round, all issued before the caller's barrier. Called by the whole block.
__device__ __forceinline__ void stage_types(int8_t* tile, const int8_t* types, int64_t stride_l,
                                            int j0, int j_end) {
  const int n = min(kStatsTypeTile, j_end - j0);
  for (int t = threadIdx.x; t < n; t += kStatsThreads) {
    tile[t] = types[static_cast<int64_t>(j0 + t) * stride_l];
  }
}

// Passes 1 (kScores = false) and 2-with-recompute (kScores = true). Block = (chunk c, kv head,
// sample). Threads form groups of plan.lanes that share one key row: each lane loads V-element
// vectors of it and the group reduces its dot products with warp shuffles. The query rows of
// the group (row r = g * Q + i is query head hkv * G + g, row i) go through shared memory in
// tiles of rows_per_tile rows.
template <typename T, int V, bool kScores>
__global__ void __launch_bounds__(kStatsThreads, kStatsMinBlocksPerSm)
    qk_kernel(const __grid_constant__ QKArgs<T> a, const StatsPlan plan,
              float* __restrict__ part_max,    // [B, H_q, Q, C]: written (pass 1) / read (pass 2)
              float* __restrict__ part_sum,    // [B, H_q, Q, C]
              float* __restrict__ logits,      // [B, H_q, Q, L] or nullptr (pass 1 only)
              float* __restrict__ head_score)  // [B, H_q, L] (pass 2 only)
{
  constexpr int RT = kStatsRowTile;
  // Keys in flight per thread: fewer where more registers are live (pass 2's running sums,
  // float32's wider rows) so that nothing spills at kStatsMinBlocksPerSm blocks per SM.
  constexpr int U = V == 1 ? 1 : (kScores || sizeof(T) == 4 ? 2 : kStatsKeysInFlight);
  constexpr int kWarps = kStatsThreads / 32;
  extern __shared__ float4 dyn_smem[];
  float* q_tile = reinterpret_cast<float*>(dyn_smem);  // [rows_per_tile, D]
  __shared__ float warp_max[kWarps][RT];
  __shared__ float warp_sum[kWarps][RT];
  __shared__ float tile_max[RT];
  __shared__ float tile_inv[RT];
  __shared__ int8_t tile_type[kStatsTypeTile];  // types of chunk slots [tile_base, + tile)

  const int C = plan.chunks;
  const int c = static_cast<int>(blockIdx.x % C);
  const int bh = static_cast<int>(blockIdx.x / C);
  const int hkv = bh % a.Hkv, b = bh / a.Hkv;
  const int Q = a.Q, L = a.L, D = a.D, Hq = a.Hq;
  const int G = Hq / a.Hkv, R = G * Q;
  const int j_begin = c * plan.chunk_len;
  const int j_end = min(L, j_begin + plan.chunk_len);
  const int S = plan.lanes, groups = kStatsThreads / S;
  const int group = threadIdx.x / S, sub = threadIdx.x % S;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // The trip count is the same for every thread: all lanes reach every shuffle.
  const int rounds = (j_end - j_begin + groups - 1) / groups;
  const int nvec = (D + V - 1) / V;
  const T* k_base = a.k + b * a.k_stride_b + hkv * a.k_stride_h;
  const int8_t* types = a.token_type + b * a.tt_stride_b;
  const int64_t row_base = static_cast<int64_t>(b * Hq + hkv * G) * Q;

  for (int r0 = 0; r0 < R; r0 += plan.rows_per_tile) {
    const int rn = min(plan.rows_per_tile, R - r0);
    __syncthreads();  // readers of the previous tile's shared memory are done
    stage_types(tile_type, types, a.tt_stride_l, j_begin, j_end);  // with the queries: one wait
    for (int idx = threadIdx.x; idx < rn * D; idx += kStatsThreads) {
      const int r = idx / D, d = idx - r * D;
      const int row = r0 + r, g = row / Q, i = row - g * Q;
      const T* src = a.q + b * a.q_stride_b + static_cast<int64_t>(hkv * G + g) * a.q_stride_h +
                     static_cast<int64_t>(i) * a.q_stride_q;
      q_tile[idx] = to_float(src[d]);
    }
    if (kScores && static_cast<int>(threadIdx.x) < rn) {
      // Merge the row's C chunk partials in chunk order; every block merging this row gets
      // the same bits.
      const float* pm = part_max + (row_base + r0 + threadIdx.x) * C;
      const float* ps = part_sum + (row_base + r0 + threadIdx.x) * C;
      float m = -INFINITY, s = 0.f;
      for (int cc = 0; cc < C; ++cc) softmax_merge(m, s, pm[cc], ps[cc]);
      tile_max[threadIdx.x] = m;
      tile_inv[threadIdx.x] = m == -INFINITY ? 0.f : 1.f / s;
    }
    __syncthreads();

    // Per-row constants of the tile. Row r0 + r of this kv head is row (b * H_q + hkv * G) * Q
    // + r0 + r of [B, H_q, Q, *], so only the query index i needs a division.
    int row_i[RT];
    float st_a[RT], st_b[RT];  // pass 1: running (max, sum); pass 2: (max, 1 / sum)
#pragma unroll
    for (int r = 0; r < RT; ++r) {
      row_i[r] = min(r0 + r, R - 1) % Q;
      if constexpr (kScores) {
        st_a[r] = r < rn ? tile_max[r] : -INFINITY;
        st_b[r] = r < rn ? tile_inv[r] : 0.f;
      } else {
        st_a[r] = -INFINITY;
        st_b[r] = 0.f;
      }
    }
    // Slots past L - Q + i_last are masked for every row of the tile: skip their loads.
    const int i_first = r0 % Q;
    const int i_last = i_first + rn - 1 < Q ? i_first + rn - 1 : Q - 1;
    const int j_any = a.causal ? L - Q + i_last : L - 1;

    // Rounds go in batches of U: every key load of a batch is issued before any of them is
    // used, so U independent 16-byte loads per thread are in flight. A key load does not wait
    // for its slot's type (an empty slot's key is loaded and ignored); the types come from
    // shared memory, staged kStatsTypeTile slots at a time (a batch never straddles two tiles).
    int tile_base = 0;
    for (int round0 = 0; round0 < rounds; round0 += U) {
      if (round0 * groups - tile_base == kStatsTypeTile) {  // uniform over the block
        tile_base += kStatsTypeTile;
        __syncthreads();  // every reader of the previous tile is done
        stage_types(tile_type, types, a.tt_stride_l, j_begin + tile_base, j_end);
        __syncthreads();
      }
      typename VecLoad<T, V>::Raw raw[U] = {};
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j_begin + (round0 + u) * groups + group;
        if (round0 + u < rounds && j < j_end && j <= j_any && sub < nvec) {
          raw[u] = VecLoad<T, V>::load(k_base + static_cast<int64_t>(j) * a.k_stride_l + sub * V);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (round0 + u >= rounds) break;  // uniform over the block
        const int j = j_begin + (round0 + u) * groups + group;
        const bool in_range = j < j_end;
        const int t = in_range ? tile_type[j - j_begin - tile_base] : -1;
        const bool valid = t >= 0 && t < a.num_types;
        float acc[RT];
#pragma unroll
        for (int r = 0; r < RT; ++r) acc[r] = 0.f;
        if (valid && j <= j_any && sub < nvec) {
          float kf[V];
          VecLoad<T, V>::convert(raw[u], kf);
#pragma unroll
          for (int r = 0; r < RT; ++r) {
            if (r < rn) acc[r] = dot_acc<V>(q_tile + r * D + sub * V, kf, acc[r]);
          }
          // Head dims beyond S vectors (D > 256 in half types): the remaining vectors.
          const T* krow = k_base + static_cast<int64_t>(j) * a.k_stride_l;
          for (int v = sub + S; v < nvec; v += S) {
            VecLoad<T, V>::convert(VecLoad<T, V>::load(krow + v * V), kf);
#pragma unroll
            for (int r = 0; r < RT; ++r) {
              if (r < rn) acc[r] = dot_acc<V>(q_tile + r * D + v * V, kf, acc[r]);
            }
          }
        }
        // Pass 2: one thread owns slot j for the whole block and adds the rows of each head in
        // row order, as a run of rows per head, tile after tile.
        const bool owner = in_range && sub == 0;
        int run_h = hkv * G + r0 / Q;
        float run = 0.f;
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          if (r < rn) {  // uniform over the block
            float x = acc[r];
            for (int off = S >> 1; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
            const bool allowed = valid && (!a.causal || j <= L - Q + row_i[r]);
            const float logit = allowed ? a.scale * x : -INFINITY;
            if constexpr (kScores) {
              const float p = logit == -INFINITY ? 0.f : expf(logit - st_a[r]) * st_b[r];
              if (r > 0 && row_i[r] == 0) {  // the rows of the next head start
                if (owner) head_score[static_cast<int64_t>(b * Hq + run_h) * L + j] += run;
                ++run_h;
                run = 0.f;
              }
              run += p;
            } else {
              if (logit > st_a[r]) {
                st_b[r] = st_b[r] * expf(st_a[r] - logit) + 1.f;
                st_a[r] = logit;
              } else if (logit != -INFINITY) {
                st_b[r] += expf(logit - st_a[r]);
              }
              if (logits != nullptr && owner) {
                logits[(row_base + r0 + r) * L + j] = logit;
              }
            }
          }
        }
        if (kScores && owner) head_score[static_cast<int64_t>(b * Hq + run_h) * L + j] += run;
      }
    }

    if constexpr (!kScores) {
      // Chunk partial of each row: merge over the groups of a warp (butterfly), then over the
      // warps in warp order.
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        if (r < rn) {
          float m = st_a[r], s = st_b[r];
          for (int off = S; off < 32; off <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
            const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
            softmax_merge(m, s, m2, s2);
          }
          if (lane == 0) {
            warp_max[warp][r] = m;
            warp_sum[warp][r] = s;
          }
        }
      }
      __syncthreads();
      if (static_cast<int>(threadIdx.x) < rn) {
        const int r = threadIdx.x;
        float m = -INFINITY, s = 0.f;
        for (int w = 0; w < kWarps; ++w) softmax_merge(m, s, warp_max[w][r], warp_sum[w][r]);
        const int64_t at = (row_base + r0 + r) * C + c;
        part_max[at] = m;
        part_sum[at] = s;
      }
    }
  }
}

}  // namespace detail
}  // namespace kernels
}  // namespace dyrate
