// GroupNorm followed by SiLU, with an optional per-(sample, channel) add before
// the norm (the U-Net's time embedding):
//   h = x + add[n, c];  xhat = (h - mean_ng) * rstd_ng;  u = xhat * w_c + b_c
//   y = act ? u * sigmoid(u) : u
// Statistics are float32 (float64 for float64 input), biased variance.
// Backward splits into per-(n, c) sums over the spatial extent,
//   A_nc = sum du * xhat,  B_nc = sum du,  X_nc = sum xhat,
// from which everything else follows: dw = sum_n A, db = sum_n B, and with
// M = elements per group, S1 = sum_{c in g} w_c B_nc, S2 = sum_{c in g} w_c A_nc:
//   dh = rstd * (du * w_c - S1 / M - xhat * S2 / M),  dadd_nc = sum_hw dh.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <limits>
#include <optional>
#include <tuple>

#include "layout.h"

namespace ddpm_fast {

// NormLayout: kernel_args.h (via layout.h).
inline NormLayout check_group_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add,
                                        int64_t num_groups) {
  TORCH_CHECK(is_supported_float(x.scalar_type()) || x.scalar_type() == at::kDouble,
              "ddpm_fast: x must be float32, float16, bfloat16 (or float64 on the CPU), got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "ddpm_fast: x must be N x C x ..., got ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous() || is_channels_last_4d(x), "ddpm_fast: x must be contiguous or channels_last");
  const int64_t channels = x.size(1);
  TORCH_CHECK(num_groups > 0 && channels % num_groups == 0, "ddpm_fast: channels (", channels,
              ") must be divisible by num_groups (", num_groups, ")");
  for (const auto* p : {&weight, &bias}) {
    if (p->has_value()) {
      const at::Tensor& v = **p;
      TORCH_CHECK(v.dim() == 1 && v.size(0) == channels && v.is_contiguous(),
                  "ddpm_fast: weight and bias must be contiguous of shape (C,) = (", channels, "), got ", v.sizes());
      TORCH_CHECK(v.device() == x.device(), "ddpm_fast: weight/bias are on ", v.device(), " but x is on ", x.device());
      TORCH_CHECK(v.scalar_type() == x.scalar_type() || v.scalar_type() == at::kFloat,
                  "ddpm_fast: weight/bias must be float32 or x's dtype, got ", v.scalar_type());
    }
  }
  if (add.has_value()) {
    const at::Tensor& a = *add;
    TORCH_CHECK(a.dim() == 2 && a.size(0) == x.size(0) && a.size(1) == channels && a.is_contiguous(),
                "ddpm_fast: add must be contiguous of shape (N, C) = (", x.size(0), ", ", channels, "), got ", a.sizes());
    TORCH_CHECK(a.device() == x.device(), "ddpm_fast: add is on ", a.device(), " but x is on ", x.device());
    TORCH_CHECK(a.scalar_type() == x.scalar_type() || a.scalar_type() == at::kFloat,
                "ddpm_fast: add must be float32 or x's dtype, got ", a.scalar_type());
  }
  NormLayout l;
  l.n = x.size(0);
  l.c = channels;
  l.hw = l.n * l.c > 0 ? x.numel() / (l.n * l.c) : 0;
  l.groups = num_groups;
  l.channels_last = is_channels_last_4d(x);
  return l;
}

// The dtype of the groups' statistics: float64 for float64 x, else float32.
inline at::ScalarType group_norm_stat_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The forward's outputs: y like x, and the groups' mean and rstd (N, G) of
// group_norm_stat_type. An empty x has groups of no values and so no
// statistics: mean and rstd are NaN (and nothing is left to compute).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_outputs(const at::Tensor& x, const NormLayout& l) {
  at::Tensor mean = at::empty({l.n, l.groups}, x.options().dtype(group_norm_stat_type(x)));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) {
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return {at::empty_like(x), mean, rstd};
}

// The backward's own inputs: dy like x, and the forward's (N, G) statistics
// (group_norm_stat_type), contiguous.
inline void check_group_norm_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                           const at::Tensor& rstd, const NormLayout& l) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "ddpm_fast: dy must have x's shape and dtype");
  TORCH_CHECK(dy.device() == x.device(), "ddpm_fast: dy is on ", dy.device(), " but x is on ", x.device());
  const at::ScalarType stat_type = group_norm_stat_type(x);
  for (const at::Tensor* stat : {&mean, &rstd}) {
    TORCH_CHECK(stat->dim() == 2 && stat->size(0) == l.n && stat->size(1) == l.groups && stat->is_contiguous() &&
                    stat->scalar_type() == stat_type,
                "ddpm_fast: mean and rstd must be the forward's contiguous ", stat_type, " (N, G) = (", l.n, ", ",
                l.groups, ") statistics, got ", stat->sizes(), " ", stat->scalar_type());
    TORCH_CHECK(stat->device() == x.device(), "ddpm_fast: mean/rstd are on ", stat->device(), " but x is on ",
                x.device());
  }
}

// dweight, dbias and dadd in the dtype of their input (x's where there was none),
// from float32 or float64 sums of shapes (C,), (C,) and (N, C).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> param_grads_as(const at::Tensor& dw, const at::Tensor& db,
                                                                     const at::Tensor& dadd, const at::Tensor& x,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     const std::optional<at::Tensor>& add) {
  auto type_of = [&](const std::optional<at::Tensor>& t) { return t.has_value() ? t->scalar_type() : x.scalar_type(); };
  return {dw.to(type_of(weight)), db.to(type_of(bias)), dadd.to(type_of(add))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  const std::optional<at::Tensor>& add,
                                                                  int64_t num_groups, double eps, bool act);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act);

// The CUDA split paths' host combinations (group_norm_silu_combine.cpp); add and
// weight float32 or undefined. Moments: parts (3, N, C, tiles) float32 of each
// tile column's float mean m (of x, without add), D = sum (x - m) and
// Q = sum (x - m)^2 -> float64 (mean, rstd) of (N, G). Backward: sums
// (3, N, C, tiles) of A, B, X (above), rstd (N, G) -> (A, B, m1, m2, dadd) with
// m1 = S1 / M, m2 = S2 / M.
std::tuple<at::Tensor, at::Tensor> group_norm_combine_moments(const at::Tensor& parts, const at::Tensor& add,
                                                              int64_t groups, int64_t hw, int64_t block_s, double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_combine_backward(
    const at::Tensor& sums, const at::Tensor& weight, const at::Tensor& rstd, int64_t groups, int64_t hw);
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const std::optional<at::Tensor>& add,
                                                                   int64_t num_groups, double eps, bool act);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act);

}  // namespace ddpm_fast
