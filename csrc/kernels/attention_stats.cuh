// attention_stats and attention_stats_from_probs on CUDA (torch-free): the launch plan and
// the launchers; the kernels are in stats_qk.cuh and stats_merge.cuh.
//
// attention_stats never forms the [B, H_q, Q, L] probability matrix. The key sequence is cut
// into C chunks (split-K, flash-decoding style) so that B = 1 still fills the device:
//   pass 1  qk_kernel<kScores = false>, one block per (chunk, kv head, sample): for the G * Q
//           query rows of the kv head (grouped-query attention reads each key once for all of
//           its query heads) the softmax partials (max, sum of exp) of every row over the chunk.
//           When Q <= kStatsMaxStoredRows it also keeps the logits ([B, H_q, Q, L] is then at
//           most 8 B H_q L floats).
//   merge   Q <= kStatsMaxStoredRows: logits_stats_kernel, one launch spread over many blocks:
//           blocks per (slot tile, sample) write token_score, blocks per (sample, head) write
//           type_mass, each merging the partials it needs in chunk order and normalising the
//           kept logits. Two launches per call.
//           Q > kStatsMaxStoredRows: head_score[b, h, j] = sum_i p[b, h, i, j] by recomputing
//           q.k (qk_kernel<kScores = true>, the grid of pass 1), then finalize_stats_kernel:
//           token_score = head_score summed over heads (in head order), type_mass = head_score
//           summed by slot type. Three launches per call.
// Scratch: partials [B, H_q, Q, C] (C limited so that Q * C <= 4 L when logits are not kept),
// logits when Q is small, head_score [B, H_q, L] when Q is large. Every output element is
// written by exactly one thread and every sum runs in a fixed order, so results are bitwise
// reproducible run to run.
//
// Why two launches and not one: a "last block done" merge inside pass 1 (fence, atomic counter,
// the last block of each sample merges) saves a launch but leaves the whole merge of a sample -
// reading H_q * Q * L logits - to one block at the end, after two counter round trips. That
// tail is latency bound (about 5 us at B = 1, L = 650 on bench/kernel_model.py's numbers) and
// costs more than the launch it saves; logits_stats_kernel spreads the same work over
// B * (L / 64 + H_q) blocks.
//
// Memory side of the q.k passes (the decode case, Q = 1, is a stream over the keys): each thread
// issues kStatsKeysInFlight independent 16-byte key loads (rounds of key rows) before it uses any
// of them; the token types of the chunk are staged in shared memory (kStatsTypeTile slots, with
// the query tile, so both share one wait) and only mask the logit, so no key load waits for
// one. At 80 registers and kStatsMinBlocksPerSm = 3 blocks of 256 threads per SM that is
// 48 KiB of loads in flight per SM, over the ~20 KiB that 3.35 TB/s * ~600 ns needs. The chunk
// count C is chosen on the host to fill the device in whole waves (plan_attention_stats, from
// the occupancy API). bench/kernel_model.py states the resulting estimate per shape.
//
// Limit, Q > kStatsMaxStoredRows (prefill scoring): pass 2 recomputes q.k on CUDA cores, so a
// call costs two q.k products (about 6.9 GFLOP at B = 1, H = 32, Q = L = 650, D = 128) instead
// of one tensor-core matmul; fine once per generation, not a prefill kernel. On the CPU the same
// call takes 0.2 s on 2 cores (eager PyTorch: 0.33-0.43 s); the decode call (Q = 1) 0.4-0.6 ms.
// On an H100 (estimate, not measured) the two products need >= 0.10 ms even at the 67 TFLOP/s
// fp32 peak, while eager PyTorch's tensor-core matmul and ~150 MB of score traffic take ~45 us.
#pragma once

#include <climits>

#include "common.cuh"
#include "dyrate_kernels.h"
#include "stats_merge.cuh"
#include "stats_qk.cuh"

namespace dyrate {
namespace kernels {

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
                      float* logits, float* head_score, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(plan.chunks) * a.Hkv * a.B;
  if (blocks == 0 || a.Q == 0 || a.L == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  const size_t smem = static_cast<size_t>(plan.rows_per_tile) * a.D * sizeof(float);
  constexpr int kVec = vec16<T>();
  if (plan.vec == kVec) {
    qk_kernel<T, kVec, kScores><<<static_cast<unsigned>(blocks), kStatsThreads, smem, stream>>>(
        a, plan, part_max, part_sum, logits, head_score);
  } else {
    qk_kernel<T, 1, kScores><<<static_cast<unsigned>(blocks), kStatsThreads, smem, stream>>>(
        a, plan, part_max, part_sum, logits, head_score);
  }
  return cudaGetLastError();
}

}  // namespace detail

template <typename T>
cudaError_t launch_qk_partials(const QKArgs<T>& a, const StatsPlan& plan, float* part_max,
                               float* part_sum, float* logits, cudaStream_t stream) {
  return detail::launch_qk<T, false>(a, plan, part_max, part_sum,
                                     plan.store_logits ? logits : nullptr, nullptr, stream);
}

template <typename T>
cudaError_t launch_qk_head_scores(const QKArgs<T>& a, const StatsPlan& plan, const float* part_max,
                                  const float* part_sum, float* head_score, cudaStream_t stream) {
  // The kernel only reads the partials in this pass.
  return detail::launch_qk<T, true>(a, plan, const_cast<float*>(part_max),
                                    const_cast<float*>(part_sum), nullptr, head_score, stream);
}

cudaError_t launch_logits_stats(const float* logits, const float* part_max, const float* part_sum,
                                const int8_t* token_type, int64_t tt_stride_b, int64_t tt_stride_l,
                                int B, int Hq, int Q, int L, int chunks, int num_types,
                                float* type_mass, float* token_score, cudaStream_t stream) {
  if (Q > kStatsMaxStoredRows) return cudaErrorInvalidValue;
  const int64_t score_blocks =
      static_cast<int64_t>(B) * ((L + detail::kTokSlots - 1) / detail::kTokSlots);
  const int64_t blocks = score_blocks + static_cast<int64_t>(B) * Hq;
  if (B == 0 || Hq == 0 || Q == 0 || L == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  detail::logits_stats_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      logits, part_max, part_sum, token_type, tt_stride_b, tt_stride_l, Hq, Q, L, chunks, num_types,
      1.f / static_cast<float>(Q), 1.f / static_cast<float>(Hq * Q), static_cast<int>(score_blocks),
      type_mass, token_score);
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
