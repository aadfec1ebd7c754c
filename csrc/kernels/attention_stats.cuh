// CUDA kernels of attention_stats and attention_stats_from_probs (torch-free).
//
// attention_stats never forms the [B, H_q, Q, L] probability matrix. The key sequence is cut
// into C chunks (flash-decoding style) so that B = 1 still fills the device:
//   pass 1  qk_kernel<kScores = false>, one block per (chunk, kv head, sample): for the G * Q
//           query rows of the kv head (grouped-query attention reads each key once for all of
//           its query heads) the softmax partials (max, sum of exp) of every row over the chunk.
//           When Q <= kStatsMaxStoredRows it also keeps the logits (then [B, H_q, Q, L] is at
//           most 8 B H_q L floats).
//   pass 2  head_score[b, h, j] = sum_i p[b, h, i, j], each row normalised with its C partials
//           merged in chunk order: from the kept logits (logits_head_scores_kernel, one block
//           per (b, h)), or for larger Q by recomputing q.k (qk_kernel<kScores = true>, the
//           same grid as pass 1).
//   pass 3  finalize_stats_kernel: token_score = head_score summed over heads (in head order),
//           type_mass = head_score summed by slot type. Summing head_score by type equals
//           summing the probabilities by row then type: head_score already sums the rows.
// Scratch: partials [B, H_q, Q, C] (C limited so that Q * C <= 4 L when logits are not kept),
// logits when Q is small, head_score [B, H_q, L]. Every output element is written by exactly
// one thread and every sum runs in a fixed order, so results are bitwise reproducible run to
// run.
//
// One launch for Q <= kStatsMaxStoredRows (StatsFinal): pass 1 ends with a "last block done"
// handshake (each thread fences its writes, one atomicInc per block on a counter per (sample,
// kv head)); the last chunk block of a kv head runs pass 2 and the type_mass half of pass 3 for
// its heads with the same device functions, then a second handshake per sample lets the last
// such block write token_score. The atomics only elect a block; every sum runs through the
// same device function in the same order as in the three-launch path, so results stay bitwise
// reproducible (and equal that path's bits in the emulator). atomicInc wraps each counter back
// to zero, so a per-stream buffer zeroed once serves every later launch and graph replay.
//
// Memory side of the q.k passes (the decode case, Q = 1, is a stream over the keys): each thread
// issues kStatsKeysInFlight independent 16-byte key loads (rounds of key rows) before it uses any
// of them, and a key load never waits for its slot's type, which only masks the logit. At 80
// registers and kStatsMinBlocksPerSm = 3 blocks of 256 threads per SM that is 48 KiB of loads in
// flight per SM, over the ~20 KiB that 3.35 TB/s * ~600 ns needs. The chunk count C is chosen
// on the host to fill the device in whole waves (plan_attention_stats, from the occupancy API).
// bench/kernel_model.py states the resulting estimate per shape.
//
// Limit, Q > kStatsMaxStoredRows (prefill scoring): pass 2 recomputes q.k on CUDA cores, so a
// call costs two q.k products (about 6.9 GFLOP at B = 1, H = 32, Q = L = 650, D = 128) instead
// of one tensor-core matmul; fine once per generation, not a prefill kernel. On the CPU the same
// call takes 0.2 s on 2 cores (eager PyTorch: 0.33-0.43 s); the decode call (Q = 1) 0.4-0.6 ms.
#pragma once

#include <climits>

#include "common.cuh"
#include "dyrate_kernels.h"

namespace dyrate {
namespace kernels {
namespace detail {

// Slots and heads per round of independent loads in the merge and finalize loops.
constexpr int kFinBatch = 4, kFinHeads = 8;

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

// head_score[bh, j] for every slot j of one (b, h) from its kept logits: each row normalised
// with its C partials merged in chunk order, the rows added in order. Called by a whole block
// of 256 threads; row_max and row_inv are shared [kStatsMaxStoredRows]. __ldcg: the logits
// and partials may come from other blocks of the same launch (read past the L1).
__device__ __forceinline__ void logits_head_score_row(const float* logits, const float* part_max,
                                                      const float* part_sum, float* head_score,
                                                      int64_t bh, int Q, int L, int C,
                                                      float* row_max, float* row_inv) {
  if (static_cast<int>(threadIdx.x) < Q) {
    const int64_t at = (bh * Q + threadIdx.x) * C;
    float m = -INFINITY, s = 0.f;
#pragma unroll 4
    for (int cc = 0; cc < C; ++cc) {
      softmax_merge(m, s, __ldcg(part_max + at + cc), __ldcg(part_sum + at + cc));
    }
    row_max[threadIdx.x] = m;
    row_inv[threadIdx.x] = m == -INFINITY ? 0.f : 1.f / s;
  }
  __syncthreads();
  // kFinBatch slots per thread at a time, their loads issued before any is used.
  const int step = static_cast<int>(blockDim.x);
  for (int j0 = threadIdx.x; j0 < L; j0 += kFinBatch * step) {
    float sum[kFinBatch];
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) sum[u] = 0.f;
    for (int i = 0; i < Q; ++i) {
      const float* row = logits + (bh * Q + i) * L;
      float l[kFinBatch];
#pragma unroll
      for (int u = 0; u < kFinBatch; ++u) {
        l[u] = j0 + u * step < L ? __ldcg(row + j0 + u * step) : -INFINITY;
      }
#pragma unroll
      for (int u = 0; u < kFinBatch; ++u) {
        if (l[u] != -INFINITY) sum[u] += expf(l[u] - row_max[i]) * row_inv[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kFinBatch; ++u) {
      if (j0 + u * step < L) head_score[bh * L + j0 + u * step] = sum[u];
    }
  }
}

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
          v[h][u] = in ? __ldcg(head_score + static_cast<int64_t>(h0 + h) * L + j + u * step) : 0.f;
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

// type_mass[bh, t] = inv_rows * sum of head_score[bh, j] over the slots j of type t, eight
// types per sweep. Called by a whole block of 256 threads; partial is shared [8 warps][8].
__device__ __forceinline__ void type_mass_row(const float* row, const int8_t* types,
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
        v[b] = j < L ? row[j] : 0.f;
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

// Whether this block is the last of `total` to arrive at counter (the same answer in every
// thread). Every thread fences its global writes first, so the last block sees all of them;
// atomicInc wraps the counter back to zero on the last arrival, ready for the next launch.
__device__ __forceinline__ bool last_to_arrive(unsigned* counter, unsigned total, int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *flag = atomicInc(counter, total - 1u) == total - 1u;
  __syncthreads();
  const bool last = *flag != 0;
  if (last) __threadfence();
  return last;
}

// The tail of the one-launch path, run by every block of (b, kv head) bh after its partials
// and logits are written: the last of the C chunk blocks merges them into head_score and
// type_mass of the G heads (the order of the three-launch path), then the last of the H_kv
// such blocks of sample b writes token_score[b, :] (heads in order).
template <typename T>
__device__ __forceinline__ void finish_stats(const QKArgs<T>& a, int C, int bh,
                                             const StatsFinal& fin, float* rows, float* partial,
                                             int* flag, const float* part_max,
                                             const float* part_sum, const float* logits) {
  if (!last_to_arrive(fin.counters + bh, static_cast<unsigned>(C), flag)) return;
  const int G = a.Hq / a.Hkv, hkv = bh % a.Hkv, b = bh / a.Hkv;
  const int8_t* types = a.token_type + b * a.tt_stride_b;
  for (int g = 0; g < G; ++g) {
    const int64_t bhq = static_cast<int64_t>(b) * a.Hq + hkv * G + g;
    logits_head_score_row(logits, part_max, part_sum, fin.head_score, bhq, a.Q, a.L, C, rows,
                          rows + kStatsMaxStoredRows);
    __syncthreads();  // the row's head_score is written
    type_mass_row(fin.head_score + bhq * a.L, types, a.tt_stride_l, a.L, a.num_types, fin.inv_rows,
                  fin.type_mass + bhq * a.num_types, partial);
  }
  if (!last_to_arrive(fin.counters + a.B * a.Hkv + b, static_cast<unsigned>(a.Hkv), flag)) return;
  token_score_slots(fin.head_score + static_cast<int64_t>(b) * a.Hq * a.L,
                    fin.token_score + static_cast<int64_t>(b) * a.L, a.Hq, a.L, threadIdx.x, a.L,
                    blockDim.x, fin.inv_heads_rows);
}

// Passes 1 (kScores = false) and 2-with-recompute (kScores = true). Block = (chunk c, kv head,
// sample). Threads form groups of plan.lanes that share one key row: each lane loads V-element
// vectors of it and the group reduces its dot products with warp shuffles. The query rows of
// the group (row r = g * Q + i is query head hkv * G + g, row i) go through shared memory in
// tiles of rows_per_tile rows.
template <typename T, int V, bool kScores>
__global__ void __launch_bounds__(kStatsThreads, kStatsMinBlocksPerSm) qk_kernel(
    const __grid_constant__ QKArgs<T> a, const StatsPlan plan,
    float* __restrict__ part_max,            // [B, H_q, Q, C]: written (pass 1) / read (pass 2)
    float* __restrict__ part_sum,            // [B, H_q, Q, C]
    float* __restrict__ logits,              // [B, H_q, Q, L] or nullptr (pass 1 only)
    float* __restrict__ head_score,          // [B, H_q, L] (pass 2 only)
    const __grid_constant__ StatsFinal fin)  // one-launch path when fin.counters != nullptr
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
  __shared__ float fin_rows[2 * kStatsMaxStoredRows];
  __shared__ float fin_partial[kWarps * 8];
  __shared__ int fin_last;

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

    // Rounds go in batches of U: every key and type load of a batch is issued before any of
    // them is used, so U independent 16-byte loads per thread are in flight. A key load does
    // not wait for its slot's type (an empty slot's key is loaded and ignored).
    for (int round0 = 0; round0 < rounds; round0 += U) {
      typename VecLoad<T, V>::Raw raw[U] = {};
      int8_t type_of[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int j = j_begin + (round0 + u) * groups + group;
        const bool in_range = round0 + u < rounds && j < j_end;
        type_of[u] = in_range ? types[static_cast<int64_t>(j) * a.tt_stride_l] : int8_t{-1};
        if (in_range && j <= j_any && sub < nvec) {
          raw[u] = VecLoad<T, V>::load(k_base + static_cast<int64_t>(j) * a.k_stride_l + sub * V);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (round0 + u >= rounds) break;  // uniform over the block
        const int j = j_begin + (round0 + u) * groups + group;
        const bool in_range = j < j_end;
        const int t = type_of[u];
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
  if constexpr (!kScores) {
    if (fin.counters != nullptr)
      finish_stats(a, C, bh, fin, fin_rows, fin_partial, &fin_last, part_max, part_sum, logits);
  }
}

// Pass 2 from kept logits. Block = b * H_q + h, its slots in sweeps of 256.
__global__ void __launch_bounds__(256)
    logits_head_scores_kernel(const float* __restrict__ logits,    // [B, H_q, Q, L]
                              const float* __restrict__ part_max,  // [B, H_q, Q, C]
                              const float* __restrict__ part_sum,  // [B, H_q, Q, C]
                              float* __restrict__ head_score,      // [B, H_q, L]
                              int Q, int L, int C) {
  __shared__ float rows[2 * kStatsMaxStoredRows];
  logits_head_score_row(logits, part_max, part_sum, head_score, blockIdx.x, Q, L, C, rows,
                        rows + kStatsMaxStoredRows);
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

// Pass 3. Blocks [0, score_blocks) write token_score, kFinBatch slots per thread; the next B * H
// blocks write type_mass[b, h, :], eight types per sweep over the slots.
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
  type_mass_row(head_score + bh * L, token_type + (bh / H) * tt_stride_b, tt_stride_l, L, num_types,
                inv_rows, type_mass + bh * num_types, partial);
}

}  // namespace detail

StatsPlan plan_attention_stats(int B, int Hq, int Hkv, int Q, int L, int D, int elem_size,
                               bool aligned16, int sm_count, int blocks_per_sm) {
  StatsPlan p{};
  const int vec = 16 / elem_size;
  p.vec = aligned16 && D % vec == 0 ? vec : 1;
  const int nvec = D > 0 ? (D + p.vec - 1) / p.vec : 1;
  int lanes = 1;
  while (lanes < nvec && lanes < 32) lanes <<= 1;
  p.lanes = lanes;
  const int groups = kStatsThreads / lanes;
  int rows = D > 0 ? kStatsMaxTileFloats / D : kStatsRowTile;
  rows = rows < 1 ? 1 : rows;
  p.rows_per_tile = rows > kStatsRowTile ? kStatsRowTile : rows;
  p.store_logits = Q <= kStatsMaxStoredRows;

  // Chunks: the fewest that fill the device in whole waves. A wave is what the device holds
  // at once (sm_count * blocks_per_sm, from the occupancy API); a grid of 1.45 waves runs as
  // long as 2 with the second half empty, so each candidate is scored by blocks / (waves *
  // wave) and the first reaching kStatsWaveFill wins (else the best). Each chunk keeps at
  // least `groups` slots so that every lane group has a key; with Q large the partials
  // [B, H_q, Q, C] stay within 4 B H_q L floats.
  const int64_t wave =
      static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const int64_t bh = static_cast<int64_t>(B) * Hkv;
  int64_t max_chunks = (static_cast<int64_t>(L) + groups - 1) / groups;
  if (!p.store_logits) {
    const int64_t scratch_cap = 4LL * L / (Q > 0 ? Q : 1);
    if (max_chunks > scratch_cap) max_chunks = scratch_cap;
  }
  if (max_chunks > kStatsMaxChunks) max_chunks = kStatsMaxChunks;
  if (max_chunks < 1) max_chunks = 1;
  double best_fill = -1.0;
  for (int64_t c = 1; c <= max_chunks; ++c) {
    int64_t len = (static_cast<int64_t>(L) + c - 1) / c;
    len = (len + groups - 1) / groups * groups;
    if (len < 1) len = 1;
    const int64_t chunks = (static_cast<int64_t>(L) + len - 1) / len;
    if (chunks != c) continue;  // the rounding of len gave an earlier candidate
    const int64_t blocks = bh * chunks;
    const double fill = static_cast<double>(blocks) / (((blocks + wave - 1) / wave) * wave);
    if (fill > best_fill + 1e-9) {
      best_fill = fill;
      p.chunk_len = static_cast<int>(len);
      p.chunks = static_cast<int>(chunks);
    }
    if (fill >= kStatsWaveFill) break;
  }
  if (best_fill < 0) {  // L == 0
    p.chunk_len = 1;
    p.chunks = 1;
  }
  p.waves = bh > 0 ? static_cast<float>(bh * p.chunks) / static_cast<float>(wave) : 0.f;
  return p;
}

namespace detail {

template <typename T>
int qk_blocks_per_sm(int vec, size_t smem) {
  int n = 0;
  constexpr int kVec = vec16<T>();
  const cudaError_t e = vec == kVec ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                          &n, qk_kernel<T, kVec, false>, kStatsThreads, smem)
                                    : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                          &n, qk_kernel<T, 1, false>, kStatsThreads, smem);
  return e == cudaSuccess && n > 0 ? n : 1;
}

}  // namespace detail

int stats_blocks_per_sm(int elem_size, int D, bool aligned16) {
  const StatsPlan p = plan_attention_stats(1, 1, 1, 1, 1, D, elem_size, aligned16, 1, 1);
  const size_t smem = static_cast<size_t>(p.rows_per_tile) * (D > 0 ? D : 1) * sizeof(float);
  return elem_size == 4 ? detail::qk_blocks_per_sm<float>(p.vec, smem)
                        : detail::qk_blocks_per_sm<__half>(p.vec, smem);
}

namespace detail {

template <typename T, bool kScores>
cudaError_t launch_qk(const QKArgs<T>& a, const StatsPlan& plan, float* part_max, float* part_sum,
                      float* logits, float* head_score, const StatsFinal& fin,
                      cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(plan.chunks) * a.Hkv * a.B;
  if (blocks == 0 || a.Q == 0 || a.L == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(plan.rows_per_tile) * a.D * sizeof(float);
  constexpr int kVec = vec16<T>();
  if (plan.vec == kVec) {
    qk_kernel<T, kVec, kScores><<<static_cast<unsigned>(blocks), kStatsThreads, smem, stream>>>(
        a, plan, part_max, part_sum, logits, head_score, fin);
  } else {
    qk_kernel<T, 1, kScores><<<static_cast<unsigned>(blocks), kStatsThreads, smem, stream>>>(
        a, plan, part_max, part_sum, logits, head_score, fin);
  }
  return cudaGetLastError();
}

}  // namespace detail

template <typename T>
cudaError_t launch_qk_partials(const QKArgs<T>& a, const StatsPlan& plan, float* part_max,
                               float* part_sum, float* logits, const StatsFinal* fin,
                               cudaStream_t stream) {
  if (fin != nullptr && (!plan.store_logits || fin->counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const StatsFinal none{};
  return detail::launch_qk<T, false>(a, plan, part_max, part_sum,
                                     plan.store_logits ? logits : nullptr, nullptr,
                                     fin != nullptr ? *fin : none, stream);
}

template <typename T>
cudaError_t launch_qk_head_scores(const QKArgs<T>& a, const StatsPlan& plan, const float* part_max,
                                  const float* part_sum, float* head_score, cudaStream_t stream) {
  // The kernel only reads the partials in this pass.
  return detail::launch_qk<T, true>(a, plan, const_cast<float*>(part_max),
                                    const_cast<float*>(part_sum), nullptr, head_score, StatsFinal{},
                                    stream);
}

cudaError_t launch_logits_head_scores(const float* logits, const float* part_max,
                                      const float* part_sum, float* head_score, int B, int Hq,
                                      int Q, int L, int chunks, cudaStream_t stream) {
  if (Q > kStatsMaxStoredRows) return cudaErrorInvalidValue;
  const int64_t blocks = static_cast<int64_t>(B) * Hq;
  if (blocks == 0 || Q == 0 || L == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  detail::logits_head_scores_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      logits, part_max, part_sum, head_score, Q, L, chunks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_probs_head_scores(const T* probs, int64_t p_stride_b, int64_t p_stride_h,
                                     int64_t p_stride_q, const int8_t* token_type,
                                     int64_t tt_stride_b, int64_t tt_stride_l, int B, int H, int Q,
                                     int L, int num_types, float* head_score, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(B) * H * ((L + 255) / 256);
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  detail::probs_head_scores_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      probs, p_stride_b, p_stride_h, p_stride_q, token_type, tt_stride_b, tt_stride_l, H, Q, L,
      num_types, head_score);
  return cudaGetLastError();
}

cudaError_t launch_finalize_stats(const float* head_score, const int8_t* token_type,
                                  int64_t tt_stride_b, int64_t tt_stride_l, int B, int H, int L,
                                  int num_types, float inv_rows, float inv_heads_rows,
                                  float* type_mass, float* token_score, cudaStream_t stream) {
  const int64_t score_blocks =
      static_cast<int64_t>(B) * ((L + 256 * detail::kFinBatch - 1) / (256 * detail::kFinBatch));
  const int64_t blocks = score_blocks + static_cast<int64_t>(B) * H;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  detail::finalize_stats_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      head_score, token_type, tt_stride_b, tt_stride_l, B, H, L, num_types, inv_rows,
      inv_heads_rows, static_cast<int>(score_blocks), type_mass, token_score);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dyrate
