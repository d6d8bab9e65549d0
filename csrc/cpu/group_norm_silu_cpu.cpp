// GroupNorm+SiLU on the CPU (math in csrc/group_norm_silu.h): statistics and
// sums in double, one task per (sample, group) forward and per (sample,
// channel) backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../group_norm_silu.h"

namespace ddpm_fast {
namespace {

// Per-channel parameters and per-(n, c) adds as double vectors (C and N*C values).
struct Params {
  std::vector<double> w, b, add;  // add is empty without one
};

std::vector<double> as_doubles(const at::Tensor& t) {
  const at::Tensor d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

Params read_params(const NormLayout& l, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& add) {
  Params p;
  p.w = weight.has_value() ? as_doubles(*weight) : std::vector<double>(l.c, 1.0);
  p.b = bias.has_value() ? as_doubles(*bias) : std::vector<double>(l.c, 0.0);
  if (add.has_value()) p.add = as_doubles(*add);
  return p;
}

// Memory index of element (n, c, s) of x viewed as N x C x S.
inline int64_t at_index(const NormLayout& l, int64_t n, int64_t c, int64_t s) {
  return l.channels_last ? (n * l.hw + s) * l.c + c : (n * l.c + c) * l.hw + s;
}

inline double sigmoid(double u) { return 1.0 / (1.0 + std::exp(-u)); }

// dL/du from dL/dy at pre-activation u.
inline double grad_u(double dy, double u, bool act) {
  if (!act) return dy;
  const double s = sigmoid(u);
  return dy * s * (1.0 + u * (1.0 - s));
}

template <typename T, typename S>
void forward(const T* x, const NormLayout& l, const Params& p, double eps, bool act, T* y, S* mean_out,
             S* rstd_out) {
  const int64_t cg = l.c / l.groups;
  const double count = static_cast<double>(cg * l.hw);
  at::parallel_for(0, l.n * l.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / l.groups, c0 = (ng % l.groups) * cg;
      double sum = 0.0, sumsq = 0.0;
      for (int64_t c = c0; c < c0 + cg; ++c) {
        const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
        for (int64_t s = 0; s < l.hw; ++s) {
          const double h = static_cast<double>(x[at_index(l, n, c, s)]) + a;
          sum += h;
          sumsq += h * h;
        }
      }
      const double mean = sum / count;
      const double var = std::max(sumsq / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      mean_out[ng] = static_cast<S>(mean);
      rstd_out[ng] = static_cast<S>(rstd);
      for (int64_t c = c0; c < c0 + cg; ++c) {
        const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
        const double scale = rstd * p.w[c];
        const double shift = p.b[c] + (a - mean) * scale;
        for (int64_t s = 0; s < l.hw; ++s) {
          const int64_t i = at_index(l, n, c, s);
          const double u = static_cast<double>(x[i]) * scale + shift;
          y[i] = static_cast<T>(act ? u * sigmoid(u) : u);
        }
      }
    }
  });
}

template <typename T, typename S>
void backward(const T* dy, const T* x, const NormLayout& l, const Params& p, const S* mean, const S* rstd, bool act,
              T* dx, std::vector<double>& A, std::vector<double>& B, std::vector<double>& dadd) {
  const int64_t cg = l.c / l.groups;
  const double count = static_cast<double>(cg * l.hw);
  auto xhat_of = [&](int64_t n, int64_t c, int64_t i) {
    const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
    const int64_t ng = n * l.groups + c / cg;
    return (static_cast<double>(x[i]) + a - static_cast<double>(mean[ng])) * static_cast<double>(rstd[ng]);
  };
  std::vector<double> X(l.n * l.c);
  // Pass 1, per (n, c): A = sum du * xhat, B = sum du, X = sum xhat.
  at::parallel_for(0, l.n * l.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / l.c, c = nc % l.c;
      double a_sum = 0.0, b_sum = 0.0, x_sum = 0.0;
      for (int64_t s = 0; s < l.hw; ++s) {
        const int64_t i = at_index(l, n, c, s);
        const double xhat = xhat_of(n, c, i);
        const double du = grad_u(static_cast<double>(dy[i]), xhat * p.w[c] + p.b[c], act);
        a_sum += du * xhat;
        b_sum += du;
        x_sum += xhat;
      }
      A[nc] = a_sum;
      B[nc] = b_sum;
      X[nc] = x_sum;
    }
  });
  // Pass 2, per (n, c): dh from the group sums S1 = sum w B, S2 = sum w A.
  at::parallel_for(0, l.n * l.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / l.c, c = nc % l.c, c0 = (c / cg) * cg;
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = c0; k < c0 + cg; ++k) {
        s1 += p.w[k] * B[n * l.c + k];
        s2 += p.w[k] * A[n * l.c + k];
      }
      const double r = static_cast<double>(rstd[n * l.groups + c / cg]);
      const double m1 = s1 / count, m2 = s2 / count;
      for (int64_t s = 0; s < l.hw; ++s) {
        const int64_t i = at_index(l, n, c, s);
        const double xhat = xhat_of(n, c, i);
        const double du = grad_u(static_cast<double>(dy[i]), xhat * p.w[c] + p.b[c], act);
        dx[i] = static_cast<T>(r * (du * p.w[c] - m1 - xhat * m2));
      }
      dadd[nc] = r * (p.w[c] * B[nc] - static_cast<double>(l.hw) * m1 - X[nc] * m2);
    }
  });
}

at::Tensor from_doubles(const std::vector<double>& v, at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return t.to(dtype);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  const std::optional<at::Tensor>& add,
                                                                  int64_t num_groups, double eps, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  const at::ScalarType stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({l.n, l.groups}, x.options().dtype(stat_type));
  at::Tensor rstd = at::empty({l.n, l.groups}, x.options().dtype(stat_type));
  if (x.numel() == 0) return {y, mean, rstd};
  const Params p = read_params(l, weight, bias, add);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_cpu", [&] {
    if (stat_type == at::kDouble) {
      forward(x.const_data_ptr<scalar_t>(), l, p, eps, act, y.mutable_data_ptr<scalar_t>(),
              mean.mutable_data_ptr<double>(), rstd.mutable_data_ptr<double>());
    } else {
      forward(x.const_data_ptr<scalar_t>(), l, p, eps, act, y.mutable_data_ptr<scalar_t>(),
              mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  TORCH_CHECK(dy_in.sizes() == x.sizes() && dy_in.scalar_type() == x.scalar_type(),
              "ddpm_fast: dy must have x's shape and dtype");
  TORCH_CHECK(mean.numel() == l.n * l.groups && rstd.numel() == l.n * l.groups && mean.is_contiguous() &&
                  rstd.is_contiguous() && mean.scalar_type() == rstd.scalar_type(),
              "ddpm_fast: mean and rstd must be the forward's (N, G) statistics");
  const at::Tensor dy = x.is_contiguous() ? dy_in.contiguous() : dy_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty_like(x);
  std::vector<double> A(l.n * l.c, 0.0), B(l.n * l.c, 0.0), dadd(l.n * l.c, 0.0);
  if (x.numel() > 0) {
    const Params p = read_params(l, weight, bias, add);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
      if (mean.scalar_type() == at::kDouble) {
        backward(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), l, p, mean.const_data_ptr<double>(),
                 rstd.const_data_ptr<double>(), act, dx.mutable_data_ptr<scalar_t>(), A, B, dadd);
      } else {
        backward(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), l, p, mean.const_data_ptr<float>(),
                 rstd.const_data_ptr<float>(), act, dx.mutable_data_ptr<scalar_t>(), A, B, dadd);
      }
    });
  }
  std::vector<double> dw(l.c, 0.0), db(l.c, 0.0);
  for (int64_t n = 0; n < l.n; ++n) {
    for (int64_t c = 0; c < l.c; ++c) {
      dw[c] += A[n * l.c + c];
      db[c] += B[n * l.c + c];
    }
  }
  const at::ScalarType w_type = weight.has_value() ? weight->scalar_type() : x.scalar_type();
  const at::ScalarType b_type = bias.has_value() ? bias->scalar_type() : x.scalar_type();
  const at::ScalarType a_type = add.has_value() ? add->scalar_type() : x.scalar_type();
  return {dx, from_doubles(dw, {l.c}, w_type), from_doubles(db, {l.c}, b_type), from_doubles(dadd, {l.n, l.c}, a_type)};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace ddpm_fast
