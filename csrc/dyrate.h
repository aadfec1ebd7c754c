// Backend entry points of the dyrate ops. bindings.cpp registers them; checks.h validates
// their arguments. Shapes are documented once here.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <vector>

namespace dyrate {

// q:          [B, H_q, Q, D]  float32 | float16 | bfloat16, last dim contiguous
// k:          [B, H_kv, L, D] same dtype as q, H_q % H_kv == 0
// token_type: int8 [B, L], values in [-1, num_types)
// returns (type_mass float32 [B, H_q, num_types], token_score float32 [B, L])
std::tuple<at::Tensor, at::Tensor> attention_stats_cpu(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& token_type, double scale,
                                                       int64_t num_types, bool causal);

// probs: [B, H, Q, L] floating, last dim contiguous
// returns (type_mass float32 [B, H, num_types], token_score float32 [B, L])
std::tuple<at::Tensor, at::Tensor> attention_stats_from_probs_cpu(const at::Tensor& probs,
                                                                  const at::Tensor& token_type,
                                                                  int64_t num_types);

// token_score: float32 [B, L]; keep_count: int64 [B], >= 0
// returns (keep_index int64 [B, L] ascending then -1, new_length int64 [B])
std::tuple<at::Tensor, at::Tensor> select_keep_cpu(const at::Tensor& token_score,
                                                   const at::Tensor& token_type,
                                                   const at::Tensor& keep_count,
                                                   int64_t target_type);

// tensors: each [B, H_i, L, D_i], last dim contiguous; keep_index int64 [B, L]; new_length int64
// [B]
void compact_cpu(at::TensorList tensors, const at::Tensor& keep_index,
                 const at::Tensor& new_length);

// token_type: int8 [B, L], compacted in place, -1 from new_length[b] on
void compact_token_type_cpu(const at::Tensor& token_type, const at::Tensor& keep_index,
                            const at::Tensor& new_length);

// caches: paged block storage, block index first, then slots N, heads H, channels D in the
// order layouts[i] names them ("NHD", "HND", "HDN", ...), the same num_blocks and block_size
// for all, last dim contiguous; block_table int32 | int64 [B, max_blocks]; keep_index int64
// [B, L] and new_length int64 [B] as for compact_cpu
void compact_paged_cpu(at::TensorList caches, c10::ArrayRef<std::string> layouts,
                       const at::Tensor& block_table, const at::Tensor& keep_index,
                       const at::Tensor& new_length);

#ifdef DYRATE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> attention_stats_cuda(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& token_type, double scale,
                                                        int64_t num_types, bool causal);
std::tuple<at::Tensor, at::Tensor> attention_stats_from_probs_cuda(const at::Tensor& probs,
                                                                   const at::Tensor& token_type,
                                                                   int64_t num_types);
std::tuple<at::Tensor, at::Tensor> select_keep_cuda(const at::Tensor& token_score,
                                                    const at::Tensor& token_type,
                                                    const at::Tensor& keep_count,
                                                    int64_t target_type);
void compact_cuda(at::TensorList tensors, const at::Tensor& keep_index,
                  const at::Tensor& new_length);
void compact_token_type_cuda(const at::Tensor& token_type, const at::Tensor& keep_index,
                             const at::Tensor& new_length);
void compact_paged_cuda(at::TensorList caches, c10::ArrayRef<std::string> layouts,
                        const at::Tensor& block_table, const at::Tensor& keep_index,
                        const at::Tensor& new_length);
#endif

}  // namespace dyrate
