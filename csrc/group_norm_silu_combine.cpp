// The split paths' host combinations of the CUDA GroupNorm+SiLU: what runs
// between its kernels when a group is too large for one block
// (cuda/group_norm_silu_cuda.cpp). Plain ATen ops, so they run on any device:
// the internal ops ddpm_fast::_group_norm_combine_moments / _backward give the
// CPU tests the very code the GPU runs (test_group_norm_silu_combine.py).
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/rsqrt.h>
#include <torch/library.h>

#include <tuple>

#include "group_norm_silu.h"

namespace ddpm_fast {

std::tuple<at::Tensor, at::Tensor> group_norm_combine_moments(const at::Tensor& parts, const at::Tensor& add,
                                                              int64_t groups, int64_t hw, int64_t block_s, double eps) {
  TORCH_CHECK(parts.dim() == 4 && parts.size(0) == 3, "ddpm_fast: parts must be (3, N, C, tiles), got ", parts.sizes());
  const int64_t n = parts.size(1), c = parts.size(2), tiles = parts.size(3);
  TORCH_CHECK(groups > 0 && c % groups == 0 && tiles > 0 && block_s > 0 && (tiles - 1) * block_s < hw &&
                  hw <= tiles * block_s,
              "ddpm_fast: ", tiles, " tiles of ", block_s, " positions do not cover ", hw, " in ", groups, " groups");
  // The tile columns' moments combined in double by Chan's parallel formula:
  // a column of n values about its float mean m, with D = sum (x - m) and
  // Q = sum (x - m)^2, has the mean m + D / n and M2 = Q - D^2 / n; the
  // group's M2 is the columns' M2 plus n (column mean - group mean)^2 summed.
  // Every float sum is of deviations from its own column's mean, so none
  // cancels wherever the values lie (sums shifted by the group's first
  // value, before, lost the variance when that value lay far from the mean).
  const at::Tensor part = parts.to(at::kDouble);
  at::Tensor n_t = at::full({tiles}, static_cast<double>(block_s), part.options());
  n_t.select(0, tiles - 1).fill_(static_cast<double>(hw - (tiles - 1) * block_s));
  const at::Tensor dev = part[1];
  at::Tensor col_mean = part[0] + dev / n_t;  // [N, C, T]
  if (add.defined()) col_mean = col_mean + add.to(at::kDouble).view({n, c, 1});
  const at::Tensor col_m2 = part[2] - dev * dev / n_t;
  const double count = static_cast<double>(c / groups * hw);
  auto group_sum = [&](const at::Tensor& v) {  // [N, C, T] -> [N, G, 1, 1]
    return v.view({n, groups, -1, tiles}).sum({2, 3}, /*keepdim=*/true);
  };
  const at::Tensor mean = group_sum(col_mean * n_t) / count;
  const at::Tensor spread = col_mean.view({n, groups, -1, tiles}) - mean;
  const at::Tensor var = ((group_sum(col_m2) + (spread * spread * n_t).sum({2, 3}, true)) / count).clamp_min(0.0);
  return {mean.view({n, groups}), (var + eps).rsqrt().view({n, groups})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_combine_backward(
    const at::Tensor& sums, const at::Tensor& weight, const at::Tensor& rstd, int64_t groups, int64_t hw) {
  TORCH_CHECK(sums.dim() == 4 && sums.size(0) == 3, "ddpm_fast: sums must be (3, N, C, tiles), got ", sums.sizes());
  const int64_t n = sums.size(1), c = sums.size(2);
  TORCH_CHECK(groups > 0 && c % groups == 0 && hw > 0, "ddpm_fast: ", c, " channels in ", groups, " groups");
  // The tiles' sums (float32, as torch sums them there), then the groups'
  // means of w*B and w*A, and dadd = sum over positions of dh (group_norm_silu.h).
  const int64_t cg = c / groups;
  const at::Tensor totals = sums.sum(-1);  // [3, N, C]: A, B, X
  const at::Tensor col_a = totals[0], col_b = totals[1];
  const at::Tensor w = weight.defined() ? weight : at::ones({c}, sums.options());
  const double count = static_cast<double>(cg * hw);
  const at::Tensor m1 = ((w * col_b).view({n, groups, cg}).sum(-1) / count).contiguous();
  const at::Tensor m2 = ((w * col_a).view({n, groups, cg}).sum(-1) / count).contiguous();
  const auto per_channel = [&](const at::Tensor& t) { return t.repeat_interleave(cg, 1); };
  const at::Tensor dadd =
      per_channel(rstd) * (w * col_b - static_cast<double>(hw) * per_channel(m1) - totals[2] * per_channel(m2));
  return {col_a, col_b, m1, m2, dadd};
}

namespace {

at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

std::tuple<at::Tensor, at::Tensor> combine_moments_op(const at::Tensor& parts, const std::optional<at::Tensor>& add,
                                                      int64_t num_groups, int64_t hw, int64_t block_s, double eps) {
  return group_norm_combine_moments(parts, or_undefined(add), num_groups, hw, block_s, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> combine_backward_op(
    const at::Tensor& sums, const std::optional<at::Tensor>& weight, const at::Tensor& rstd, int64_t num_groups,
    int64_t hw) {
  return group_norm_combine_backward(sums, or_undefined(weight), rstd, num_groups, hw);
}

}  // namespace

TORCH_LIBRARY_IMPL(ddpm_fast, CompositeExplicitAutograd, m) {
  m.impl("_group_norm_combine_moments", &combine_moments_op);
  m.impl("_group_norm_combine_backward", &combine_backward_op);
}

}  // namespace ddpm_fast
