// q_sample: x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps (Ho et al. 2020, eq. 4).
// Argument checks and the element layout, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "layout.h"

namespace ddpm_fast {

// Checks what every backend needs and returns how elements map to samples.
// `noise` is the given noise, or nullptr when the kernel draws it.
inline ElementLayout check_q_sample_args(const at::Tensor& x0, const at::Tensor& t,
                                         const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab,
                                         const at::Tensor* noise) {
  check_float_input(x0, "x0");
  check_timesteps(t, x0, "t");
  check_coefficient_table(sqrt_ab, x0, "sqrt_alphas_cumprod");
  check_coefficient_table(sqrt_1m_ab, x0, "sqrt_one_minus_alphas_cumprod");
  TORCH_CHECK(sqrt_ab.numel() == sqrt_1m_ab.numel(),
              "ddpm_fast: coefficient tables differ in length: ", sqrt_ab.numel(), " vs ",
              sqrt_1m_ab.numel());
  if (noise != nullptr) check_same_layout(*noise, x0, "noise", "x0");
  return element_layout(x0);
}

std::tuple<at::Tensor, at::Tensor> q_sample_randn_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                      const at::Tensor& sqrt_ab,
                                                      const at::Tensor& sqrt_1m_ab, int64_t seed,
                                                      int64_t offset);
at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                        const at::Tensor& sqrt_1m_ab, const at::Tensor& noise);

std::tuple<at::Tensor, at::Tensor> q_sample_randn_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                       const at::Tensor& sqrt_ab,
                                                       const at::Tensor& sqrt_1m_ab, int64_t seed,
                                                       int64_t offset);
at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab, const at::Tensor& noise);

}  // namespace ddpm_fast
