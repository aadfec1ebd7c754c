// Argument checks shared by every backend. Each check names the offending argument and runs
// before anything is written, so a failed call leaves its inputs untouched.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace dyrate {

struct StatsDims {
  int64_t B, Hq, Hkv, Q, L, D;
};

// Shapes, dtypes, devices and contiguity; never reads tensor data.
StatsDims check_attention_stats_args(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& token_type, int64_t num_types);
void check_stats_from_probs_args(const at::Tensor& probs, const at::Tensor& token_type,
                                 int64_t num_types);
void check_select_keep_args(const at::Tensor& token_score, const at::Tensor& token_type,
                            const at::Tensor& keep_count);
void check_compact_args(at::TensorList tensors, const at::Tensor& keep_index,
                        const at::Tensor& new_length);
void check_compact_token_type_args(const at::Tensor& token_type, const at::Tensor& keep_index,
                                   const at::Tensor& new_length);

// One tensor of compact_paged_: sizes and element strides by role, whatever its layout.
struct PagedCache {
  int64_t heads, head_dim;
  int64_t stride_blk, stride_slot, stride_h, stride_d;
};
struct PagedDims {
  int64_t num_blocks = 0, block_size = 0;  // shared by every tensor (0 without tensors)
  std::vector<PagedCache> caches;          // one per tensor, in order
};
PagedDims check_compact_paged_args(at::TensorList caches, c10::ArrayRef<std::string> layouts,
                                   const at::Tensor& block_table, const at::Tensor& keep_index,
                                   const at::Tensor& new_length);

// Value checks. They read the data, so backends on an accelerator skip them (a host sync per
// call); the kernels there are written to stay in bounds for any value instead.
void check_token_type_values(const at::Tensor& token_type, int64_t num_types);
void check_keep_count_values(const at::Tensor& keep_count);
void check_keep_index_values(const at::Tensor& keep_index, const at::Tensor& new_length);
// Row b uses logical blocks 0 .. keep_index[b, new_length[b] - 1] / block_size: their entries
// must lie in [0, num_blocks), and a block that compact_paged_ writes (one holding a slot that
// changes) may appear only once among the used entries of all rows. Blocks shared read-only
// (a common prefix that does not move) are fine. Call after check_keep_index_values.
void check_block_table_values(const at::Tensor& block_table, const at::Tensor& keep_index,
                              const at::Tensor& new_length, int64_t num_blocks, int64_t block_size);

}  // namespace dyrate
