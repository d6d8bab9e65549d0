// GroupNorm+SiLU on the GPU: the op's checks and outputs and the choice of path
// (fused, cluster or split; group_norm_silu_kernels.cuh describes them); the
// launches are in group_norm_silu_launch.cu, the split path's host combinations
// between them in ../group_norm_silu_combine.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../group_norm_silu.h"
#include "launch.h"

namespace ddpm_fast {
namespace {

at::Tensor as_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

gn::Params make_params(const at::Tensor& w, const at::Tensor& b, const at::Tensor& add, bool act) {
  return {w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
          add.defined() ? add.const_data_ptr<float>() : nullptr, act};
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
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = group_norm_outputs(x, l);
  if (x.numel() == 0) return {y, mean, rstd};
  const at::Tensor w = as_float(weight), b = as_float(bias), a = as_float(add);
  const gn::Params p = make_params(w, b, a, act);
  const gn::Geometry g = cuda::gn_plan(l, x.element_size(), /*backward=*/false);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float eps_f = static_cast<float>(eps);
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    float* mp = mean.mutable_data_ptr<float>();
    float* rp = rstd.mutable_data_ptr<float>();
    if (g.fused) {
      cuda::gn_forward_fused(xp, l, g, p, eps_f, yp, mp, rp, stream);
      return;
    }
    // sm_90+: a group too large for a block, in a cluster's shared memory (one read, one write).
    if (cuda::gn_forward_cluster(xp, l, p, eps_f, yp, mp, rp, stream)) return;
    at::Tensor parts = at::empty({3, l.n, l.c, g.pos_tiles}, x.options().dtype(at::kFloat));
    cuda::gn_moments(xp, l, g, parts[0].mutable_data_ptr<float>(), parts[1].mutable_data_ptr<float>(),
                     parts[2].mutable_data_ptr<float>(), stream);
    const auto [d_mean, d_rstd] = group_norm_combine_moments(parts, a, l.groups, l.hw, g.block_s, eps);
    mean.copy_(d_mean);
    rstd.copy_(d_rstd);
    cuda::gn_normalize(xp, l, g, p, mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), yp, stream);
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
  at::Tensor col_a = at::zeros({l.n, l.c}, x.options().dtype(at::kFloat));
  at::Tensor col_b = at::zeros({l.n, l.c}, x.options().dtype(at::kFloat));
  at::Tensor dadd = at::zeros({l.n, l.c}, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    const at::Tensor w = as_float(weight), b = as_float(bias), a = as_float(add);
    const gn::Params p = make_params(w, b, a, act);
    const gn::Geometry g = cuda::gn_plan(l, x.element_size(), /*backward=*/true);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const float* mp = mean.const_data_ptr<float>();
    const float* rp = rstd.const_data_ptr<float>();
    DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      float* ap = col_a.mutable_data_ptr<float>();
      float* bp = col_b.mutable_data_ptr<float>();
      float* dap = dadd.mutable_data_ptr<float>();
      if (g.fused) {
        cuda::gn_backward_fused(dyp, xp, l, g, p, mp, rp, dxp, ap, bp, dap, stream);
        return;
      }
      // sm_90+: x and dy of a group too large for a block, in a cluster's shared memory (one read of each).
      if (cuda::gn_backward_cluster(dyp, xp, l, p, mp, rp, dxp, ap, bp, dap, stream)) return;
      at::Tensor sums = at::empty({3, l.n, l.c, g.pos_tiles}, x.options().dtype(at::kFloat));
      cuda::gn_backward_sums(dyp, xp, l, g, p, mp, rp, sums[0].mutable_data_ptr<float>(),
                             sums[1].mutable_data_ptr<float>(), sums[2].mutable_data_ptr<float>(), stream);
      at::Tensor m1, m2;
      std::tie(col_a, col_b, m1, m2, dadd) = group_norm_combine_backward(sums, w, rstd, l.groups, l.hw);
      cuda::gn_backward_dx(dyp, xp, l, g, p, mp, rp, m1.const_data_ptr<float>(), m2.const_data_ptr<float>(), dxp,
                           stream);
    });
  }
  const auto [dweight, dbias, dadd_t] = param_grads_as(col_a.sum(0), col_b.sum(0), dadd, x, weight, bias, add);
  return {dx, dweight, dbias, dadd_t};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace ddpm_fast
