// q_sample on the GPU: one read of x0 (and of the noise, if given), one write
// of x_t (and of the drawn noise); kVec elements per thread, 16-byte accesses.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>


#include "../q_sample.h"
#include "cuda_utils.cuh"
#include "q_sample_kernels.cuh"

namespace ddpm_fast {
namespace {

template <typename T, bool kDraw>
void launch(const at::Tensor& x0, const at::Tensor* noise, const at::Tensor& t,
            const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab, const ElementLayout& l,
            uint64_t seed, uint64_t offset, at::Tensor& xt, at::Tensor* eps) {
  constexpr int kVec = 16 / sizeof(T);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* x = x0.const_data_ptr<T>();
  const T* nz = noise ? noise->const_data_ptr<T>() : nullptr;
  T* y = xt.mutable_data_ptr<T>();
  T* e = eps ? eps->mutable_data_ptr<T>() : nullptr;
  const bool per_sample_t = t.dim() == 1 && t.numel() > 1;
  const bool vector_ok = cuda::all_aligned<16>(x, y) && (nz == nullptr || cuda::all_aligned<16>(nz)) &&
                         (e == nullptr || cuda::all_aligned<16>(e));
  if (vector_ok) {
    cuda::q_sample_kernel<T, kVec, kDraw>
        <<<cuda::grid_size((l.numel + kVec - 1) / kVec), cuda::kThreads, 0, stream>>>(
            x, nz, t.const_data_ptr<int64_t>(), per_sample_t, sqrt_ab.const_data_ptr<float>(),
            sqrt_1m_ab.const_data_ptr<float>(), sqrt_ab.numel(), y, e, l, seed, offset);
  } else {
    cuda::q_sample_kernel<T, 1, kDraw><<<cuda::grid_size(l.numel), cuda::kThreads, 0, stream>>>(
        x, nz, t.const_data_ptr<int64_t>(), per_sample_t, sqrt_ab.const_data_ptr<float>(),
        sqrt_1m_ab.const_data_ptr<float>(), sqrt_ab.numel(), y, e, l, seed, offset);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void q_sample_impl(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                   const at::Tensor& sqrt_1m_ab, const at::Tensor* noise, int64_t seed,
                   int64_t offset, at::Tensor& xt, at::Tensor* eps) {
  const ElementLayout l = check_q_sample_args(x0, t, sqrt_ab, sqrt_1m_ab, noise);
  if (l.numel == 0) return;
  const c10::cuda::CUDAGuard guard(x0.device());
  DDPM_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "q_sample_cuda", [&] {
    if (noise == nullptr) {
      launch<scalar_t, true>(x0, nullptr, t, sqrt_ab, sqrt_1m_ab, l, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(offset), xt, eps);
    } else {
      launch<scalar_t, false>(x0, noise, t, sqrt_ab, sqrt_1m_ab, l, 0, 0, xt, nullptr);
    }
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
