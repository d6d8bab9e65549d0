// GroupNorm+SiLU on the GPU (math in csrc/group_norm_silu.h). Forward: one
// block per (sample, group): mean, variance about it, then y. Backward: one
// block per (sample, channel) for the sums A, B, X, then one per (sample,
// channel) for dx and dadd. Parameters are read as float32.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../group_norm_silu.h"
#include "cuda_utils.cuh"

namespace ddpm_fast {
namespace {

struct NormArgs {
  int64_t c, s, groups;
  bool channels_last;
  const float* w;    // [C] or null
  const float* b;    // [C] or null
  const float* add;  // [N, C] or null
  bool act;
};

__device__ __forceinline__ int64_t norm_index(const NormArgs& a, int64_t n, int64_t c, int64_t s) {
  return a.channels_last ? (n * a.s + s) * a.c + c : (n * a.c + c) * a.s + s;
}

__device__ __forceinline__ float sigmoidf(float u) { return 1.0f / (1.0f + __expf(-u)); }

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x,  // [N, C, S] NCHW or NHWC memory
                               NormArgs a, float eps,
                               T* __restrict__ y,         // [N, C, S] x's memory order
                               float* __restrict__ mean_out, float* __restrict__ rstd_out) {  // [N, G]
  __shared__ float scratch[cuda::kThreads / 32];
  const int64_t ng = blockIdx.x, n = ng / a.groups, cg = a.c / a.groups, c0 = (ng % a.groups) * cg;
  const int64_t count = cg * a.s;
  auto h_at = [&](int64_t i, int64_t& idx, int64_t& c) {
    c = c0 + i / a.s;
    idx = norm_index(a, n, c, i % a.s);
    return static_cast<float>(x[idx]) + (a.add ? a.add[n * a.c + c] : 0.0f);
  };
  int64_t idx, c;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += h_at(i, idx, c);
  const float mean = cuda::block_sum(sum, scratch) / count;
  float sq = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float d = h_at(i, idx, c) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(cuda::block_sum(sq, scratch) / count + eps);
  if (threadIdx.x == 0) {
    mean_out[ng] = mean;
    rstd_out[ng] = rstd;
  }
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    float u = (h_at(i, idx, c) - mean) * rstd;
    if (a.w) u *= a.w[c];
    if (a.b) u += a.b[c];
    y[idx] = static_cast<T>(a.act ? u * sigmoidf(u) : u);
  }
}

template <typename T>
__device__ __forceinline__ void xhat_du(const T* x, const T* dy, const NormArgs& a, int64_t n, int64_t c, int64_t idx,
                                        float mean, float rstd, float& xhat, float& du) {
  const float h = static_cast<float>(x[idx]) + (a.add ? a.add[n * a.c + c] : 0.0f);
  xhat = (h - mean) * rstd;
  const float u = xhat * (a.w ? a.w[c] : 1.0f) + (a.b ? a.b[c] : 0.0f);
  du = static_cast<float>(dy[idx]);
  if (a.act) {
    const float sg = sigmoidf(u);
    du *= sg * (1.0f + u * (1.0f - sg));
  }
}

template <typename T>
__global__ void backward_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x, NormArgs a,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     float* __restrict__ sums) {  // [3, N, C]: A, B, X
  __shared__ float scratch[cuda::kThreads / 32];
  const int64_t nc = blockIdx.x, n = nc / a.c, c = nc % a.c, ng = n * a.groups + c / (a.c / a.groups);
  const float m = mean[ng], r = rstd[ng];
  float sa = 0.0f, sb = 0.0f, sx = 0.0f;
  for (int64_t s = threadIdx.x; s < a.s; s += blockDim.x) {
    float xhat, du;
    xhat_du(x, dy, a, n, c, norm_index(a, n, c, s), m, r, xhat, du);
    sa += du * xhat;
    sb += du;
    sx += xhat;
  }
  const int64_t nc_total = gridDim.x;
  sa = cuda::block_sum(sa, scratch);
  sb = cuda::block_sum(sb, scratch);
  sx = cuda::block_sum(sx, scratch);
  if (threadIdx.x == 0) {
    sums[nc] = sa;
    sums[nc_total + nc] = sb;
    sums[2 * nc_total + nc] = sx;
  }
}

template <typename T>
__global__ void backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, NormArgs a,
                                   const float* __restrict__ mean, const float* __restrict__ rstd,
                                   const float* __restrict__ sums,  // [3, N, C]
                                   T* __restrict__ dx, float* __restrict__ dadd) {
  __shared__ float scratch[cuda::kThreads / 32];
  const int64_t nc = blockIdx.x, n = nc / a.c, c = nc % a.c, cg = a.c / a.groups, c0 = (c / cg) * cg;
  const int64_t nc_total = gridDim.x, ng = n * a.groups + c / cg;
  const float m = mean[ng], r = rstd[ng];
  float s1 = 0.0f, s2 = 0.0f;  // group sums of w*B and w*A
  for (int64_t k = threadIdx.x; k < cg; k += blockDim.x) {
    const float w = a.w ? a.w[c0 + k] : 1.0f;
    s1 += w * sums[nc_total + n * a.c + c0 + k];
    s2 += w * sums[n * a.c + c0 + k];
  }
  const float count = static_cast<float>(cg * a.s);
  const float m1 = cuda::block_sum(s1, scratch) / count, m2 = cuda::block_sum(s2, scratch) / count;
  const float w_c = a.w ? a.w[c] : 1.0f;
  for (int64_t s = threadIdx.x; s < a.s; s += blockDim.x) {
    const int64_t idx = norm_index(a, n, c, s);
    float xhat, du;
    xhat_du(x, dy, a, n, c, idx, m, r, xhat, du);
    dx[idx] = static_cast<T>(r * (du * w_c - m1 - xhat * m2));
  }
  if (threadIdx.x == 0) {
    dadd[nc] = r * (w_c * sums[nc_total + nc] - static_cast<float>(a.s) * m1 - sums[2 * nc_total + nc] * m2);
  }
}

at::Tensor as_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

NormArgs make_args(const NormLayout& l, const at::Tensor& w, const at::Tensor& b, const at::Tensor& add, bool act) {
  return {l.c,
          l.hw,
          l.groups,
          l.channels_last,
          w.defined() ? w.const_data_ptr<float>() : nullptr,
          b.defined() ? b.const_data_ptr<float>() : nullptr,
          add.defined() ? add.const_data_ptr<float>() : nullptr,
          act};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const std::optional<at::Tensor>& add,
                                                                   int64_t num_groups, double eps, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "ddpm_fast: float64 GroupNorm runs on the CPU only");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({l.n, l.groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({l.n, l.groups}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {y, mean, rstd};
  const at::Tensor w = as_float(weight), b = as_float(bias), a = as_float(add);
  const NormArgs args = make_args(l, w, b, a, act);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_cuda", [&] {
    forward_kernel<scalar_t><<<l.n * l.groups, cuda::kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), args, static_cast<float>(eps), y.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "ddpm_fast: float64 GroupNorm runs on the CPU only");
  check_group_norm_backward_args(dy_in, x, mean, rstd, l);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = x.is_contiguous() ? dy_in.contiguous() : dy_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty_like(x);
  at::Tensor sums = at::zeros({3, l.n, l.c}, x.options().dtype(at::kFloat));
  at::Tensor dadd = at::zeros({l.n, l.c}, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    const at::Tensor w = as_float(weight), b = as_float(bias), a = as_float(add);
    const NormArgs args = make_args(l, w, b, a, act);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
      backward_sums_kernel<scalar_t><<<l.n * l.c, cuda::kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), args, mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(), sums.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      backward_dx_kernel<scalar_t><<<l.n * l.c, cuda::kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), args, mean.const_data_ptr<float>(),
          rstd.const_data_ptr<float>(), sums.const_data_ptr<float>(), dx.mutable_data_ptr<scalar_t>(),
          dadd.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto [dweight, dbias, dadd_t] = param_grads_as(sums[0].sum(0), sums[1].sum(0), dadd, x, weight, bias, add);
  return {dx, dweight, dbias, dadd_t};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace ddpm_fast
