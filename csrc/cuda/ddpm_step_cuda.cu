// The reverse step on the GPU: one read of x_t and eps (and of given noise),
// one write of x_{t-1} (and of the next model input); cuda::kStepVec elements per thread.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ddpm_step.h"
#include "cuda_utils.cuh"
#include "ddpm_step_kernels.cuh"

namespace ddpm_fast {
namespace {

cuda::InputType input_type(const std::optional<at::Tensor>& mi) {
  if (!mi.has_value()) return cuda::InputType::kNone;
  switch (mi->scalar_type()) {
    case at::kFloat: return cuda::InputType::kFloat;
    case at::kHalf: return cuda::InputType::kHalf;
    default: return cuda::InputType::kBFloat16;
  }
}

}  // namespace

void ddpm_step_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& t, const at::Tensor& coefficients,
                    const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, int64_t sample_stride,
                    int64_t step_stride, bool clip_denoised, at::Tensor& out,
                    const std::optional<at::Tensor>& model_input) {
  const StepLayout s =
      check_ddpm_step_args(x, eps, t, coefficients, noise, sample_stride, step_stride, out, model_input);
  if (s.numel == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  void* mi = model_input.has_value() ? model_input->data_ptr() : nullptr;
  const bool per_sample_t = t.dim() == 1 && t.numel() > 1;
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "ddpm_step_cuda", [&] {
    using X = scalar_t;
    DDPM_DISPATCH_FLOAT_TYPES(eps.scalar_type(), "ddpm_step_cuda_eps", [&] {
      using E = scalar_t;
      const X* xp = x.const_data_ptr<X>();
      const E* ep = eps.const_data_ptr<E>();
      const X* np = noise.has_value() ? noise->const_data_ptr<X>() : nullptr;
      X* op = out.mutable_data_ptr<X>();
      const bool vectorized = cuda::all_aligned<sizeof(X) * cuda::kStepVec>(xp, op) && cuda::all_aligned<sizeof(E) * cuda::kStepVec>(ep) &&
                              (np == nullptr || cuda::all_aligned<sizeof(X) * cuda::kStepVec>(np));
      const int64_t blocks = cuda::grid_size((s.numel + cuda::kStepVec - 1) / cuda::kStepVec);
      auto launch = [&](auto kernel) {
        kernel<<<blocks, cuda::kThreads, 0, stream>>>(
            xp, ep, t.const_data_ptr<int64_t>(), per_sample_t, coefficients.const_data_ptr<float>(),
            coefficients.size(0), np, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
            static_cast<uint64_t>(sample_stride), static_cast<uint64_t>(step_stride), clip_denoised, s, op, mi,
            input_type(model_input));
      };
      if (vectorized) {
        launch(cuda::ddpm_step_kernel<X, E, true, at::Half, at::BFloat16>);
      } else {
        launch(cuda::ddpm_step_kernel<X, E, false, at::Half, at::BFloat16>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("ddpm_step_", &ddpm_step_cuda); }

}  // namespace ddpm_fast
