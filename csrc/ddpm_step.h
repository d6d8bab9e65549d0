// The reverse step x_t -> x_{t-1} of DDPM / DDIM (Ho et al. 2020 eq. 11 and
// sec. 3.2; Song et al. 2021 eq. 12), one row of `coefficients` per timestep
// (NoiseSchedule.step_table):
//   unclipped: y = a x + b eps + sigma z
//   clipped:   x0 = clip(k2 x - k3 eps, -1, 1), y = c1 x0 + c2 x + sigma z
// z ~ N(0, 1) from the shared stream at counter
//   offset + n * sample_stride + t_n * step_stride + j
// for element j (logical NCHW order) of sample n; drawn only where sigma != 0.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "layout.h"

namespace ddpm_fast {

inline StepLayout check_ddpm_step_args(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& t,
                                       const at::Tensor& coefficients, const std::optional<at::Tensor>& noise,
                                       int64_t sample_stride, int64_t step_stride, const at::Tensor& out,
                                       const std::optional<at::Tensor>& model_input) {
  check_float_input(x, "x_t");
  check_float_input(eps, "eps");
  TORCH_CHECK(eps.device() == x.device(), "ddpm_fast: eps is on ", eps.device(), " but x_t is on ", x.device());
  TORCH_CHECK(eps.sizes() == x.sizes(), "ddpm_fast: eps has shape ", eps.sizes(), " but x_t has shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous() ? eps.is_contiguous() : is_channels_last_4d(eps),
              "ddpm_fast: eps must have the memory format of x_t");
  check_timesteps(t, x, "t");
  TORCH_CHECK(coefficients.scalar_type() == at::kFloat && coefficients.dim() == 2 &&
                  coefficients.size(1) == kStepColumns && coefficients.size(0) > 0 && coefficients.is_contiguous(),
              "ddpm_fast: coefficients must be a contiguous float32 (T, 8) step table, got ",
              coefficients.scalar_type(), " ", coefficients.sizes());
  TORCH_CHECK(coefficients.device() == x.device(), "ddpm_fast: coefficients are on ", coefficients.device(),
              " but x_t is on ", x.device());
  if (noise.has_value()) check_same_layout(*noise, x, "noise", "x_t");
  TORCH_CHECK(sample_stride >= 0 && step_stride >= 0, "ddpm_fast: noise strides must be >= 0");
  check_same_layout(out, x, "out", "x_t");
  StepLayout s;
  s.numel = x.numel();
  s.per_sample = x.size(0) > 0 ? s.numel / x.size(0) : 0;
  s.channels_last = is_channels_last_4d(x);
  const bool four_d = x.dim() == 4;
  const int64_t channels = four_d ? x.size(1) : 1;
  const int64_t spatial = four_d ? x.size(2) * x.size(3) : s.per_sample;
  s.inner = s.channels_last ? channels : spatial;
  s.outer = s.channels_last ? spatial : channels;
  s.model_input_other = false;
  if (model_input.has_value()) {
    const at::Tensor& mi = *model_input;
    TORCH_CHECK(is_supported_float(mi.scalar_type()), "ddpm_fast: model_input must be float32, float16 or bfloat16");
    TORCH_CHECK(mi.device() == x.device(), "ddpm_fast: model_input is on ", mi.device(), " but x_t is on ", x.device());
    TORCH_CHECK(mi.sizes() == x.sizes(), "ddpm_fast: model_input has shape ", mi.sizes(), " but x_t has shape ",
                x.sizes());
    TORCH_CHECK(mi.is_contiguous() || is_channels_last_4d(mi),
                "ddpm_fast: model_input must be contiguous or channels_last");
    s.model_input_other = mi.is_contiguous() ? s.channels_last : !s.channels_last;
  }
  // An output may be an input itself (in place: each element is read before it
  // is written) or share no memory with the inputs; a partial overlap (another
  // offset, dtype or memory format over the same bytes) would have the kernel
  // read elements a block or thread already overwrote. (ops.ddpm_step checks
  // this in Python too; here for callers of the raw op.)
  std::vector<const at::Tensor*> inputs = {&x, &eps};
  if (noise.has_value()) inputs.push_back(&*noise);
  for (const at::Tensor* input : inputs) at::assert_no_partial_overlap(out, *input);
  if (model_input.has_value()) {
    inputs.push_back(&out);
    for (const at::Tensor* other : inputs) at::assert_no_partial_overlap(*model_input, *other);
  }
  return s;
}

void ddpm_step_cpu(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& t, const at::Tensor& coefficients,
                   const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, int64_t sample_stride,
                   int64_t step_stride, bool clip_denoised, at::Tensor& out,
                   const std::optional<at::Tensor>& model_input);
void ddpm_step_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& t, const at::Tensor& coefficients,
                    const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, int64_t sample_stride,
                    int64_t step_stride, bool clip_denoised, at::Tensor& out,
                    const std::optional<at::Tensor>& model_input);

}  // namespace ddpm_fast
