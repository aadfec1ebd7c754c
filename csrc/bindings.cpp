// The one registration file: every dyrate schema, then one TORCH_LIBRARY_IMPL per backend.
#include <torch/library.h>

#include "dyrate.h"

// Schemas stay one per line so that each reads whole next to its comment.
// clang-format off
TORCH_LIBRARY(dyrate, m) {
  // Fused FastV token score + per-head per-type attention mass from queries and cached keys.
  m.def("attention_stats(Tensor q, Tensor k, Tensor token_type, float scale, int num_types=4, bool causal=True) -> (Tensor, Tensor)");
  // The same two statistics from attention probabilities the caller already has.
  m.def("attention_stats_from_probs(Tensor probs, Tensor token_type, int num_types=4) -> (Tensor, Tensor)");
  // Slots to keep per sample: all non-target slots plus the top keep_count target slots.
  m.def("select_keep(Tensor token_score, Tensor token_type, Tensor keep_count, int target_type=1) -> (Tensor, Tensor)");
  // In-place gather of the kept slots to the front of every [B, H, L, D] tensor of the list.
  m.def("compact_(Tensor(a!)[] tensors, Tensor keep_index, Tensor new_length) -> ()");
  // In-place gather of token_type with the same plan; -1 from new_length on.
  m.def("compact_token_type_(Tensor(a!) token_type, Tensor keep_index, Tensor new_length) -> ()");
  // compact_ inside a paged KV cache: slot t of request b is in block block_table[b, t // block_size].
  m.def("compact_paged_(Tensor(a!)[] caches, str[] layouts, Tensor block_table, Tensor keep_index, Tensor new_length) -> ()");
}
// clang-format on

TORCH_LIBRARY_IMPL(dyrate, CPU, m) {
  m.impl("attention_stats", &dyrate::attention_stats_cpu);
  m.impl("attention_stats_from_probs", &dyrate::attention_stats_from_probs_cpu);
  m.impl("select_keep", &dyrate::select_keep_cpu);
  m.impl("compact_", &dyrate::compact_cpu);
  m.impl("compact_token_type_", &dyrate::compact_token_type_cpu);
  m.impl("compact_paged_", &dyrate::compact_paged_cpu);
}

#ifdef DYRATE_WITH_CUDA
TORCH_LIBRARY_IMPL(dyrate, CUDA, m) {
  m.impl("attention_stats", &dyrate::attention_stats_cuda);
  m.impl("attention_stats_from_probs", &dyrate::attention_stats_from_probs_cuda);
  m.impl("select_keep", &dyrate::select_keep_cuda);
  m.impl("compact_", &dyrate::compact_cuda);
  m.impl("compact_token_type_", &dyrate::compact_token_type_cuda);
  m.impl("compact_paged_", &dyrate::compact_paged_cuda);
}
#endif
