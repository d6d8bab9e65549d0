// The reverse step's launch (launch.h): one read of x_t and eps (and of given
// noise), one write of x_{t-1} (and of the next model input); kStepVec
// elements per thread, vectorized where every pointer is aligned for it.
#include "cuda_utils.cuh"
#include "ddpm_step_kernels.cuh"
#include "launch.h"

namespace ddpm_fast {
namespace cuda {

template <typename X, typename E>
void launch_ddpm_step(const X* x, const E* eps, const int64_t* t, bool per_sample_t, const float* table,
                      int64_t num_steps, const X* noise, uint64_t seed, uint64_t offset, uint64_t sample_stride,
                      uint64_t step_stride, bool clip_denoised, const StepLayout& s, X* out, void* model_input,
                      InputType model_input_type, cudaStream_t stream) {
  const bool vectorized = all_aligned<sizeof(X) * kStepVec>(x, out) && all_aligned<sizeof(E) * kStepVec>(eps) &&
                          (noise == nullptr || all_aligned<sizeof(X) * kStepVec>(noise));
  const int64_t blocks = grid_size((s.numel + kStepVec - 1) / kStepVec);
  auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(x, eps, t, per_sample_t, table, num_steps, noise, seed, offset,
                                            sample_stride, step_stride, clip_denoised, s, out, model_input,
                                            model_input_type);
  };
  if (vectorized) {
    launch(ddpm_step_kernel<X, E, true, c10::Half, c10::BFloat16>);
  } else {
    launch(ddpm_step_kernel<X, E, false, c10::Half, c10::BFloat16>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DDPM_INSTANTIATE_XE(X, E)                                                                                   \
  template void launch_ddpm_step<X, E>(const X*, const E*, const int64_t*, bool, const float*, int64_t, const X*, \
                                       uint64_t, uint64_t, uint64_t, uint64_t, bool, const StepLayout&, X*, void*, \
                                       InputType, cudaStream_t);
#define DDPM_INSTANTIATE(X) DDPM_INSTANTIATE_XE(X, float) DDPM_INSTANTIATE_XE(X, c10::Half) \
  DDPM_INSTANTIATE_XE(X, c10::BFloat16)
DDPM_FOR_FLOAT_TYPES(DDPM_INSTANTIATE)
#undef DDPM_INSTANTIATE
#undef DDPM_INSTANTIATE_XE

}  // namespace cuda
}  // namespace ddpm_fast
