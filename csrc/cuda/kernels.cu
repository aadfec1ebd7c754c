// The one nvcc translation unit: every dyrate CUDA kernel and the explicit instantiations of
// its launchers for the supported dtypes. It includes no torch header, so nvcc never parses
// ATen; the torch glue lives in ops_cuda.cpp (compiled by the host compiler).
#include "../kernels/attention_stats.cuh"
#include "../kernels/compact.cuh"
#include "../kernels/compact_paged.cuh"
#include "../kernels/select_keep.cuh"

namespace dyrate {
namespace kernels {

#define DYRATE_INSTANTIATE_QK(T)                                                                  \
  template cudaError_t launch_qk_partials<T>(const QKArgs<T>&, const StatsPlan&, float*, float*,  \
                                             float*, cudaStream_t);                               \
  template cudaError_t launch_qk_head_scores<T>(const QKArgs<T>&, const StatsPlan&, const float*, \
                                                const float*, float*, cudaStream_t);

DYRATE_INSTANTIATE_QK(float)
DYRATE_INSTANTIATE_QK(__half)
DYRATE_INSTANTIATE_QK(__nv_bfloat16)
#undef DYRATE_INSTANTIATE_QK

#define DYRATE_INSTANTIATE_PROBS(T)                                                                \
  template cudaError_t launch_probs_head_scores<T>(const T*, int64_t, int64_t, int64_t,            \
                                                   const int8_t*, int64_t, int64_t, int, int, int, \
                                                   int, int, float*, cudaStream_t);

DYRATE_INSTANTIATE_PROBS(float)
DYRATE_INSTANTIATE_PROBS(double)
DYRATE_INSTANTIATE_PROBS(__half)
DYRATE_INSTANTIATE_PROBS(__nv_bfloat16)
#undef DYRATE_INSTANTIATE_PROBS

}  // namespace kernels
}  // namespace dyrate
