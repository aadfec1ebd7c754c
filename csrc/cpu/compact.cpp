// CPU kernels of compact_ and compact_token_type_.
//
// keep_index is strictly ascending, so destination slot s never exceeds its source slot and a
// forward walk over s never reads a slot it already overwrote. Slots before the first one that
// changes place are not touched; after it, consecutive sources form runs that move with one
// memmove each (memmove, since a run's source and destination ranges may overlap).
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../checks.h"
#include "../dyrate.h"
#include "slot_runs.h"

namespace dyrate {
namespace {

// Runs ahead of the one being moved whose source lines are prefetched: runs are short (a few
// slots), so the hardware prefetcher alone leaves the copy latency bound.
constexpr size_t kPrefetchRuns = 4;

}  // namespace

std::vector<std::vector<SlotRun>> plan_slot_runs(const at::Tensor& keep_index,
                                                 const at::Tensor& new_length) {
  const int64_t B = keep_index.size(0);
  const int64_t* idx = keep_index.const_data_ptr<int64_t>();
  const int64_t* len = new_length.const_data_ptr<int64_t>();
  std::vector<std::vector<SlotRun>> runs(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = len[b * new_length.stride(0)];
    const int64_t* row = idx + b * keep_index.stride(0);
    const int64_t st = keep_index.stride(1);
    int64_t s = 0;
    while (s < n && row[s * st] == s) ++s;
    while (s < n) {
      SlotRun r{s, row[s * st], 1};
      while (s + r.len < n && row[(s + r.len) * st] == r.src + r.len) ++r.len;
      runs[b].push_back(r);
      s += r.len;
    }
  }
  return runs;
}

void parallel_rows(const std::vector<int64_t>& heads, int64_t B,
                   const std::function<void(size_t, int64_t, int64_t)>& fn) {
  // One task per row; prefix sums map a flat task id to its tensor.
  std::vector<int64_t> first_task(heads.size() + 1, 0);
  for (size_t t = 0; t < heads.size(); ++t) first_task[t + 1] = first_task[t] + B * heads[t];
  at::parallel_for(0, first_task.back(), 1, [&](int64_t begin, int64_t end) {
    size_t t = 0;
    for (int64_t task = begin; task < end; ++task) {
      while (first_task[t + 1] <= task) ++t;
      const int64_t local = task - first_task[t];
      fn(t, local / heads[t], local % heads[t]);
    }
  });
}

void compact_cpu(at::TensorList tensors, const at::Tensor& keep_index,
                 const at::Tensor& new_length) {
  check_compact_args(tensors, keep_index, new_length);
  check_keep_index_values(keep_index, new_length);
  if (tensors.empty()) return;
  const auto runs = plan_slot_runs(keep_index, new_length);
  const int64_t B = keep_index.size(0);

  std::vector<int64_t> heads(tensors.size());
  for (size_t t = 0; t < tensors.size(); ++t) heads[t] = tensors[t].size(1);
  parallel_rows(heads, B, [&](size_t t, int64_t b, int64_t h) {
    const at::Tensor& x = tensors[t];
    const int64_t esize = x.element_size(), D = x.size(3);
    const int64_t slot_stride = x.stride(2) * esize, slot_bytes = D * esize;
    char* base = static_cast<char*>(x.data_ptr()) + (b * x.stride(0) + h * x.stride(1)) * esize;
    const bool packed = x.stride(2) == D;  // slots are back to back: a run is one block
    const std::vector<SlotRun>& rb = runs[b];
    for (size_t i = 0; i < rb.size(); ++i) {
      if (i + kPrefetchRuns < rb.size()) {
        const SlotRun& ahead = rb[i + kPrefetchRuns];
        const char* src = base + ahead.src * slot_stride;
        const int64_t bytes = packed ? ahead.len * slot_bytes : slot_bytes;
        for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(src + off);
      }
      const SlotRun& r = rb[i];
      if (packed) {
        std::memmove(base + r.dst * slot_stride, base + r.src * slot_stride, r.len * slot_bytes);
      } else {
        for (int64_t u = 0; u < r.len; ++u) {
          std::memmove(base + (r.dst + u) * slot_stride, base + (r.src + u) * slot_stride,
                       slot_bytes);
        }
      }
    }
  });
}

void compact_token_type_cpu(const at::Tensor& token_type, const at::Tensor& keep_index,
                            const at::Tensor& new_length) {
  check_compact_token_type_args(token_type, keep_index, new_length);
  check_keep_index_values(keep_index, new_length);
  const int64_t B = token_type.size(0), L = token_type.size(1);
  int8_t* tp = token_type.data_ptr<int8_t>();
  const int64_t* idx = keep_index.const_data_ptr<int64_t>();
  const int64_t* len = new_length.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int8_t* row = tp + b * token_type.stride(0);
    const int64_t ts = token_type.stride(1);
    const int64_t n = len[b * new_length.stride(0)];
    for (int64_t s = 0; s < n; ++s)
      row[s * ts] = row[idx[b * keep_index.stride(0) + s * keep_index.stride(1)] * ts];
    for (int64_t s = n; s < L; ++s) row[s * ts] = -1;
  }
}

}  // namespace dyrate
