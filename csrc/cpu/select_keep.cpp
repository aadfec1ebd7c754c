// CPU kernel of select_keep: per sample, a partial selection of the target-type slots by
// (score descending, slot ascending), then an ascending scan that writes the kept slots.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../dyrate.h"

namespace dyrate {

std::tuple<at::Tensor, at::Tensor> select_keep_cpu(const at::Tensor& token_score,
                                                   const at::Tensor& token_type,
                                                   const at::Tensor& keep_count,
                                                   int64_t target_type) {
  check_select_keep_args(token_score, token_type, keep_count);
  check_keep_count_values(keep_count);
  const int64_t B = token_score.size(0), L = token_score.size(1);
  const auto i64 = token_score.options().dtype(at::kLong);
  at::Tensor keep_index = at::empty({B, L}, i64);
  at::Tensor new_length = at::empty({B}, i64);
  const float* sp = token_score.const_data_ptr<float>();
  const int8_t* tp = token_type.const_data_ptr<int8_t>();
  const int64_t* kp = keep_count.const_data_ptr<int64_t>();
  int64_t* out = keep_index.data_ptr<int64_t>();
  int64_t* len = new_length.data_ptr<int64_t>();

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> cand;
    std::vector<char> keep(L);
    for (int64_t b = b0; b < b1; ++b) {
      const float* score = sp + b * token_score.stride(0);
      const int8_t* types = tp + b * token_type.stride(0);
      const int64_t ss = token_score.stride(1), ts = token_type.stride(1);
      cand.clear();
      for (int64_t j = 0; j < L; ++j) {
        const int t = types[j * ts];
        keep[j] = t >= 0 && t != target_type;
        if (t == target_type) cand.push_back(j);
      }
      const int64_t n = static_cast<int64_t>(cand.size());
      const int64_t want = std::min<int64_t>(kp[b * keep_count.stride(0)], n);
      // NaN ranks below every number so that the order stays a strict weak ordering.
      auto key = [&](int64_t j) {
        const float v = score[j * ss];
        return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
      };
      auto better = [&](int64_t a, int64_t c) {
        const float ka = key(a), kc = key(c);
        return ka > kc || (ka == kc && a < c);
      };
      if (want > 0 && want < n) {
        std::nth_element(cand.begin(), cand.begin() + (want - 1), cand.end(), better);
      }
      for (int64_t r = 0; r < want; ++r) keep[cand[r]] = 1;
      int64_t* row = out + b * L;
      int64_t m = 0;
      for (int64_t j = 0; j < L; ++j) {
        if (keep[j]) row[m++] = j;
      }
      std::fill(row + m, row + L, int64_t{-1});
      len[b] = m;
    }
  });
  return {keep_index, new_length};
}

}  // namespace dyrate
