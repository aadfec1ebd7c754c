// The moves of a compaction in logical slot space and the row loop, shared by the CPU kernels
// of compact_ and compact_paged_ (defined in compact.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <vector>

namespace dyrate {

// Slots [dst, dst + len) take old slots [src, src + len); dst < src.
struct SlotRun {
  int64_t dst, src, len;
};

// Per row b, the runs that turn it into its compacted form, in ascending order: slots before
// the first one that changes place are not touched; after it, consecutive sources form one run.
// keep_index and new_length must have passed check_keep_index_values.
std::vector<std::vector<SlotRun>> plan_slot_runs(const at::Tensor& keep_index,
                                                 const at::Tensor& new_length);

// fn(t, b, h) for every row (tensor t, sample b, head h < heads[t]) on at::parallel_for, one
// row per task; rows of different tasks must touch disjoint memory.
void parallel_rows(const std::vector<int64_t>& heads, int64_t B,
                   const std::function<void(size_t, int64_t, int64_t)>& fn);

}  // namespace dyrate
