// CPU kernels of attention_stats and attention_stats_from_probs.
//
// Work is split over (sample, kv head) pairs for attention_stats and (sample, head) pairs for
// the probs variant; each task owns its rows of the per-head score scratch, and the head
// reduction into token_score runs afterwards in a fixed order, so results are bitwise
// reproducible whatever the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../dyrate.h"

namespace dyrate {
namespace {

// Floats summed per thread below which the sums stay on one thread: a fork-join of the
// thread pool costs about as much as summing 10^5 of them (2-core Xeon, measured).
constexpr int64_t kParallelWork = int64_t{1} << 18;

// Key rows ahead of the one in use whose cache lines are prefetched: the hardware prefetcher
// alone keeps too few misses in flight per core to stream the keys from DRAM.
constexpr int64_t kPrefetchRows = 8;

// Key rows whose dot products with one query row are computed together (decode, Q = G = 1).
constexpr int kDotRows = 4;

// Eight independent partial sums let the compiler vectorise without reassociating a chain.
template <typename T>
float dot_generic(const float* q, const T* k, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += q[d + u] * static_cast<float>(k[d + u]);
  }
  float tail = 0.f;
  for (; d < n; ++d) tail += q[d] * static_cast<float>(k[d]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

#if defined(__x86_64__) && defined(__GNUC__)
// AVX2/FMA/F16C versions chosen at run time, so the extension still loads on any x86-64 CPU.
#define DYRATE_AVX2 __attribute__((target("avx2,fma,f16c")))

DYRATE_AVX2 inline __m256 load8(const float* k) { return _mm256_loadu_ps(k); }
DYRATE_AVX2 inline __m256 load8(const c10::Half* k) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k)));
}
DYRATE_AVX2 inline __m256 load8(const c10::BFloat16* k) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// The sum of a0 + a1's lanes plus q[d:n] . k[d:n]: the end of every AVX2 dot, shared so that
// a row gives the same bits whichever kernel computed it.
template <typename T>
DYRATE_AVX2 inline float finish_dot(__m256 a0, __m256 a1, const float* q, const T* k, int64_t d,
                                    int64_t n) {
  const __m256 a = _mm256_add_ps(a0, a1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float sum = _mm_cvtss_f32(h);
  for (; d < n; ++d) sum += q[d] * static_cast<float>(k[d]);
  return sum;
}

template <typename T>
DYRATE_AVX2 float dot_avx2(const float* q, const T* k, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k + d + 8), a1);
  }
  for (; d + 8 <= n; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a0);
  return finish_dot(a0, a1, q, k, d, n);
}

// out[r] = q . k[r * stride :][:n] for kDotRows key rows at once, each with dot_avx2's
// arithmetic (the same bits): one load of q serves every row and the rows' FMA chains
// interleave, where one row at a time waits on its own chain.
template <typename T>
DYRATE_AVX2 void dots_avx2(const float* q, const T* k, int64_t stride, int64_t n, float* out) {
  __m256 a0[kDotRows], a1[kDotRows];
  for (int r = 0; r < kDotRows; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    const __m256 q0 = _mm256_loadu_ps(q + d), q1 = _mm256_loadu_ps(q + d + 8);
    for (int r = 0; r < kDotRows; ++r) {
      a0[r] = _mm256_fmadd_ps(q0, load8(k + r * stride + d), a0[r]);
      a1[r] = _mm256_fmadd_ps(q1, load8(k + r * stride + d + 8), a1[r]);
    }
  }
  for (; d + 8 <= n; d += 8) {
    const __m256 q0 = _mm256_loadu_ps(q + d);
    for (int r = 0; r < kDotRows; ++r)
      a0[r] = _mm256_fmadd_ps(q0, load8(k + r * stride + d), a0[r]);
  }
  for (int r = 0; r < kDotRows; ++r) out[r] = finish_dot(a0[r], a1[r], q, k + r * stride, d, n);
}

bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
#endif

template <typename T>
using DotFn = float (*)(const float*, const T*, int64_t);
template <typename T>
using DotsFn = void (*)(const float*, const T*, int64_t, int64_t, float*);

template <typename T>
void dots_generic(const float* q, const T* k, int64_t stride, int64_t n, float* out) {
  for (int r = 0; r < kDotRows; ++r) out[r] = dot_generic(q, k + r * stride, n);
}

template <typename T>
DotsFn<T> pick_dots() {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu_has_avx2()) return &dots_avx2<T>;
  }
#endif
  return &dots_generic<T>;
}

template <typename T>
DotFn<T> pick_dot() {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (!std::is_same_v<T, double>) {
    if (cpu_has_avx2()) return &dot_avx2<T>;
  }
#endif
  return &dot_generic<T>;
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

// row_mass[t] = the sum of p over the slots of type t, for t < num_types (types contiguous):
// one pass per type with eight partial sums (slot j feeds sum j % 8), added up in a fixed tree,
// so the AVX2 version below gives the same bits. Adding into row_mass[types[j]] slot by slot
// would chain every add through memory (a store-to-load round trip per slot).
void type_sums_generic(const float* p, const int8_t* types, int64_t L, int64_t num_types,
                       float* row_mass) {
  for (int64_t t = 0; t < num_types; ++t) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t j = 0;
    for (; j + 8 <= L; j += 8) {
      for (int u = 0; u < 8; ++u) acc[u] += types[j + u] == t ? p[j + u] : 0.f;
    }
    float tail = 0.f;
    for (; j < L; ++j) tail += types[j] == t ? p[j] : 0.f;
    row_mass[t] =
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
DYRATE_AVX2 void type_sums_avx2(const float* p, const int8_t* types, int64_t L, int64_t num_types,
                                float* row_mass) {
  for (int64_t t = 0; t < num_types; ++t) {
    const __m256i want = _mm256_set1_epi32(static_cast<int>(t));
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= L; j += 8) {
      const __m256i ty =
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(types + j)));
      const __m256 hit = _mm256_castsi256_ps(_mm256_cmpeq_epi32(ty, want));
      sum = _mm256_add_ps(sum, _mm256_and_ps(hit, _mm256_loadu_ps(p + j)));
    }
    alignas(32) float acc[8];
    _mm256_store_ps(acc, sum);
    float tail = 0.f;
    for (; j < L; ++j) tail += types[j] == t ? p[j] : 0.f;
    row_mass[t] =
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
  }
}
#endif

// prow[j] += p[j] for j < L and row_mass[t] = the sum of p over the slots of type t (p is 0 at
// slots of no valid type).
void add_row(const float* p, const int8_t* types, int64_t L, int64_t num_types, float* prow,
             float* row_mass) {
  for (int64_t j = 0; j < L; ++j) prow[j] += p[j];
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2()) {
    type_sums_avx2(p, types, L, num_types, row_mass);
    return;
  }
#endif
  type_sums_generic(p, types, L, num_types, row_mass);
}

// token_score[b, j] = sum_h partial[b, h, j] * inv, summed in head order.
void reduce_heads(const float* partial, float* token_score, int64_t B, int64_t H, int64_t L,
                  float inv) {
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, H * L));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* out = token_score + b * L;
      std::fill(out, out + L, 0.f);
      for (int64_t h = 0; h < H; ++h) {
        const float* row = partial + (b * H + h) * L;
        for (int64_t j = 0; j < L; ++j) out[j] += row[j];
      }
      for (int64_t j = 0; j < L; ++j) out[j] *= inv;
    }
  });
}

template <typename T>
void attention_stats_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& token_type,
                          const StatsDims& d, float scale, int64_t num_types, bool causal,
                          float* type_mass,  // [B, H_q, T]
                          float* partial) {  // [B, H_q, L] per-head sum over query rows
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const int8_t* tp = token_type.const_data_ptr<int8_t>();
  const int64_t G = d.Hq / d.Hkv, R = G * d.Q, L = d.L, D = d.D, Q = d.Q;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const DotFn<T> dot_k = pick_dot<T>();
  const DotsFn<T> dots_k = pick_dots<T>();
  const DotFn<float> dot_f = pick_dot<float>();

  at::parallel_for(0, d.B * d.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), kf(D), logits(R * L);
    std::vector<double> mass(num_types);
    std::vector<float> row_mass(num_types);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.Hkv, hkv = task % d.Hkv;
      const int8_t* types = tp + b * token_type.stride(0);
      // Row r = g * Q + i holds query head hkv * G + g, query row i.
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t i = 0; i < Q; ++i) {
          const T* src = qp + b * q.stride(0) + (hkv * G + g) * q.stride(1) + i * q.stride(2);
          load_row(src, qf.data() + (g * Q + i) * D, D);
        }
      }
      const T* kbase = kp + b * k.stride(0) + hkv * k.stride(1);
      const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
      // Prefetches key rows [j0, min(j1, L)).
      auto prefetch = [&](int64_t j0, int64_t j1) {
        for (int64_t p = j0; p < j1 && p < L; ++p) {
          const char* row = reinterpret_cast<const char*>(kbase + p * k.stride(2));
          for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off);
        }
      };
      int64_t j = 0;
      if (R == 1) {  // kDotRows slots at a time; Q = 1, so causality allows every slot
        for (; j + kDotRows <= L; j += kDotRows) {
          prefetch(j + kPrefetchRows, j + kPrefetchRows + kDotRows);
          float dot[kDotRows];
          dots_k(qf.data(), kbase + j * k.stride(2), k.stride(2), D, dot);
          for (int u = 0; u < kDotRows; ++u) {
            logits[j + u] = types[j + u] >= 0 ? scale * dot[u] : neg_inf;
          }
        }
      }
      for (; j < L; ++j) {
        const bool valid = types[j] >= 0;
        const T* krow = kbase + j * k.stride(2);
        prefetch(j + kPrefetchRows, j + kPrefetchRows + 1);
        // A key row read by one query row is used in place; one shared by several is widened
        // to float once.
        if (valid && R > 1) load_row(krow, kf.data(), D);
        for (int64_t r = 0; r < R; ++r) {
          const int64_t i = r % Q;
          const bool allowed = valid && (!causal || j <= L - Q + i);
          float logit = neg_inf;
          if (allowed)
            logit = scale * (R > 1 ? dot_f(qf.data() + r * D, kf.data(), D)
                                   : dot_k(qf.data() + r * D, krow, D));
          logits[r * L + j] = logit;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hkv * G + g;
        float* prow = partial + (b * d.Hq + h) * L;
        std::fill(prow, prow + L, 0.f);
        std::fill(mass.begin(), mass.end(), 0.0);
        for (int64_t i = 0; i < Q; ++i) {
          float* lrow = logits.data() + (g * Q + i) * L;
          float mx = neg_inf;
          for (int64_t j = 0; j < L; ++j) mx = std::max(mx, lrow[j]);
          if (mx == neg_inf) continue;  // no allowed slot: the row contributes zeros
          float sum = 0.f;
          for (int64_t j = 0; j < L; ++j) {
            const float e = lrow[j] == neg_inf ? 0.f : std::exp(lrow[j] - mx);
            lrow[j] = e;
            sum += e;
          }
          const float inv = 1.f / sum;
          for (int64_t j = 0; j < L; ++j) lrow[j] *= inv;
          add_row(lrow, types, L, num_types, prow, row_mass.data());
          for (int64_t t = 0; t < num_types; ++t) mass[t] += row_mass[t];
        }
        for (int64_t t = 0; t < num_types; ++t) {
          type_mass[(b * d.Hq + h) * num_types + t] = static_cast<float>(mass[t] / Q);
        }
      }
    }
  });
}

template <typename T>
void stats_from_probs_impl(const at::Tensor& probs, const at::Tensor& token_type, int64_t num_types,
                           float* type_mass,  // [B, H, T]
                           float* partial) {  // [B, H, L]
  const int64_t B = probs.size(0), H = probs.size(1), Q = probs.size(2), L = probs.size(3);
  const T* pp = probs.const_data_ptr<T>();
  const int8_t* tp = token_type.const_data_ptr<int8_t>();
  const int64_t grain = std::max<int64_t>(1, kParallelWork / std::max<int64_t>(1, Q * L));
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> mass(num_types);
    std::vector<float> row_mass(num_types), pf(L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const int8_t* types = tp + b * token_type.stride(0);
      float* prow = partial + task * L;
      std::fill(prow, prow + L, 0.f);
      std::fill(mass.begin(), mass.end(), 0.0);
      for (int64_t i = 0; i < Q; ++i) {
        const T* src = pp + b * probs.stride(0) + h * probs.stride(1) + i * probs.stride(2);
        for (int64_t j = 0; j < L; ++j) pf[j] = types[j] < 0 ? 0.f : static_cast<float>(src[j]);
        add_row(pf.data(), types, L, num_types, prow, row_mass.data());
        for (int64_t t = 0; t < num_types; ++t) mass[t] += row_mass[t];
      }
      for (int64_t t = 0; t < num_types; ++t) {
        type_mass[task * num_types + t] = Q > 0 ? static_cast<float>(mass[t] / Q) : 0.f;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_stats_cpu(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& token_type, double scale,
                                                       int64_t num_types, bool causal) {
  const StatsDims d = check_attention_stats_args(q, k, token_type, num_types);
  check_token_type_values(token_type, num_types);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor type_mass = at::zeros({d.B, d.Hq, num_types}, f32);
  at::Tensor token_score = at::empty({d.B, d.L}, f32);
  at::Tensor partial = at::empty({d.B, d.Hq, d.L}, f32);  // each task zeroes its rows
  if (d.B == 0 || d.Hq == 0 || d.Q == 0 || d.L == 0) {
    token_score.zero_();
    return {type_mass, token_score};
  }
  const at::Tensor types = token_type.contiguous();  // the per-type sums read it as a row
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, q.scalar_type(), "attention_stats", [&] {
        attention_stats_impl<scalar_t>(q, k, types, d, static_cast<float>(scale), num_types, causal,
                                       type_mass.data_ptr<float>(), partial.data_ptr<float>());
      });
  reduce_heads(partial.const_data_ptr<float>(), token_score.data_ptr<float>(), d.B, d.Hq, d.L,
               1.f / static_cast<float>(d.Hq * d.Q));
  return {type_mass, token_score};
}

std::tuple<at::Tensor, at::Tensor> attention_stats_from_probs_cpu(const at::Tensor& probs,
                                                                  const at::Tensor& token_type,
                                                                  int64_t num_types) {
  check_stats_from_probs_args(probs, token_type, num_types);
  check_token_type_values(token_type, num_types);
  const int64_t B = probs.size(0), H = probs.size(1), Q = probs.size(2), L = probs.size(3);
  const auto f32 = probs.options().dtype(at::kFloat);
  at::Tensor type_mass = at::zeros({B, H, num_types}, f32);
  at::Tensor token_score = at::zeros({B, L}, f32);
  if (B == 0 || H == 0 || Q == 0 || L == 0) return {type_mass, token_score};
  at::Tensor partial = at::empty({B, H, L}, f32);  // each task zeroes its rows
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, probs.scalar_type(), "attention_stats_from_probs", [&] {
        stats_from_probs_impl<scalar_t>(probs, token_type.contiguous(), num_types,
                                        type_mass.data_ptr<float>(), partial.data_ptr<float>());
      });
  reduce_heads(partial.const_data_ptr<float>(), token_score.data_ptr<float>(), B, H, L,
               1.f / static_cast<float>(H * Q));
  return {type_mass, token_score};
}

}  // namespace dyrate
