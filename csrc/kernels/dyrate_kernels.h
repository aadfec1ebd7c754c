// Host-side interface of the dyrate CUDA kernels: argument structs, launch plans and one
// launcher per kernel. Torch-free, so the g++-compiled glue (csrc/cuda/ops_cuda.cpp) includes
// it while only csrc/cuda/kernels.cu, compiled by nvcc, sees the kernels themselves
// (csrc/kernels/*.cuh). Launchers enqueue on the given stream, never synchronise, and return
// the launch error (cudaSuccess when there is nothing to do).
//
// Values the CPU backend rejects are not checked here (that would cost a host sync); the
// kernels stay in bounds for any value instead:
//   token_type outside [0, num_types)  -> an empty slot (attention_stats*)
//   keep_count < 0                     -> 0 (select_keep)
//   new_length outside [0, L]          -> clamped (compact_*)
//   keep_index entry outside [0, L)    -> that destination slot is left as it was (compact_*)
//   block_table entry outside [0, num_blocks) -> a move from or to a slot of that logical
//                                        block is skipped (compact_paged_)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace dyrate {
namespace kernels {

// ---------------------------------------------------------------------------------------------
// attention_stats
// ---------------------------------------------------------------------------------------------

// Queries, keys and types of one attention_stats call. Strides are in elements.
template <typename T>
struct QKArgs {
  const T* q;  // [B, H_q, Q, D], last dim contiguous
  int64_t q_stride_b, q_stride_h, q_stride_q;
  const T* k;  // [B, H_kv, L, D], last dim contiguous
  int64_t k_stride_b, k_stride_h, k_stride_l;
  const int8_t* token_type;  // [B, L]
  int64_t tt_stride_b, tt_stride_l;
  int B, Hq, Hkv, Q, L, D, num_types;
  float scale;
  bool causal;
};

// How the q.k kernels split the work; computed once on the host by plan_attention_stats and
// shared by every launch of one call, so the scratch layout agrees between passes.
struct StatsPlan {
  int chunks;  // C: the key sequence is split into C chunks of chunk_len slots
  int chunk_len;
  int lanes;          // S: threads that share one key row (a power of two <= 32)
  int rows_per_tile;  // query rows held in shared memory at once (<= kStatsRowTile)
  int vec;            // elements per key load: 16 / sizeof(T) when aligned, else 1
  bool store_logits;  // Q small: pass 1 keeps the logits, pass 2 reads them instead of q.k
  float waves;        // grid size in waves of sm_count * blocks_per_sm blocks
};

constexpr int kStatsThreads = 256;
constexpr int kStatsRowTile = 4;
// Key rows whose 16-byte loads one thread issues before using any of them.
constexpr int kStatsKeysInFlight = 4;
// Resident blocks per SM the q.k kernel is compiled for: 80 registers per thread hold the
// keys in flight without spilling (4 blocks would cap it at 64 and spill).
constexpr int kStatsMinBlocksPerSm = 3;
// The grid is sized to fill at least this fraction of its last wave, and never has more than
// kStatsMaxChunks chunks per key sequence.
constexpr double kStatsWaveFill = 0.85;
constexpr int kStatsMaxChunks = 256;
// Largest Q whose logits [B, H_q, Q, L] are kept between the passes (scratch <= 8 B H_q L).
constexpr int kStatsMaxStoredRows = 8;
// Token types of a chunk are staged in shared memory this many slots at a time; a multiple of
// every batch of key rows (kStatsKeysInFlight rounds of at most kStatsThreads rows).
constexpr int kStatsTypeTile = 2048;
static_assert(kStatsTypeTile % (kStatsKeysInFlight * kStatsThreads) == 0,
              "a batch of key rows must not straddle two type tiles");
// Dynamic shared memory for the query tile (rows_per_tile * D floats): 44 KiB, leaving room for
// the kernel's static shared memory (the type tile and the reductions, about 2.3 KiB) under the
// 48 KiB a launch may use without opting in. It
// also bounds the head dim D the CUDA attention_stats accepts.
constexpr int kStatsMaxTileFloats = 11264;

// The split for one call. sm_count is the device's multiprocessor count and blocks_per_sm
// the pass-1 kernel's occupancy (stats_blocks_per_sm); aligned16 says whether k's data pointer
// and strides allow 16-byte loads.
StatsPlan plan_attention_stats(int B, int Hq, int Hkv, int Q, int L, int D, int elem_size,
                               bool aligned16, int sm_count, int blocks_per_sm);

// Resident pass-1 blocks per SM on the current device (the occupancy API; no stream work, so
// legal during CUDA-graph capture). elem_size 2 stands for both 16-bit types.
int stats_blocks_per_sm(int elem_size, int D, bool aligned16);

// Pass 1, grid (C, B, H_kv): per query row and key chunk, the softmax partials (max, sum of
// exp) over the allowed slots of the chunk; with plan.store_logits also every logit (-inf
// where not allowed).
template <typename T>
cudaError_t launch_qk_partials(const QKArgs<T>& a, const StatsPlan& plan,
                               float* part_max,  // [B, H_q, Q, C]
                               float* part_sum,  // [B, H_q, Q, C]
                               float* logits,    // [B, H_q, Q, L], or nullptr
                               cudaStream_t stream);

// Pass 2 when logits were not kept, grid (C, B, H_kv): recomputes q.k, normalises with the
// combined partials and adds each head's probabilities over its query rows. head_score must
// be zero on entry.
template <typename T>
cudaError_t launch_qk_head_scores(const QKArgs<T>& a, const StatsPlan& plan,
                                  const float* part_max,  // [B, H_q, Q, C]
                                  const float* part_sum,  // [B, H_q, Q, C]
                                  float* head_score,      // [B, H_q, L]
                                  cudaStream_t stream);

// The merge when logits were kept (Q <= kStatsMaxStoredRows), one launch: each row's C
// partials merged in chunk order normalise its logits, then
//   token_score[b, j]  = inv_heads_rows * sum_h sum_i p[b, h, i, j]
//   type_mass[b, h, t] = inv_rows * sum_{j of type t} sum_i p[b, h, i, j]
// with inv_rows = 1 / Q and inv_heads_rows = 1 / (H_q * Q).
cudaError_t launch_logits_stats(const float* logits,       // [B, H_q, Q, L]
                                const float* part_max,     // [B, H_q, Q, C]
                                const float* part_sum,     // [B, H_q, Q, C]
                                const int8_t* token_type,  // [B, L]
                                int64_t tt_stride_b, int64_t tt_stride_l, int B, int Hq, int Q,
                                int L, int chunks, int num_types,
                                float* type_mass,    // [B, H_q, num_types]
                                float* token_score,  // [B, L]
                                cudaStream_t stream);

// attention_stats_from_probs' pass 1: head_score[b, h, j] = sum_i probs[b, h, i, j] at
// slots of a valid type, 0 elsewhere.
template <typename T>
cudaError_t launch_probs_head_scores(const T* probs,  // [B, H, Q, L], last dim contiguous
                                     int64_t p_stride_b, int64_t p_stride_h, int64_t p_stride_q,
                                     const int8_t* token_type,  // [B, L]
                                     int64_t tt_stride_b, int64_t tt_stride_l, int B, int H, int Q,
                                     int L, int num_types,
                                     float* head_score,  // [B, H, L]
                                     cudaStream_t stream);

// Last pass of attention_stats_from_probs and of attention_stats for Q > kStatsMaxStoredRows,
// one launch with two kinds of blocks:
//   token_score[b, j]  = inv_heads_rows * sum_h head_score[b, h, j]  (heads in order)
//   type_mass[b, h, t] = inv_rows * sum_{j of type t} head_score[b, h, j]
cudaError_t launch_finalize_stats(const float* head_score,   // [B, H, L]
                                  const int8_t* token_type,  // [B, L]
                                  int64_t tt_stride_b, int64_t tt_stride_l, int B, int H, int L,
                                  int num_types, float inv_rows, float inv_heads_rows,
                                  float* type_mass,    // [B, H, num_types]
                                  float* token_score,  // [B, L]
                                  cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// select_keep
// ---------------------------------------------------------------------------------------------

struct SelectArgs {
  const float* token_score;  // [B, L]
  int64_t ts_stride_b, ts_stride_l;
  const int8_t* token_type;  // [B, L]
  int64_t tt_stride_b, tt_stride_l;
  const int64_t* keep_count;  // [B]
  int64_t kc_stride;
  int64_t target_type;
  int B, L;
  int64_t* keep_index;  // [B, L], contiguous output
  int64_t* new_length;  // [B], contiguous output
};

// Longest row select_keep stages in shared memory (5 bytes a slot: 40 KiB, under the 48 KiB a
// launch may use with the kernel's 1.2 KiB of static shared memory).
constexpr int kSelectStagedSlots = 8192;

// One block per sample: radix select of the keep_count-th best target slot, then an
// ascending block scan that writes keep_index (kept slots, then -1) and new_length.
cudaError_t launch_select_keep(const SelectArgs& a, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// compact_ and compact_token_type_
// ---------------------------------------------------------------------------------------------

// What every compaction reads: select_keep's plan.
struct KeepPlan {
  const int64_t* keep_index;  // [B, L]
  int64_t ki_stride_b, ki_stride_l;
  const int64_t* new_length;  // [B]
  int64_t nl_stride;
};

// Tensors per launch; the table travels as a __grid_constant__ kernel parameter (< 4 KiB), and
// longer lists take one launch per kCompactMaxTensors tensors.
constexpr int kCompactMaxTensors = 64;

struct CompactTensor {
  char* data;                            // [B, H, L, D] tensor's first byte
  int64_t stride_b, stride_h, stride_l;  // in bytes
  int32_t heads;                         // H
  int32_t row_words;                     // D * element_size / word bytes
  int32_t word_log2;                     // log2 of the copy unit: 0 (1 byte) .. 4 (16)
  int32_t pad_;
};

struct CompactTable {
  CompactTensor tensors[kCompactMaxTensors];
  int32_t first_block[kCompactMaxTensors + 1];  // tensor i owns blocks [first[i], first[i+1])
  int32_t count;
  int32_t L;
  KeepPlan plan;
};

// Kernel parameters are limited to 4 KiB on every supported toolkit.
static_assert(sizeof(CompactTable) <= 4096, "the compact table must fit in kernel parameters");

// One block per (tensor, b, h) row of the table's tensors; in place.
cudaError_t launch_compact(const CompactTable& table, cudaStream_t stream);

// One block per sample; in place, -1 from new_length[b] on.
cudaError_t launch_compact_token_type(int8_t* token_type,  // [B, L]
                                      int64_t tt_stride_b, int64_t tt_stride_l,
                                      const int64_t* keep_index,  // [B, L]
                                      int64_t ki_stride_b, int64_t ki_stride_l,
                                      const int64_t* new_length,  // [B]
                                      int64_t nl_stride, int B, int L, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// compact_paged_
// ---------------------------------------------------------------------------------------------

// Tensors and geometry groups per launch. Tensors whose geometry (strides, heads, copy word)
// is the same, such as the keys of every layer, share one group entry, so the table holds a
// data pointer per tensor and one launch covers a whole model's cache; a longer list or more
// distinct geometries take one launch per full table.
constexpr int kPagedMaxTensors = 384;
constexpr int kPagedMaxGroups = 8;

// What a block needs to find the bytes of one (head, logical slot) of a group's tensors: byte
// strides of the physical block, the slot within it and the head, and the words a slot's head
// holds, word k at byte k * word_stride (the next word of a contiguous row, or the next channel
// of a layout whose channels are strided).
struct PagedGroup {
  int64_t stride_blk, stride_slot, stride_h, word_stride;  // bytes
  int32_t heads;                                           // H
  int32_t row_words;                                       // copy words per (slot, head)
  int32_t word_log2;                                       // log2 of the copy unit: 0 .. 4
  int32_t pad_;
};

struct PagedTable {
  char* data[kPagedMaxTensors];               // each tensor's first byte, grouped: group g owns
  int32_t first_tensor[kPagedMaxGroups + 1];  // data[first_tensor[g], first_tensor[g + 1])
  int32_t first_block[kPagedMaxGroups + 1];   // and blocks [first_block[g], first_block[g + 1])
  PagedGroup groups[kPagedMaxGroups];
  int32_t group_count;
  int32_t B, L;
  int32_t block_size, num_blocks;
  int32_t bt_int64;         // block_table holds int64 (else int32)
  const void* block_table;  // [B, max_blocks]
  int64_t bt_stride_b, bt_stride_t;
  KeepPlan plan;
};

static_assert(sizeof(PagedTable) <= 4096, "the paged table must fit in kernel parameters");

// One block per (tensor, b, h) of the table's tensors; in place. Logical slot t of request b
// is slot t % block_size of physical block block_table[b, t / block_size]; a slot whose source
// or destination block is outside [0, num_blocks) is left as it was.
cudaError_t launch_compact_paged(const PagedTable& table, cudaStream_t stream);

}  // namespace kernels
}  // namespace dyrate
