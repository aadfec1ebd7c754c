// Argument checks shared by every backend (see checks.h).
#include "checks.h"

#include <c10/util/Exception.h>

namespace dyrate {
namespace {

bool is_cache_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* shape) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == rank, name, " must have shape ", shape, " (", rank, " dims), got shape ",
              t.sizes());
}

void check_last_dim_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must be contiguous in its last dimension, got strides ", t.strides());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              ": got ", t.device(), " and ", ref.device());
}

void check_token_type_tensor(const at::Tensor& token_type, int64_t B, int64_t L, const char* name) {
  check_rank(token_type, 2, name, "[B, L]");
  TORCH_CHECK(token_type.scalar_type() == at::kChar, name, " must be int8, got ",
              token_type.scalar_type());
  TORCH_CHECK(token_type.size(0) == B && token_type.size(1) == L, name,
              " must have shape [B, L] = [", B, ", ", L, "], got ", token_type.sizes());
}

void check_num_types(int64_t num_types) {
  TORCH_CHECK(num_types >= 1 && num_types <= 64, "num_types must be in [1, 64], got ", num_types);
}

void check_index_pair(const at::Tensor& keep_index, const at::Tensor& new_length) {
  check_rank(keep_index, 2, "keep_index", "[B, L]");
  TORCH_CHECK(keep_index.scalar_type() == at::kLong, "keep_index must be int64, got ",
              keep_index.scalar_type());
  check_rank(new_length, 1, "new_length", "[B]");
  TORCH_CHECK(new_length.scalar_type() == at::kLong, "new_length must be int64, got ",
              new_length.scalar_type());
  TORCH_CHECK(new_length.size(0) == keep_index.size(0), "new_length must have shape [B] = [",
              keep_index.size(0), "], got ", new_length.sizes());
  check_same_device(new_length, keep_index, "new_length", "keep_index");
}

}  // namespace

StatsDims check_attention_stats_args(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& token_type, int64_t num_types) {
  check_rank(q, 4, "q", "[B, H_q, Q, D]");
  check_rank(k, 4, "k", "[B, H_kv, L, D]");
  TORCH_CHECK(is_cache_dtype(q.scalar_type()), "q must be float32, float16 or bfloat16, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have the dtype of q (", q.scalar_type(),
              "), got ", k.scalar_type());
  check_same_device(k, q, "k", "q");
  check_same_device(token_type, q, "token_type", "q");
  StatsDims d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == d.B, "k must have batch size B = ", d.B, " like q, got ", k.size(0));
  TORCH_CHECK(k.size(3) == d.D, "k must have head dim D = ", d.D, " like q, got ", k.size(3));
  TORCH_CHECK(d.Hkv >= 1 && d.Hq % d.Hkv == 0, "q's head count H_q = ", d.Hq,
              " must be a multiple of k's head count H_kv = ", d.Hkv);
  TORCH_CHECK(d.Q <= d.L, "q has Q = ", d.Q, " query rows but k has only L = ", d.L,
              " slots; the queries are the last Q slots of the cache");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_token_type_tensor(token_type, d.B, d.L, "token_type");
  check_num_types(num_types);
  return d;
}

void check_stats_from_probs_args(const at::Tensor& probs, const at::Tensor& token_type,
                                 int64_t num_types) {
  check_rank(probs, 4, "probs", "[B, H, Q, L]");
  TORCH_CHECK(is_cache_dtype(probs.scalar_type()) || probs.scalar_type() == at::kDouble,
              "probs must be float32, float16, bfloat16 or float64, got ", probs.scalar_type());
  check_last_dim_contiguous(probs, "probs");
  check_same_device(token_type, probs, "token_type", "probs");
  check_token_type_tensor(token_type, probs.size(0), probs.size(3), "token_type");
  check_num_types(num_types);
}

void check_select_keep_args(const at::Tensor& token_score, const at::Tensor& token_type,
                            const at::Tensor& keep_count) {
  check_rank(token_score, 2, "token_score", "[B, L]");
  TORCH_CHECK(token_score.scalar_type() == at::kFloat, "token_score must be float32, got ",
              token_score.scalar_type());
  check_same_device(token_type, token_score, "token_type", "token_score");
  check_same_device(keep_count, token_score, "keep_count", "token_score");
  check_token_type_tensor(token_type, token_score.size(0), token_score.size(1), "token_type");
  check_rank(keep_count, 1, "keep_count", "[B]");
  TORCH_CHECK(keep_count.scalar_type() == at::kLong, "keep_count must be int64, got ",
              keep_count.scalar_type());
  TORCH_CHECK(keep_count.size(0) == token_score.size(0), "keep_count must have shape [B] = [",
              token_score.size(0), "], got ", keep_count.sizes());
}

void check_compact_args(at::TensorList tensors, const at::Tensor& keep_index,
                        const at::Tensor& new_length) {
  check_index_pair(keep_index, new_length);
  const int64_t B = keep_index.size(0), L = keep_index.size(1);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const std::string name = "tensors[" + std::to_string(i) + "]";
    check_rank(t, 4, name.c_str(), "[B, H, L, D]");
    TORCH_CHECK(t.size(0) == B && t.size(2) == L, name, " must have B = ", B, " and L = ", L,
                " like keep_index, got shape ", t.sizes());
    check_last_dim_contiguous(t, name.c_str());
    check_same_device(t, keep_index, name.c_str(), "keep_index");
    for (size_t j = 0; j < i; ++j) {
      TORCH_CHECK(!(t.numel() > 0 && t.data_ptr() == tensors[j].data_ptr()), name,
                  " is the same memory as tensors[", j, "]; each tensor may be listed once");
    }
  }
}

void check_compact_token_type_args(const at::Tensor& token_type, const at::Tensor& keep_index,
                                   const at::Tensor& new_length) {
  check_index_pair(keep_index, new_length);
  check_same_device(token_type, keep_index, "token_type", "keep_index");
  check_token_type_tensor(token_type, keep_index.size(0), keep_index.size(1), "token_type");
}

void check_token_type_values(const at::Tensor& token_type, int64_t num_types) {
  const int64_t B = token_type.size(0), L = token_type.size(1);
  const int8_t* p = token_type.const_data_ptr<int8_t>();
  const int64_t s0 = token_type.stride(0), s1 = token_type.stride(1);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < L; ++j) {
      const int v = p[b * s0 + j * s1];
      TORCH_CHECK(v >= -1 && v < num_types, "token_type[", b, ", ", j, "] = ", v,
                  " is outside [-1, num_types) = [-1, ", num_types, ")");
    }
  }
}

void check_keep_count_values(const at::Tensor& keep_count) {
  const int64_t* p = keep_count.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < keep_count.size(0); ++b) {
    const int64_t v = p[b * keep_count.stride(0)];
    TORCH_CHECK(v >= 0, "keep_count[", b, "] = ", v, " is negative");
  }
}

void check_keep_index_values(const at::Tensor& keep_index, const at::Tensor& new_length) {
  const int64_t B = keep_index.size(0), L = keep_index.size(1);
  const int64_t* idx = keep_index.const_data_ptr<int64_t>();
  const int64_t* len = new_length.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = len[b * new_length.stride(0)];
    TORCH_CHECK(n >= 0 && n <= L, "new_length[", b, "] = ", n, " is outside [0, L] = [0, ", L, "]");
    int64_t prev = -1;
    for (int64_t s = 0; s < n; ++s) {
      const int64_t v = idx[b * keep_index.stride(0) + s * keep_index.stride(1)];
      TORCH_CHECK(v > prev && v < L, "keep_index[", b, ", ", s, "] = ", v,
                  " breaks the contract: kept slots must be strictly ascending and < L = ", L);
      prev = v;
    }
  }
}

}  // namespace dyrate
