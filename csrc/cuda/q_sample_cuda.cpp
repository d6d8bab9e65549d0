// q_sample on the GPU: the op's checks and outputs; the launch is in
// q_sample_launch.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../q_sample.h"
#include "launch.h"

namespace ddpm_fast {
namespace {

void q_sample_impl(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                   const at::Tensor& sqrt_1m_ab, const at::Tensor* noise, int64_t seed,
                   int64_t offset, at::Tensor& xt, at::Tensor* eps) {
  const ElementLayout l = check_q_sample_args(x0, t, sqrt_ab, sqrt_1m_ab, noise);
  if (l.numel == 0) return;
  const c10::cuda::CUDAGuard guard(x0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool per_sample_t = t.dim() == 1 && t.numel() > 1;
  DDPM_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "q_sample_cuda", [&] {
    cuda::launch_q_sample(x0.const_data_ptr<scalar_t>(), noise ? noise->const_data_ptr<scalar_t>() : nullptr,
                          t.const_data_ptr<int64_t>(), per_sample_t, sqrt_ab.const_data_ptr<float>(),
                          sqrt_1m_ab.const_data_ptr<float>(), sqrt_ab.numel(), l, static_cast<uint64_t>(seed),
                          static_cast<uint64_t>(offset), xt.mutable_data_ptr<scalar_t>(),
                          eps ? eps->mutable_data_ptr<scalar_t>() : nullptr, stream);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> q_sample_randn_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                       const at::Tensor& sqrt_ab,
                                                       const at::Tensor& sqrt_1m_ab, int64_t seed,
                                                       int64_t offset) {
  at::Tensor xt = at::empty_like(x0);
  at::Tensor eps = at::empty_like(x0);
  q_sample_impl(x0, t, sqrt_ab, sqrt_1m_ab, nullptr, seed, offset, xt, &eps);
  return {xt, eps};
}

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab, const at::Tensor& noise) {
  at::Tensor xt = at::empty_like(x0);
  q_sample_impl(x0, t, sqrt_ab, sqrt_1m_ab, &noise, 0, 0, xt, nullptr);
  return xt;
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("q_sample_randn", &q_sample_randn_cuda);
  m.impl("q_sample", &q_sample_cuda);
}

}  // namespace ddpm_fast
