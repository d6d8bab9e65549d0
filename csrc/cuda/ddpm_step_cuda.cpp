// The reverse step on the GPU: the op's checks; the launch is in
// ddpm_step_launch.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../ddpm_step.h"
#include "launch.h"

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
      cuda::launch_ddpm_step(x.const_data_ptr<X>(), eps.const_data_ptr<scalar_t>(), t.const_data_ptr<int64_t>(),
                             per_sample_t, coefficients.const_data_ptr<float>(), coefficients.size(0),
                             noise.has_value() ? noise->const_data_ptr<X>() : nullptr, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(offset), static_cast<uint64_t>(sample_stride),
                             static_cast<uint64_t>(step_stride), clip_denoised, s, out.mutable_data_ptr<X>(), mi,
                             input_type(model_input), stream);
    });
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("ddpm_step_", &ddpm_step_cuda); }

}  // namespace ddpm_fast
