// fill_randn_'s launch (launch.h): kVec consecutive normals per thread, one
// 16-byte store, where the output is 16-byte aligned.
#include "cuda_utils.cuh"
#include "launch.h"
#include "randn_kernels.cuh"

namespace ddpm_fast {
namespace cuda {

template <typename T>
void launch_fill_randn(T* out, int64_t numel, uint64_t seed, const RandnCounters& c, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (all_aligned<16>(out)) {
    fill_randn_kernel<T, kVec><<<grid_size((numel + kVec - 1) / kVec), kThreads, 0, stream>>>(out, numel, seed, c);
  } else {
    fill_randn_kernel<T, 1><<<grid_size(numel), kThreads, 0, stream>>>(out, numel, seed, c);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DDPM_INSTANTIATE(T) \
  template void launch_fill_randn<T>(T*, int64_t, uint64_t, const RandnCounters&, cudaStream_t);
DDPM_FOR_FLOAT_TYPES(DDPM_INSTANTIATE)
#undef DDPM_INSTANTIATE

}  // namespace cuda
}  // namespace ddpm_fast
