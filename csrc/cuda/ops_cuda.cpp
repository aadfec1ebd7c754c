// Torch glue of the dyrate CUDA kernels: argument checks (the shared ones in checks.h), device
// guard, current stream, output and scratch allocation, dtype dispatch, and launch-error checks.
// Compiled by the host compiler; the kernels sit behind the torch-free launchers of
// kernels/dyrate_kernels.h, built in kernels.cu. Only c10/cuda headers are used (the stream is
// c10::cuda::getCurrentCUDAStream, which at::cuda re-exports): ATen/cuda/CUDAContext.h pulls
// in cuBLAS and cuSPARSE headers that a minimal toolkit does not ship.
//
// Nothing here reads device data or synchronises with the host: value checks of token_type,
// keep_count, keep_index and block_table are skipped on CUDA (the kernels stay in bounds for
// any value), so every op can be captured in a CUDA graph. Scratch comes from the caching
// allocator on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../dyrate.h"
#include "../kernels/dyrate_kernels.h"

namespace dyrate {
namespace {

namespace K = kernels;

// The kernels index slots, rows and blocks with 32-bit ints; half the range leaves room for
// the rounding up of tiles.
constexpr int64_t kMaxIndex = INT_MAX / 2;

void check_index_range(int64_t value, const char* what) {
  TORCH_CHECK(value <= kMaxIndex, what, " = ", value,
              " is too large for the CUDA kernels (at most ", kMaxIndex, ")");
}

template <typename T>
struct DeviceScalar {
  using type = T;
};
template <>
struct DeviceScalar<at::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
const typename DeviceScalar<scalar_t>::type* device_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename DeviceScalar<scalar_t>::type*>(
      t.const_data_ptr<scalar_t>());
}

// Whether 16-byte loads can start at every row of t: aligned base and, for every dimension that
// is ever stepped over, a stride that keeps the alignment.
bool rows_aligned16(const at::Tensor& t) {
  uint64_t bits = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1) bits |= static_cast<uint64_t>(t.stride(d) * t.element_size());
  }
  return (bits & 15u) == 0;
}

// Multiprocessor count of the current device, queried once per device. A plain attribute
// query: no stream work, so it is legal while a CUDA graph is being captured.
int sm_count() {
  static std::atomic<int> cache[256];
  const int device = c10::cuda::current_device();
  std::atomic<int>& slot = cache[device & 255];
  int n = slot.load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    slot.store(n, std::memory_order_relaxed);
  }
  return n;
}

// Resident pass-1 blocks per SM of attention_stats (the occupancy API) for the current device,
// element size, head dim and alignment, asked once per combination: it depends on nothing
// else, and a decode step should not pay a driver query per call.
int stats_blocks_per_sm(int esize, int D, bool aligned) {
  static std::mutex mutex;
  static auto* cache = new std::map<std::tuple<int, int, int, bool>, int>();
  const auto key =
      std::make_tuple(static_cast<int>(c10::cuda::current_device()), esize, D, aligned);
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache->find(key);
  if (it == cache->end()) it = cache->emplace(key, K::stats_blocks_per_sm(esize, D, aligned)).first;
  return it->second;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> zero_stats(const at::Tensor& like, int64_t B, int64_t H,
                                              int64_t L, int64_t num_types) {
  const auto f32 = like.options().dtype(at::kFloat);
  return {at::zeros({B, H, num_types}, f32), at::zeros({B, L}, f32)};
}

void finalize_stats(const at::Tensor& head_score, const at::Tensor& token_type, int64_t B,
                    int64_t H, int64_t Q, int64_t L, int64_t num_types, at::Tensor& type_mass,
                    at::Tensor& token_score, cudaStream_t stream) {
  C10_CUDA_CHECK(K::launch_finalize_stats(
      head_score.const_data_ptr<float>(), token_type.const_data_ptr<int8_t>(), token_type.stride(0),
      token_type.stride(1), static_cast<int>(B), static_cast<int>(H), static_cast<int>(L),
      static_cast<int>(num_types), 1.f / static_cast<float>(Q), 1.f / static_cast<float>(H * Q),
      type_mass.data_ptr<float>(), token_score.data_ptr<float>(), stream));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_stats_cuda(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& token_type, double scale,
                                                        int64_t num_types, bool causal) {
  const StatsDims d = check_attention_stats_args(q, k, token_type, num_types);
  const c10::cuda::CUDAGuard guard(q.device());
  if (d.B == 0 || d.Hq == 0 || d.Q == 0 || d.L == 0) {
    return zero_stats(q, d.B, d.Hq, d.L, num_types);
  }
  check_index_range(d.L, "k's length L");
  check_index_range(d.B * d.Hq * d.Q, "q's B * H_q * Q");
  TORCH_CHECK(d.D <= K::kStatsMaxTileFloats, "q's head dim D = ", d.D,
              " exceeds the CUDA kernels' limit of ", K::kStatsMaxTileFloats);

  const int esize = static_cast<int>(k.element_size());
  const bool aligned = rows_aligned16(k);
  const K::StatsPlan plan = K::plan_attention_stats(
      static_cast<int>(d.B), static_cast<int>(d.Hq), static_cast<int>(d.Hkv), static_cast<int>(d.Q),
      static_cast<int>(d.L), static_cast<int>(d.D), esize, aligned, sm_count(),
      stats_blocks_per_sm(esize, static_cast<int>(d.D), aligned));

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor part_max = at::empty({d.B, d.Hq, d.Q, plan.chunks}, f32);
  at::Tensor part_sum = at::empty({d.B, d.Hq, d.Q, plan.chunks}, f32);
  at::Tensor logits;      // Q <= kStatsMaxStoredRows: kept between the passes
  at::Tensor head_score;  // else: pass 2 adds into it
  if (plan.store_logits) {
    logits = at::empty({d.B, d.Hq, d.Q, d.L}, f32);
  } else {
    head_score = at::zeros({d.B, d.Hq, d.L}, f32);
  }
  at::Tensor type_mass = at::empty({d.B, d.Hq, num_types}, f32);
  at::Tensor token_score = at::empty({d.B, d.L}, f32);
  const cudaStream_t stream = current_stream();

  auto launch = [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = typename DeviceScalar<scalar_t>::type;
    K::QKArgs<T> a{};
    a.q = device_ptr<scalar_t>(q);
    a.q_stride_b = q.stride(0);
    a.q_stride_h = q.stride(1);
    a.q_stride_q = q.stride(2);
    a.k = device_ptr<scalar_t>(k);
    a.k_stride_b = k.stride(0);
    a.k_stride_h = k.stride(1);
    a.k_stride_l = k.stride(2);
    a.token_type = token_type.const_data_ptr<int8_t>();
    a.tt_stride_b = token_type.stride(0);
    a.tt_stride_l = token_type.stride(1);
    a.B = static_cast<int>(d.B);
    a.Hq = static_cast<int>(d.Hq);
    a.Hkv = static_cast<int>(d.Hkv);
    a.Q = static_cast<int>(d.Q);
    a.L = static_cast<int>(d.L);
    a.D = static_cast<int>(d.D);
    a.num_types = static_cast<int>(num_types);
    a.scale = static_cast<float>(scale);
    a.causal = causal;
    C10_CUDA_CHECK(
        K::launch_qk_partials<T>(a, plan, part_max.data_ptr<float>(), part_sum.data_ptr<float>(),
                                 plan.store_logits ? logits.data_ptr<float>() : nullptr, stream));
    if (plan.store_logits) {
      C10_CUDA_CHECK(K::launch_logits_stats(
          logits.const_data_ptr<float>(), part_max.const_data_ptr<float>(),
          part_sum.const_data_ptr<float>(), a.token_type, a.tt_stride_b, a.tt_stride_l, a.B, a.Hq,
          a.Q, a.L, plan.chunks, a.num_types, type_mass.data_ptr<float>(),
          token_score.data_ptr<float>(), stream));
    } else {
      C10_CUDA_CHECK(K::launch_qk_head_scores<T>(a, plan, part_max.const_data_ptr<float>(),
                                                 part_sum.const_data_ptr<float>(),
                                                 head_score.data_ptr<float>(), stream));
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat:
      launch(float{});
      break;
    case at::kHalf:
      launch(at::Half{});
      break;
    case at::kBFloat16:
      launch(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "attention_stats: unsupported dtype ", q.scalar_type());
  }
  if (!plan.store_logits) {
    finalize_stats(head_score, token_type, d.B, d.Hq, d.Q, d.L, num_types, type_mass, token_score,
                   stream);
  }
  return {type_mass, token_score};
}

std::tuple<at::Tensor, at::Tensor> attention_stats_from_probs_cuda(const at::Tensor& probs,
                                                                   const at::Tensor& token_type,
                                                                   int64_t num_types) {
  check_stats_from_probs_args(probs, token_type, num_types);
  const c10::cuda::CUDAGuard guard(probs.device());
  const int64_t B = probs.size(0), H = probs.size(1), Q = probs.size(2), L = probs.size(3);
  if (B == 0 || H == 0 || Q == 0 || L == 0) return zero_stats(probs, B, H, L, num_types);
  check_index_range(L, "probs' length L");
  check_index_range(B * H, "probs' B * H");
  const auto f32 = probs.options().dtype(at::kFloat);
  at::Tensor head_score = at::empty({B, H, L}, f32);
  at::Tensor type_mass = at::empty({B, H, num_types}, f32);
  at::Tensor token_score = at::empty({B, L}, f32);
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, probs.scalar_type(), "attention_stats_from_probs_cuda", [&] {
        C10_CUDA_CHECK(K::launch_probs_head_scores(
            device_ptr<scalar_t>(probs), probs.stride(0), probs.stride(1), probs.stride(2),
            token_type.const_data_ptr<int8_t>(), token_type.stride(0), token_type.stride(1),
            static_cast<int>(B), static_cast<int>(H), static_cast<int>(Q), static_cast<int>(L),
            static_cast<int>(num_types), head_score.data_ptr<float>(), stream));
      });
  finalize_stats(head_score, token_type, B, H, Q, L, num_types, type_mass, token_score, stream);
  return {type_mass, token_score};
}

std::tuple<at::Tensor, at::Tensor> select_keep_cuda(const at::Tensor& token_score,
                                                    const at::Tensor& token_type,
                                                    const at::Tensor& keep_count,
                                                    int64_t target_type) {
  check_select_keep_args(token_score, token_type, keep_count);
  const c10::cuda::CUDAGuard guard(token_score.device());
  const int64_t B = token_score.size(0), L = token_score.size(1);
  check_index_range(L, "token_score's length L");
  check_index_range(B, "token_score's batch size B");
  const auto i64 = token_score.options().dtype(at::kLong);
  at::Tensor keep_index = at::empty({B, L}, i64);
  at::Tensor new_length = at::empty({B}, i64);
  K::SelectArgs a{};
  a.token_score = token_score.const_data_ptr<float>();
  a.ts_stride_b = token_score.stride(0);
  a.ts_stride_l = token_score.stride(1);
  a.token_type = token_type.const_data_ptr<int8_t>();
  a.tt_stride_b = token_type.stride(0);
  a.tt_stride_l = token_type.stride(1);
  a.keep_count = keep_count.const_data_ptr<int64_t>();
  a.kc_stride = keep_count.stride(0);
  a.target_type = target_type;
  a.B = static_cast<int>(B);
  a.L = static_cast<int>(L);
  a.keep_index = keep_index.data_ptr<int64_t>();
  a.new_length = new_length.data_ptr<int64_t>();
  C10_CUDA_CHECK(K::launch_select_keep(a, current_stream()));
  return {keep_index, new_length};
}

namespace {

K::KeepPlan keep_plan(const at::Tensor& keep_index, const at::Tensor& new_length) {
  return {keep_index.const_data_ptr<int64_t>(), keep_index.stride(0), keep_index.stride(1),
          new_length.const_data_ptr<int64_t>(), new_length.stride(0)};
}

// log2 of the widest copy word (<= 16 bytes) that divides every byte count or address in bits.
int32_t word_log2_of(uint64_t bits) {
  int32_t lg = 4;
  while (lg > 0 && (bits & ((uint64_t{1} << lg) - 1)) != 0) --lg;
  return lg;
}

// log2 of the widest copy word that divides the tensor's address, its row size and every
// stride the kernel steps over.
int32_t copy_word_log2(const at::Tensor& t) {
  const int64_t esize = t.element_size();
  uint64_t bits =
      reinterpret_cast<uintptr_t>(t.data_ptr()) | static_cast<uint64_t>(t.size(3) * esize);
  for (int64_t d = 0; d < 3; ++d) {
    if (t.size(d) > 1) bits |= static_cast<uint64_t>(t.stride(d) * esize);
  }
  return word_log2_of(bits);
}

}  // namespace

void compact_cuda(at::TensorList tensors, const at::Tensor& keep_index,
                  const at::Tensor& new_length) {
  check_compact_args(tensors, keep_index, new_length);
  if (tensors.empty()) return;
  const c10::cuda::CUDAGuard guard(keep_index.device());
  const int64_t B = keep_index.size(0), L = keep_index.size(1);
  check_index_range(L, "keep_index's length L");
  const cudaStream_t stream = current_stream();

  K::CompactTable table{};
  auto reset = [&] {
    table.count = 0;
    table.first_block[0] = 0;
    table.L = static_cast<int32_t>(L);
    table.plan = keep_plan(keep_index, new_length);
  };
  reset();
  // Validate every tensor before the first launch, so that an error leaves all of them as they
  // were; then launch one kernel per full table.
  std::vector<K::CompactTensor> entries;
  std::vector<int64_t> rows;
  entries.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const std::string name = "tensors[" + std::to_string(i) + "]";
    const int64_t esize = t.element_size(), H = t.size(1);
    const int32_t lg = copy_word_log2(t);
    const int64_t row_words = (t.size(3) * esize) >> lg;
    TORCH_CHECK(L * row_words <= kMaxIndex && B * H <= kMaxIndex, name, " of shape ", t.sizes(),
                " is too large for the CUDA compact kernel");
    K::CompactTensor e{};
    e.data = static_cast<char*>(t.data_ptr());
    e.stride_b = t.stride(0) * esize;
    e.stride_h = t.stride(1) * esize;
    e.stride_l = t.stride(2) * esize;
    e.heads = static_cast<int32_t>(H);
    e.row_words = static_cast<int32_t>(row_words);
    e.word_log2 = lg;
    entries.push_back(e);
    rows.push_back(B * H);
  }
  for (size_t i = 0; i < entries.size(); ++i) {
    if (table.count == K::kCompactMaxTensors ||
        table.first_block[table.count] + rows[i] > kMaxIndex) {
      C10_CUDA_CHECK(K::launch_compact(table, stream));
      reset();
    }
    table.tensors[table.count] = entries[i];
    table.first_block[table.count + 1] =
        static_cast<int32_t>(table.first_block[table.count] + rows[i]);
    ++table.count;
  }
  C10_CUDA_CHECK(K::launch_compact(table, stream));
}

namespace {

// The group entry of one paged cache tensor. A (slot, head) row whose channels are contiguous
// (NHD, HND) moves in the widest word its address, row size and strides allow; otherwise (HDN)
// each channel is a word of one element, word_stride apart.
K::PagedGroup paged_group(const at::Tensor& t, const PagedCache& c, int64_t block_size, int64_t B,
                          int64_t L, const std::string& name) {
  const int64_t es = t.element_size();
  const bool row_contiguous = c.stride_d == 1 || c.head_dim == 1;
  uint64_t bits = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.size(0) > 1) bits |= static_cast<uint64_t>(c.stride_blk * es);
  if (block_size > 1) bits |= static_cast<uint64_t>(c.stride_slot * es);
  if (c.heads > 1) bits |= static_cast<uint64_t>(c.stride_h * es);
  bits |= static_cast<uint64_t>(row_contiguous ? c.head_dim * es : es | (c.stride_d * es));
  const int32_t lg = word_log2_of(bits);
  TORCH_CHECK(row_contiguous || (int64_t{1} << lg) == es, name,
              " is not aligned to its element size (", es, " bytes)");
  K::PagedGroup g{};
  g.stride_blk = c.stride_blk * es;
  g.stride_slot = c.stride_slot * es;
  g.stride_h = c.stride_h * es;
  g.word_stride = row_contiguous ? int64_t{1} << lg : c.stride_d * es;
  const int64_t words = row_contiguous ? (c.head_dim * es) >> lg : c.head_dim;
  TORCH_CHECK(L * words <= kMaxIndex && B * c.heads <= kMaxIndex, name, " of shape ", t.sizes(),
              " is too large for the CUDA compact_paged_ kernel");
  g.heads = static_cast<int32_t>(c.heads);
  g.row_words = static_cast<int32_t>(words);
  g.word_log2 = lg;
  return g;
}

bool same_group(const K::PagedGroup& a, const K::PagedGroup& b) {
  return a.stride_blk == b.stride_blk && a.stride_slot == b.stride_slot &&
         a.stride_h == b.stride_h && a.word_stride == b.word_stride && a.heads == b.heads &&
         a.row_words == b.row_words && a.word_log2 == b.word_log2;
}

// Fills PagedTables group by group and launches each one when it is full, then the last.
class PagedLaunches {
 public:
  PagedLaunches(const K::PagedTable& header, cudaStream_t stream)
      : header_(header), table_(header), stream_(stream) {}

  // Starts a group of tensors that share `group`.
  void open(const K::PagedGroup& group) {
    if (table_.group_count == K::kPagedMaxGroups) flush();
    const int g = table_.group_count++;
    table_.groups[g] = group;
    table_.first_tensor[g + 1] = table_.first_tensor[g];
    table_.first_block[g + 1] = table_.first_block[g];
  }
  // Adds a tensor of the open group.
  void add(char* data) {
    int g = table_.group_count - 1;
    const int rows = table_.B * table_.groups[g].heads;
    if (table_.first_tensor[g + 1] == K::kPagedMaxTensors ||
        table_.first_block[g + 1] + static_cast<int64_t>(rows) > kMaxIndex) {
      const K::PagedGroup group = table_.groups[g];
      flush();
      open(group);
      g = 0;
    }
    table_.data[table_.first_tensor[g + 1]++] = data;
    table_.first_block[g + 1] += rows;
  }
  void flush() {
    C10_CUDA_CHECK(K::launch_compact_paged(table_, stream_));
    table_ = header_;
  }

 private:
  K::PagedTable header_, table_;  // header_: no groups, no tensors
  cudaStream_t stream_;
};

}  // namespace

void compact_paged_cuda(at::TensorList caches, c10::ArrayRef<std::string> layouts,
                        const at::Tensor& block_table, const at::Tensor& keep_index,
                        const at::Tensor& new_length) {
  const PagedDims d =
      check_compact_paged_args(caches, layouts, block_table, keep_index, new_length);
  if (caches.empty()) return;
  const c10::cuda::CUDAGuard guard(keep_index.device());
  const int64_t B = keep_index.size(0), L = keep_index.size(1);
  check_index_range(L, "keep_index's length L");
  check_index_range(B, "keep_index's batch size B");
  check_index_range(d.num_blocks, "caches' num_blocks");
  // Validate every tensor before the first launch, so that an error leaves all of them as they
  // were; group them by geometry, each group's tensors in their order.
  std::vector<K::PagedGroup> groups;
  std::vector<std::vector<char*>> members;
  for (size_t i = 0; i < caches.size(); ++i) {
    if (caches[i].numel() == 0) continue;
    const std::string name = "caches[" + std::to_string(i) + "]";
    const K::PagedGroup g = paged_group(caches[i], d.caches[i], d.block_size, B, L, name);
    size_t k = 0;
    while (k < groups.size() && !same_group(groups[k], g)) ++k;
    if (k == groups.size()) {
      groups.push_back(g);
      members.emplace_back();
    }
    members[k].push_back(static_cast<char*>(caches[i].data_ptr()));
  }
  K::PagedTable header{};
  header.B = static_cast<int32_t>(B);
  header.L = static_cast<int32_t>(L);
  header.block_size = static_cast<int32_t>(d.block_size);
  header.num_blocks = static_cast<int32_t>(d.num_blocks);
  header.bt_int64 = block_table.scalar_type() == at::kLong;
  header.block_table = block_table.const_data_ptr();
  header.bt_stride_b = block_table.stride(0);
  header.bt_stride_t = block_table.stride(1);
  header.plan = keep_plan(keep_index, new_length);
  PagedLaunches launches(header, current_stream());
  for (size_t k = 0; k < groups.size(); ++k) {
    launches.open(groups[k]);
    for (char* data : members[k]) launches.add(data);
  }
  launches.flush();
}

void compact_token_type_cuda(const at::Tensor& token_type, const at::Tensor& keep_index,
                             const at::Tensor& new_length) {
  check_compact_token_type_args(token_type, keep_index, new_length);
  const c10::cuda::CUDAGuard guard(token_type.device());
  const int64_t B = token_type.size(0), L = token_type.size(1);
  check_index_range(L, "token_type's length L");
  check_index_range(B, "token_type's batch size B");
  C10_CUDA_CHECK(K::launch_compact_token_type(
      token_type.data_ptr<int8_t>(), token_type.stride(0), token_type.stride(1),
      keep_index.const_data_ptr<int64_t>(), keep_index.stride(0), keep_index.stride(1),
      new_length.const_data_ptr<int64_t>(), new_length.stride(0), static_cast<int>(B),
      static_cast<int>(L), current_stream()));
}

}  // namespace dyrate
