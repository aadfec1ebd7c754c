// CUDA kernel of compact_paged_ (torch-free): compact_ inside a paged KV cache, in place.
//
// Logical slot t of request b lives in slot t % block_size of physical block
// block_table[b, t / block_size]. One block owns one (tensor, b, h): the head-h bytes of
// request b's slots, which no other block reads or writes (other heads are other bytes, and
// a physical block that is written belongs to one request only: the CPU backend checks it,
// here it is the caller's contract). Within the row the walk is compact_'s (compact_row in
// compact.cuh): destination slots in ascending chunks, load the chunk, barrier, store. In
// logical order a destination never exceeds its source and the block table maps the row's
// logical slots one to one onto physical ones, so the argument that makes compact_ race-free
// holds slot for slot. Each chunk stages the byte offsets of its slots' sources and
// destinations in shared memory (two divisions by block_size per slot, none per word).
#pragma once

#include "compact.cuh"
#include "dyrate_kernels.h"

namespace dyrate {
namespace kernels {
namespace detail {

// The slots of one paged (tensor, b, h) row, staged per chunk as byte offsets from the head's
// base: -1 as the source offset marks a destination that stays (its source is itself, or an
// index or block is out of range). Everything else is read from the kernel parameters (the
// table) when a chunk is staged, which keeps the copy loop's registers free.
struct PagedSlots {
  const PagedTable& tab;  // the __grid_constant__ table
  const PagedGroup& x;
  int b;
  int64_t* src_off;  // [kCompactStaged] shared
  int64_t* dst_off;  // [kCompactStaged] shared

  // Byte offset of logical slot t (0 <= t < L) of request b, or -1 when its block is out of
  // range.
  __device__ __forceinline__ int64_t physical(int t) const {
    const int logical = t / tab.block_size;
    const int64_t at = b * tab.bt_stride_b + logical * tab.bt_stride_t;
    const int64_t p = tab.bt_int64 ? static_cast<const int64_t*>(tab.block_table)[at]
                                   : static_cast<const int32_t*>(tab.block_table)[at];
    if (p < 0 || p >= tab.num_blocks) return -1;
    return p * x.stride_blk + static_cast<int64_t>(t - logical * tab.block_size) * x.stride_slot;
  }
  __device__ __forceinline__ void stage(int i, int s) const {
    const KeepPlan& plan = tab.plan;
    const int64_t v = plan.keep_index[b * plan.ki_stride_b + s * plan.ki_stride_l];
    int64_t src = -1, dst = -1;
    if (v >= 0 && v < tab.L && v != s) {
      dst = physical(s);
      if (dst >= 0) src = physical(static_cast<int>(v));
    }
    src_off[i] = src;
    dst_off[i] = dst;
  }
  __device__ __forceinline__ bool locate(int i, int, int64_t& src, int64_t& dst) const {
    src = src_off[i];
    dst = dst_off[i];
    return src >= 0;
  }
};

__global__ void __launch_bounds__(kCompactThreads)
    compact_paged_kernel(const __grid_constant__ PagedTable tab) {
  __shared__ int first_moved;
  __shared__ int64_t src_off[kCompactStaged];
  __shared__ int64_t dst_off[kCompactStaged];
  // The group owning this block: the last one whose first block is <= blockIdx.x.
  int g = 0;
  while (g + 1 < tab.group_count && tab.first_block[g + 1] <= static_cast<int>(blockIdx.x)) ++g;
  const PagedGroup& x = tab.groups[g];
  const int rows = tab.B * x.heads;  // blocks per tensor
  const int local = static_cast<int>(blockIdx.x) - tab.first_block[g];
  const int tensor = tab.first_tensor[g] + local / rows;
  const int row_id = local - (local / rows) * rows;
  const int b = row_id / x.heads, h = row_id - b * x.heads;
  const KeepPlan& plan = tab.plan;
  const int n = clamp_length(plan.new_length[b * plan.nl_stride], tab.L);
  const int first =
      first_moved_slot(plan.keep_index + b * plan.ki_stride_b, plan.ki_stride_l, n, first_moved);
  const PagedSlots slots{tab, x, b, src_off, dst_off};
  char* row = tab.data[tensor] + h * x.stride_h;
  compact_row_words(x.word_log2, row, x.row_words, x.word_stride, first, n, slots);
}

}  // namespace detail

cudaError_t launch_compact_paged(const PagedTable& table, cudaStream_t stream) {
  if (table.group_count <= 0) return cudaSuccess;
  if (table.group_count > kPagedMaxGroups) return cudaErrorInvalidValue;
  const int blocks = table.first_block[table.group_count];
  if (blocks <= 0) return cudaSuccess;
  detail::compact_paged_kernel<<<blocks, detail::kCompactThreads, 0, stream>>>(table);
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace dyrate
