// CUDA kernels of compact_ and compact_token_type_ (torch-free), in place.
//
// One block owns one (tensor, b, h) row, so rows never race with each other. Within a row,
// destination slot s takes source slot keep_index[s] >= s (keep_index ascending). The block
// walks the destination slots in ascending chunks: it loads a whole chunk into registers,
// waits at a barrier, then stores it. A store of chunk k lands on slots <= the last
// destination of chunk k, and every later source is a slot strictly after that (or the same
// slot when it does not move, which is skipped), so later loads never see a stored value and
// no barrier is needed after the stores. Slots before the first one that moves are not
// touched. Copies use the widest of 16/8/4/2/1-byte words that the tensor's pointer, strides
// and row size allow (chosen on the host). The walk (compact_row) is shared with the paged
// kernel of compact_paged.cuh, which finds the slots through a block table instead.
#pragma once

#include <climits>

#include "common.cuh"
#include "dyrate_kernels.h"

namespace dyrate {
namespace kernels {
namespace detail {

constexpr int kCompactThreads = 256;
constexpr int kCompactUnroll = 4;  // words per thread per chunk: 16 KiB per chunk at 16 bytes
// Source slots staged per chunk: a chunk of kCompactThreads * kCompactUnroll words spans at
// most that many slots plus two.
constexpr int kCompactStaged = kCompactThreads * kCompactUnroll + 2;

__device__ __forceinline__ int clamp_length(int64_t n, int L) {
  return n < 0 ? 0 : (n > L ? L : static_cast<int>(n));
}

// The slots of one compact_ row: slot t at byte t * stride_l, its source index staged per
// chunk in shared memory.
struct FlatSlots {
  int64_t stride_l;           // bytes between slots
  const int64_t* keep_index;  // row b of [B, L]
  int64_t ki_stride_l;
  int L;
  int* src_s;  // [kCompactStaged] shared

  __device__ __forceinline__ void stage(int i, int s) const {
    const int64_t v = keep_index[static_cast<int64_t>(s) * ki_stride_l];
    src_s[i] = v >= 0 && v < L ? static_cast<int>(v) : -1;
  }
  // Byte offsets of destination slot s (staged at i) and of its source; false when s stays.
  __device__ __forceinline__ bool locate(int i, int s, int64_t& src, int64_t& dst) const {
    const int v = src_s[i];
    if (v == s || v < 0) return false;
    src = v * stride_l;
    dst = s * stride_l;
    return true;
  }
};

// Moves the words of destination slots [first, n) of one row, kChunk words per chunk; word k
// of a slot sits at byte k * word_stride from the slot's offset. `Slots` (FlatSlots,
// PagedSlots) says where each slot is: stage(i, s) records destination slot s, i-th of its
// chunk, in shared memory, and locate(i, s, src, dst) reads that back. The data path does no
// division and no dependent global load: each thread walks its (slot, word) position by
// constant steps (one division per block), and each chunk's slots are first staged with one
// coalesced load per slot.
template <typename Word, typename Slots>
__device__ void compact_row(char* row,            // the row's base (offsets are from here)
                            int words,            // words per slot
                            int64_t word_stride,  // bytes between a slot's words
                            int first, int n, const Slots& slots) {
  constexpr int kStep = kCompactThreads, kChunk = kCompactThreads * kCompactUnroll;
  const int step_s = kStep / words, step_w = kStep % words;
  const int chunk_s = kChunk / words, chunk_w = kChunk % words;
  int s = first + static_cast<int>(threadIdx.x) / words;  // this thread's first element
  int w = static_cast<int>(threadIdx.x) % words;
  int cs = first, cw = 0;  // the chunk's first element
  while (cs < n) {         // uniform over the block
    // A chunk spans at most chunk_s + 2 slots from cs.
    const int count = min(chunk_s + 2, n - cs);
    for (int i = threadIdx.x; i < count; i += kStep) slots.stage(i, cs + i);
    __syncthreads();  // slots staged (and the previous chunk's stores issued)
    Word vals[kCompactUnroll];
    int64_t dst[kCompactUnroll];
    bool ok[kCompactUnroll];
#pragma unroll
    for (int u = 0; u < kCompactUnroll; ++u) {
      ok[u] = false;
      dst[u] = 0;
      int64_t src_at = 0, dst_at = 0;
      if (s < n && slots.locate(s - cs, s, src_at, dst_at)) {
        const int64_t offset = w * word_stride;
        vals[u] = *reinterpret_cast<const Word*>(row + src_at + offset);
        dst[u] = dst_at + offset;
        ok[u] = true;
      }
      s += step_s;
      w += step_w;
      if (w >= words) {
        w -= words;
        ++s;
      }
    }
    __syncthreads();  // every load of the chunk precedes every store of it
#pragma unroll
    for (int u = 0; u < kCompactUnroll; ++u) {
      if (ok[u]) *reinterpret_cast<Word*>(row + dst[u]) = vals[u];
    }
    cs += chunk_s;
    cw += chunk_w;
    if (cw >= words) {
      cw -= words;
      ++cs;
    }
  }
}

// compact_row with the copy word of width 1 << word_log2 bytes; word_stride 0 means words
// back to back.
template <typename Slots>
__device__ void compact_row_words(int word_log2, char* row, int words, int64_t word_stride,
                                  int first, int n, const Slots& slots) {
  const int64_t ws = word_stride != 0 ? word_stride : int64_t{1} << word_log2;
  switch (word_log2) {
    case 4:
      compact_row<uint4>(row, words, ws, first, n, slots);
      break;
    case 3:
      compact_row<uint2>(row, words, ws, first, n, slots);
      break;
    case 2:
      compact_row<uint32_t>(row, words, ws, first, n, slots);
      break;
    case 1:
      compact_row<uint16_t>(row, words, ws, first, n, slots);
      break;
    default:
      compact_row<uint8_t>(row, words, ws, first, n, slots);
      break;
  }
}

// The first destination slot of a keep_index row whose source differs from it (n when none).
// Every thread of the block must call it; `first_moved` is one shared int.
__device__ __forceinline__ int first_moved_slot(const int64_t* keep_index, int64_t ki_stride_l,
                                                int n, int& first_moved) {
  if (threadIdx.x == 0) first_moved = n;
  __syncthreads();
  for (int s0 = 0; s0 < n; s0 += kCompactThreads) {
    const int s = s0 + threadIdx.x;
    const bool moves = s < n && keep_index[static_cast<int64_t>(s) * ki_stride_l] != s;
    if (moves) atomicMin(&first_moved, s);
    if (__syncthreads_or(moves)) break;
  }
  return first_moved;
}

__global__ void __launch_bounds__(kCompactThreads)
    compact_kernel(const __grid_constant__ CompactTable tab) {
  __shared__ int first_moved;
  __shared__ int src_s[kCompactStaged];
  // The table entry owning this block: the last one whose first block is <= blockIdx.x.
  int lo = 0, hi = tab.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (tab.first_block[mid] <= static_cast<int>(blockIdx.x)) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const CompactTensor& x = tab.tensors[lo];
  const int row_id = static_cast<int>(blockIdx.x) - tab.first_block[lo];
  const int b = row_id / x.heads, h = row_id - b * x.heads;
  const int L = tab.L;
  const KeepPlan& plan = tab.plan;
  const int64_t* keep_index = plan.keep_index + b * plan.ki_stride_b;
  const int n = clamp_length(plan.new_length[b * plan.nl_stride], L);
  const int first = first_moved_slot(keep_index, plan.ki_stride_l, n, first_moved);

  char* row = x.data + b * x.stride_b + h * x.stride_h;
  const FlatSlots slots{x.stride_l, keep_index, plan.ki_stride_l, L, src_s};
  compact_row_words(x.word_log2, row, x.row_words, 0, first, n, slots);
}

// One block per sample. Same chunked load-barrier-store walk as the cache rows, one slot per
// thread; slots from new_length on become -1.
__global__ void __launch_bounds__(kCompactThreads)
    compact_token_type_kernel(int8_t* __restrict__ token_type,  // [B, L]
                              int64_t tt_stride_b, int64_t tt_stride_l,
                              const int64_t* __restrict__ keep_index,  // [B, L]
                              int64_t ki_stride_b, int64_t ki_stride_l,
                              const int64_t* __restrict__ new_length,  // [B]
                              int64_t nl_stride, int L) {
  const int64_t b = blockIdx.x;
  int8_t* row = token_type + b * tt_stride_b;
  const int64_t* idx = keep_index + b * ki_stride_b;
  const int n = clamp_length(new_length[b * nl_stride], L);
  for (int s0 = 0; s0 < L; s0 += kCompactThreads) {
    const int s = s0 + threadIdx.x;
    int8_t v = -1;
    bool write = false;
    if (s < n) {
      const int64_t src = idx[static_cast<int64_t>(s) * ki_stride_l];
      if (src >= 0 && src < L) {
        v = row[src * tt_stride_l];
        write = true;
      }
    } else if (s < L) {
      write = true;
    }
    __syncthreads();
    if (write) row[static_cast<int64_t>(s) * tt_stride_l] = v;
  }
}

}  // namespace detail

cudaError_t launch_compact(const CompactTable& table, cudaStream_t stream) {
  if (table.count <= 0) return cudaSuccess;
  if (table.count > kCompactMaxTensors) return cudaErrorInvalidValue;
  const int blocks = table.first_block[table.count];
  if (blocks <= 0) return cudaSuccess;
  detail::compact_kernel<<<blocks, detail::kCompactThreads, 0, stream>>>(table);
  return cudaGetLastError();
}

cudaError_t launch_compact_token_type(int8_t* token_type, int64_t tt_stride_b, int64_t tt_stride_l,
                                      const int64_t* keep_index, int64_t ki_stride_b,
                                      int64_t ki_stride_l, const int64_t* new_length,
                                      int64_t nl_stride, int B, int L, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  detail::compact_token_type_kernel<<<B, detail::kCompactThreads, 0, stream>>>(
      token_type, tt_stride_b, tt_stride_l, keep_index, ki_stride_b, ki_stride_l, new_length,
      nl_stride, L);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dyrate
