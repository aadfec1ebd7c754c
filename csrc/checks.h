// Argument checks shared by every backend. Each check names the offending argument and runs
// before anything is written, so a failed call leaves its inputs untouched.
#pragma once

#include <ATen/core/Tensor.h>

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

// Value checks. They read the data, so backends on an accelerator skip them (a host sync per
// call); the kernels there are written to stay in bounds for any value instead.
void check_token_type_values(const at::Tensor& token_type, int64_t num_types);
void check_keep_count_values(const at::Tensor& keep_count);
void check_keep_index_values(const at::Tensor& keep_index, const at::Tensor& new_length);

}  // namespace dyrate
