// Argument checks shared by every backend (see checks.h).
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

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

// ---------------------------------------------------------------------------------------------
// Memory overlap. compact_ writes every tensor in place while other blocks (CUDA) or threads
// (CPU) read the index tensors and write the other tensors, so no written byte may be reachable
// through a second tensor of the call, or twice through one tensor.
// ---------------------------------------------------------------------------------------------

// Bytes [lo, hi) spanned by a non-empty tensor.
struct ByteSpan {
  int64_t lo, hi;
};

ByteSpan byte_span(const at::Tensor& t) {
  const auto base = reinterpret_cast<intptr_t>(t.const_data_ptr());
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const int64_t es = t.element_size();
  return {static_cast<int64_t>(base) + lo * es, static_cast<int64_t>(base) + (hi + 1) * es};
}

// One dim a tensor steps over: its stride in bytes, its size, and the range of index
// differences searched along it.
struct Dim {
  int64_t stride, size, lo, hi;
};

// Bytes read at each index: the whole last dim when it is contiguous, else one element.
int64_t run_bytes(const at::Tensor& t) {
  return (t.stride(-1) == 1 ? t.size(-1) : 1) * t.element_size();
}

void sort_by_stride(std::vector<Dim>& dims) {
  std::sort(dims.begin(), dims.end(),
            [](const Dim& x, const Dim& y) { return std::abs(x.stride) > std::abs(y.stride); });
}

// The stepped dims of t, largest stride first (the contiguous last dim is part of the run).
std::vector<Dim> stepped_dims(const at::Tensor& t) {
  std::vector<Dim> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const bool in_run = d + 1 == t.dim() && t.stride(d) == 1;
    if (t.size(d) > 1 && !in_run) dims.push_back({t.stride(d) * t.element_size(), t.size(d), 0, 0});
  }
  sort_by_stride(dims);
  return dims;
}

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a / b - ((a % b != 0) && (a < 0));
}

// Whether sum_k e_k * dims[k].stride lies in the open interval (lo, hi) for some integers e_k
// in [dims[k].lo, dims[k].hi]. Exact; `budget` bounds the work, and running out of it answers
// "yes", so a layout that cannot be proven safe is refused.
bool lattice_hits(const std::vector<Dim>& dims, size_t k, int64_t lo, int64_t hi, int& budget) {
  if (--budget < 0) return true;
  if (k == dims.size()) return lo < 0 && 0 < hi;
  int64_t inner_min = 0, inner_max = 0;  // reach of the dims after k
  for (size_t j = k + 1; j < dims.size(); ++j) {
    const int64_t x = dims[j].lo * dims[j].stride, y = dims[j].hi * dims[j].stride;
    inner_min += std::min(x, y);
    inner_max += std::max(x, y);
  }
  const int64_t s = dims[k].stride;
  int64_t first = dims[k].lo, last = dims[k].hi;
  if (s == 0) {
    last = std::min(first, last);  // every e gives the same sum
  } else {
    // Keep e with e * s + inner_max > lo and e * s + inner_min < hi.
    const int64_t m = std::abs(s), sign = s > 0 ? 1 : -1;
    const int64_t x = sign * (lo - inner_max), y = sign * (hi - inner_min);
    first = std::max(first, floor_div(std::min(x, y), m));
    last = std::min(last, floor_div(std::max(x, y), m) + 1);
  }
  for (int64_t e = first; e <= last; ++e) {
    if (lattice_hits(dims, k + 1, lo - e * s, hi - e * s, budget)) return true;
  }
  return false;
}

// Whether a tensor reaches some byte twice: expanded (stride 0) dims, or strides that fold onto
// each other.
bool may_self_overlap(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  if (at::has_internal_overlap(t) == at::MemOverlap::Yes) return true;
  if (t.is_non_overlapping_and_dense()) return false;
  std::vector<Dim> dims = stepped_dims(t);
  const int64_t run = run_bytes(t);
  // Two index vectors differ by e != 0 with |e_k| < n_k; their runs meet when
  // |sum e_k s_k| < run. Searching the e whose first non-zero entry is positive covers all.
  for (size_t lead = 0; lead < dims.size(); ++lead) {
    for (size_t j = 0; j < dims.size(); ++j) {
      dims[j].lo = j < lead ? 0 : (j == lead ? 1 : 1 - dims[j].size);
      dims[j].hi = j < lead ? 0 : dims[j].size - 1;
    }
    int budget = 4096;
    if (lattice_hits(dims, 0, -run, run, budget)) return true;
  }
  return false;
}

// Whether two tensors may share a byte. Exact for two views that step with the same strides (a
// fused K/V buffer, slices of one cache); otherwise intersecting byte spans count as overlap.
bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const ByteSpan sa = byte_span(a), sb = byte_span(b);
  if (sa.hi <= sb.lo || sb.hi <= sa.lo) return false;
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  if (status == at::MemOverlapStatus::No) return false;
  if (status != at::MemOverlapStatus::TooHard || a.dim() != b.dim()) return true;
  if (a.element_size() != b.element_size() || a.stride(-1) != b.stride(-1)) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if ((a.size(d) > 1 || b.size(d) > 1) && a.stride(d) != b.stride(d)) return true;
  }
  // Same strides: a run of a at A + pa and one of b at B + pb meet when pb - pa lies in
  // (A - B - run_b, A - B + run_a), where pb - pa = sum_k (ib_k - ia_k) s_k.
  std::vector<Dim> dims;
  for (int64_t d = 0; d < a.dim(); ++d) {
    const bool in_run = d + 1 == a.dim() && a.stride(d) == 1;
    if ((a.size(d) > 1 || b.size(d) > 1) && !in_run) {
      dims.push_back({a.stride(d) * a.element_size(), 0, 1 - a.size(d), b.size(d) - 1});
    }
  }
  sort_by_stride(dims);
  const int64_t delta = static_cast<int64_t>(reinterpret_cast<intptr_t>(a.const_data_ptr())) -
                        static_cast<int64_t>(reinterpret_cast<intptr_t>(b.const_data_ptr()));
  int budget = 4096;
  return lattice_hits(dims, 0, delta - run_bytes(b), delta + run_bytes(a), budget);
}

void check_no_self_overlap(const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(!may_self_overlap(t), name, " has internal memory overlap (e.g. an expanded, ",
              "stride-0 dimension; strides ", t.strides(), "): compacting it in place would race; ",
              "pass a tensor whose elements are distinct memory (e.g. .contiguous())");
}

void check_disjoint(const at::Tensor& a, const std::string& a_name, const at::Tensor& b,
                    const std::string& b_name) {
  TORCH_CHECK(!may_overlap(a, b), a_name, " and ", b_name,
              " overlap in memory (views of one buffer sharing elements); compaction writes in "
              "place, so the result would depend on the order of the writes; pass disjoint "
              "tensors");
}

// Entry i of a list an op writes in place: no memory of it reachable twice, through an earlier
// entry, or through a tensor the op reads.
void check_writable_entry(at::TensorList tensors, size_t i, const char* list,
                          std::initializer_list<std::pair<const at::Tensor*, const char*>> reads) {
  const at::Tensor& t = tensors[i];
  const std::string name = std::string(list) + "[" + std::to_string(i) + "]";
  check_no_self_overlap(t, name);
  for (size_t j = 0; j < i; ++j) {
    const std::string other = std::string(list) + "[" + std::to_string(j) + "]";
    TORCH_CHECK(!(t.numel() > 0 && t.data_ptr() == tensors[j].data_ptr()), name,
                " is the same memory as ", other, "; each tensor may be listed once");
    check_disjoint(t, name, tensors[j], other);
  }
  for (const auto& read : reads) check_disjoint(t, name, *read.first, read.second);
}

// Where a paged layout puts the block's slots (N), heads (H) and channels (D): dims 1..3 of
// the cache in the order the layout names them.
struct LayoutDims {
  int slot, head, chan;
};

bool parse_layout(const std::string& layout, LayoutDims& dims) {
  if (layout.size() != 3) return false;
  int at[3] = {0, 0, 0};
  for (int i = 0; i < 3; ++i) {
    const size_t role = std::string("NHD").find(layout[i]);
    if (role == std::string::npos || at[role] != 0) return false;
    at[role] = i + 1;
  }
  dims = {at[0], at[1], at[2]};
  return true;
}

// "[num_blocks, block_size, H, D]" in the order of `layout` (a valid one).
std::string layout_shape(const std::string& layout) {
  std::string shape = "[num_blocks";
  for (const char c : layout) shape += c == 'N' ? ", block_size" : (c == 'H' ? ", H" : ", D");
  return shape + "]";
}

void check_block_table(const at::Tensor& block_table, const at::Tensor& keep_index) {
  check_rank(block_table, 2, "block_table", "[B, max_blocks]");
  TORCH_CHECK(block_table.scalar_type() == at::kInt || block_table.scalar_type() == at::kLong,
              "block_table must be int32 or int64, got ", block_table.scalar_type());
  TORCH_CHECK(block_table.size(0) == keep_index.size(0),
              "block_table must have B = ", keep_index.size(0), " rows like keep_index, got shape ",
              block_table.sizes());
  check_same_device(block_table, keep_index, "block_table", "keep_index");
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
    check_writable_entry(tensors, i, "tensors",
                         {{&keep_index, "keep_index"}, {&new_length, "new_length"}});
  }
}

PagedDims check_compact_paged_args(at::TensorList caches, c10::ArrayRef<std::string> layouts,
                                   const at::Tensor& block_table, const at::Tensor& keep_index,
                                   const at::Tensor& new_length) {
  check_index_pair(keep_index, new_length);
  check_block_table(block_table, keep_index);
  TORCH_CHECK(layouts.size() == caches.size(), "layouts must name one layout per tensor of ",
              "caches: got ", layouts.size(), " layouts for ", caches.size(), " tensors");
  PagedDims d;
  for (size_t i = 0; i < caches.size(); ++i) {
    const at::Tensor& t = caches[i];
    const std::string name = "caches[" + std::to_string(i) + "]";
    LayoutDims ld{};
    TORCH_CHECK(parse_layout(layouts[i], ld), "layouts[", i, "] = \"", layouts[i],
                "\" is not a paged layout: expected \"NHD\", \"HND\" or \"HDN\" (after the ",
                "block index: the block's slots N, heads H and channels D, in any order)");
    check_rank(t, 4, name.c_str(), layout_shape(layouts[i]).c_str());
    const int64_t num_blocks = t.size(0), block_size = t.size(ld.slot);
    if (i == 0) {
      TORCH_CHECK(block_size >= 1, name, " has block_size 0 (shape ", t.sizes(), ")");
      d.num_blocks = num_blocks;
      d.block_size = block_size;
    }
    TORCH_CHECK(num_blocks == d.num_blocks && block_size == d.block_size, name,
                " has num_blocks = ", num_blocks, " and block_size = ", block_size,
                " but caches[0] has ", d.num_blocks, " and ", d.block_size,
                "; the tensors share block_table, so all must have the same two");
    check_last_dim_contiguous(t, name.c_str());
    check_same_device(t, keep_index, name.c_str(), "keep_index");
    check_writable_entry(
        caches, i, "caches",
        {{&keep_index, "keep_index"}, {&new_length, "new_length"}, {&block_table, "block_table"}});
    d.caches.push_back({t.size(ld.head), t.size(ld.chan), t.stride(0), t.stride(ld.slot),
                        t.stride(ld.head), t.stride(ld.chan)});
  }
  const int64_t L = keep_index.size(1);
  if (!caches.empty()) {
    const int64_t need = (L + d.block_size - 1) / d.block_size;
    TORCH_CHECK(block_table.size(1) >= need, "block_table must have at least ceil(L / ",
                "block_size) = ", need, " columns for L = ", L, " and block_size = ", d.block_size,
                ", got shape ", block_table.sizes());
  }
  return d;
}

void check_compact_token_type_args(const at::Tensor& token_type, const at::Tensor& keep_index,
                                   const at::Tensor& new_length) {
  check_index_pair(keep_index, new_length);
  check_same_device(token_type, keep_index, "token_type", "keep_index");
  check_token_type_tensor(token_type, keep_index.size(0), keep_index.size(1), "token_type");
  check_no_self_overlap(token_type, "token_type");
  check_disjoint(token_type, "token_type", keep_index, "keep_index");
  check_disjoint(token_type, "token_type", new_length, "new_length");
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

namespace {

// One used entry of a block table: physical block, row, logical block, and whether the op
// writes the block.
struct BlockUse {
  int64_t block, b, t;
  bool written;
};

std::vector<BlockUse> block_uses(const at::Tensor& block_table, const at::Tensor& keep_index,
                                 const at::Tensor& new_length, int64_t block_size) {
  const int64_t* idx = keep_index.const_data_ptr<int64_t>();
  const int64_t* len = new_length.const_data_ptr<int64_t>();
  const bool wide = block_table.scalar_type() == at::kLong;
  const int64_t sb = block_table.stride(0), st = block_table.stride(1);
  std::vector<BlockUse> uses;
  for (int64_t b = 0; b < keep_index.size(0); ++b) {
    const int64_t n = len[b * new_length.stride(0)];
    if (n == 0) continue;
    const int64_t* row = idx + b * keep_index.stride(0);
    const int64_t used = row[(n - 1) * keep_index.stride(1)] / block_size + 1;
    std::vector<char> written(used, 0);
    for (int64_t s = 0; s < n; ++s) {
      if (row[s * keep_index.stride(1)] != s) written[s / block_size] = 1;
    }
    for (int64_t t = 0; t < used; ++t) {
      const int64_t at = b * sb + t * st;
      const int64_t p =
          wide ? block_table.const_data_ptr<int64_t>()[at] : block_table.const_data_ptr<int>()[at];
      uses.push_back({p, b, t, written[t] != 0});
    }
  }
  return uses;
}

}  // namespace

void check_block_table_values(const at::Tensor& block_table, const at::Tensor& keep_index,
                              const at::Tensor& new_length, int64_t num_blocks,
                              int64_t block_size) {
  std::vector<BlockUse> uses = block_uses(block_table, keep_index, new_length, block_size);
  for (const BlockUse& u : uses) {
    TORCH_CHECK(u.block >= 0 && u.block < num_blocks, "block_table[", u.b, ", ", u.t,
                "] = ", u.block, " is outside [0, num_blocks) = [0, ", num_blocks,
                "); a row uses every logical block up to the one of its last kept slot");
  }
  std::stable_sort(uses.begin(), uses.end(),
                   [](const BlockUse& x, const BlockUse& y) { return x.block < y.block; });
  for (size_t i = 0; i < uses.size();) {
    size_t j = i + 1, writer = uses[i].written ? i : uses.size();
    for (; j < uses.size() && uses[j].block == uses[i].block; ++j) {
      if (uses[j].written && writer == uses.size()) writer = j;
    }
    if (j - i > 1 && writer != uses.size()) {
      const BlockUse& w = uses[writer];
      const BlockUse& o = uses[writer == i ? i + 1 : i];
      TORCH_CHECK(false, "block_table[", w.b, ", ", w.t, "] and block_table[", o.b, ", ", o.t,
                  "] both name physical block ", w.block, ", which compact_paged_ rewrites in ",
                  "place: a block that changes must belong to one request and one logical ",
                  "block (blocks shared read-only, such as a prefix that does not move, are fine)");
    }
    i = j;
  }
}

}  // namespace dyrate
