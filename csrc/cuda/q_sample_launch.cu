// q_sample's launch (launch.h): one read of x0 (and of the noise, if given),
// one write of x_t (and of the drawn noise); kVec elements per thread,
// 16-byte accesses where every pointer allows them.
#include "cuda_utils.cuh"
#include "launch.h"
#include "q_sample_kernels.cuh"

namespace ddpm_fast {
namespace cuda {
namespace {

template <typename T, bool kDraw>
void launch_q_sample_as(const T* x0, const T* noise, const int64_t* t, bool per_sample_t, const float* sqrt_ab,
                        const float* sqrt_1m_ab, int64_t table_size, const ElementLayout& l, uint64_t seed,
                        uint64_t offset, T* xt, T* eps, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector_ok = all_aligned<16>(x0, xt) && (noise == nullptr || all_aligned<16>(noise)) &&
                         (eps == nullptr || all_aligned<16>(eps));
  if (vector_ok) {
    q_sample_kernel<T, kVec, kDraw><<<grid_size((l.numel + kVec - 1) / kVec), kThreads, 0, stream>>>(
        x0, noise, t, per_sample_t, sqrt_ab, sqrt_1m_ab, table_size, xt, eps, l, seed, offset);
  } else {
    q_sample_kernel<T, 1, kDraw><<<grid_size(l.numel), kThreads, 0, stream>>>(
        x0, noise, t, per_sample_t, sqrt_ab, sqrt_1m_ab, table_size, xt, eps, l, seed, offset);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T>
void launch_q_sample(const T* x0, const T* noise, const int64_t* t, bool per_sample_t, const float* sqrt_ab,
                     const float* sqrt_1m_ab, int64_t table_size, const ElementLayout& l, uint64_t seed,
                     uint64_t offset, T* xt, T* eps, cudaStream_t stream) {
  (noise == nullptr ? launch_q_sample_as<T, true> : launch_q_sample_as<T, false>)(
      x0, noise, t, per_sample_t, sqrt_ab, sqrt_1m_ab, table_size, l, seed, offset, xt, eps, stream);
}

#define DDPM_INSTANTIATE(T)                                                                                  \
  template void launch_q_sample<T>(const T*, const T*, const int64_t*, bool, const float*, const float*, int64_t, \
                                   const ElementLayout&, uint64_t, uint64_t, T*, T*, cudaStream_t);
DDPM_FOR_FLOAT_TYPES(DDPM_INSTANTIATE)
#undef DDPM_INSTANTIATE

}  // namespace cuda
}  // namespace ddpm_fast
