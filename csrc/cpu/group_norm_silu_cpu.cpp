// GroupNorm+SiLU on the CPU (math in csrc/group_norm_silu.h): statistics and
// sums in double, one task per (sample, group) forward and per (sample,
// channel) backward (vectorized float rows for float NCHW input).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
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

// exp(x) for float, Cephes' polynomial on x = k ln2 + r, branch-free so that
// loops over it vectorize (within 2 ulp of expf over [-87, 88]). The polynomial
// sees x clamped to that range (NaN too, keeping the int conversion defined);
// the ends are restored last: exp(NaN) = NaN and exp(x > 88) = +Inf, so that
// silu(-Inf) = -Inf / (1 + Inf) is NaN, as F.silu has it.
inline __attribute__((always_inline)) float exp_poly(float x_in) {
  const float x = x_in >= -87.0f ? (x_in <= 88.0f ? x_in : 88.0f) : -87.0f;
  // floor(x log2e + 0.5) by truncating a positive value (vectorizes without SSE4.1's round).
  const int32_t k_int = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float k = static_cast<float>(k_int);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (k_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x_in > 88.0f ? std::numeric_limits<float>::infinity() : (x_in == x_in ? e : x_in);
}

// out[i] = act(in[i] * scale[i * step] + shift[i * step]) over a row; step 0
// broadcasts one scale/shift (an NCHW channel row), step 1 reads one per
// element (an NHWC pixel row, one channel each).
__attribute__((target_clones("avx2", "default"))) void affine_act_row(const float* in, const float* scale,
                                                                      const float* shift, int64_t step, int64_t count,
                                                                      bool act, float* out) {
  if (step == 0) {
    const float a = scale[0], b = shift[0];
    if (act) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) {
        const float u = in[i] * a + b;
        out[i] = u / (1.0f + exp_poly(-u));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) out[i] = in[i] * a + b;
    }
  } else if (act) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const float u = in[i] * scale[i] + shift[i];
      out[i] = u / (1.0f + exp_poly(-u));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = in[i] * scale[i] + shift[i];
  }
}

// Sum and sum of squares of a row, in double.
__attribute__((target_clones("avx2", "default"))) void row_moments(const float* in, int64_t count, double* sum,
                                                                   double* sumsq) {
  double s = 0.0, q = 0.0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < count; ++i) {
    const double v = in[i];
    s += v;
    q += v * v;
  }
  *sum = s;
  *sumsq = q;
}

// Rows of any element type through float: converted in chunks where T is not float.
constexpr int64_t kChunk = 1024;

template <typename T>
const float* as_float_row(const T* row, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(row[i]);
    return buffer;
  }
}

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

// The group means m1 = sum_k w_k B_k / count and m2 = sum_k w_k A_k / count
// over the channels k of one group of one sample (row offset nc0).
inline std::pair<double, double> group_means(const Params& p, const std::vector<double>& A,
                                             const std::vector<double>& B, int64_t nc0, int64_t c0, int64_t cg,
                                             double count) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t k = c0; k < c0 + cg; ++k) {
    s1 += p.w[k] * B[nc0 + k];
    s2 += p.w[k] * A[nc0 + k];
  }
  return {s1 / count, s2 / count};
}

// dL/du at u = xhat * w + b, through SiLU, in float (grad_u's formula).
inline __attribute__((always_inline)) float silu_grad_float(float dy, float u) {
  const float s = 1.0f / (1.0f + exp_poly(-u));
  return dy * s * (1.0f + u * (1.0f - s));
}

// Backward pass 1 over one contiguous (n, c) row of floats: the sums
// A = sum du * xhat, B = sum du and X = sum xhat, accumulated in double. The
// `act` branch stays outside the loops, which would not vectorize around it.
__attribute__((target_clones("avx2", "default"))) void backward_row_sums(const float* dy, const float* x, int64_t count,
                                                                         float shift, float rstd, float w, float b,
                                                                         bool act, double* out) {
  double a_sum = 0.0, b_sum = 0.0, x_sum = 0.0;
  if (act) {
#pragma omp simd reduction(+ : a_sum, b_sum, x_sum)
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (x[i] + shift) * rstd;
      const float du = silu_grad_float(dy[i], xhat * w + b);
      a_sum += static_cast<double>(du * xhat);
      b_sum += static_cast<double>(du);
      x_sum += static_cast<double>(xhat);
    }
  } else {
#pragma omp simd reduction(+ : a_sum, b_sum, x_sum)
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (x[i] + shift) * rstd;
      a_sum += static_cast<double>(dy[i] * xhat);
      b_sum += static_cast<double>(dy[i]);
      x_sum += static_cast<double>(xhat);
    }
  }
  out[0] = a_sum;
  out[1] = b_sum;
  out[2] = x_sum;
}

// Backward pass 2 over one contiguous (n, c) row: dx = rstd (w du - m1 - xhat m2).
__attribute__((target_clones("avx2", "default"))) void backward_row_dx(const float* dy, const float* x, int64_t count,
                                                                       float shift, float rstd, float w, float b,
                                                                       float m1, float m2, bool act, float* dx) {
  if (act) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (x[i] + shift) * rstd;
      dx[i] = rstd * (silu_grad_float(dy[i], xhat * w + b) * w - m1 - xhat * m2);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (x[i] + shift) * rstd;
      dx[i] = rstd * (dy[i] * w - m1 - xhat * m2);
    }
  }
}

// The backward of float NCHW input, row by row in vectorized float (the
// general path below works element by element in double).
void backward_float_nchw(const float* dy, const float* x, const NormLayout& l, const Params& p, const float* mean,
                         const float* rstd, bool act, float* dx, std::vector<double>& A, std::vector<double>& B,
                         std::vector<double>& dadd) {
  const int64_t cg = l.c / l.groups;
  const double count = static_cast<double>(cg * l.hw);
  std::vector<double> X(l.n * l.c);
  auto shift_of = [&](int64_t n, int64_t c) {
    const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
    return static_cast<float>(a - static_cast<double>(mean[n * l.groups + c / cg]));
  };
  at::parallel_for(0, l.n * l.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / l.c, c = nc % l.c;
      double sums[3];
      backward_row_sums(dy + nc * l.hw, x + nc * l.hw, l.hw, shift_of(n, c), rstd[n * l.groups + c / cg],
                        static_cast<float>(p.w[c]), static_cast<float>(p.b[c]), act, sums);
      A[nc] = sums[0];
      B[nc] = sums[1];
      X[nc] = sums[2];
    }
  });
  at::parallel_for(0, l.n * l.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / l.c, c = nc % l.c, c0 = (c / cg) * cg;
      const auto [m1, m2] = group_means(p, A, B, n * l.c, c0, cg, count);
      const double r = static_cast<double>(rstd[n * l.groups + c / cg]);
      backward_row_dx(dy + nc * l.hw, x + nc * l.hw, l.hw, shift_of(n, c), static_cast<float>(r),
                      static_cast<float>(p.w[c]), static_cast<float>(p.b[c]), static_cast<float>(m1),
                      static_cast<float>(m2), act, dx + nc * l.hw);
      dadd[nc] = r * (p.w[c] * B[nc] - static_cast<double>(l.hw) * m1 - X[nc] * m2);
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
  // Pass 2, per (n, c): dh from the group means of w B and w A.
  at::parallel_for(0, l.n * l.c, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / l.c, c = nc % l.c, c0 = (c / cg) * cg;
      const auto [m1, m2] = group_means(p, A, B, n * l.c, c0, cg, count);
      const double r = static_cast<double>(rstd[n * l.groups + c / cg]);
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

at::Tensor from_doubles(const std::vector<double>& v, at::IntArrayRef shape) {
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kDouble));
  std::copy(v.begin(), v.end(), t.mutable_data_ptr<double>());
  return t;
}

// The float path (float, half, bfloat16 input): per-channel moments in
// double, then one vectorized affine+SiLU pass over rows of memory.
template <typename T>
void forward_float(const T* x, const NormLayout& l, const Params& p, double eps, bool act, T* y, float* mean_out,
                   float* rstd_out) {
  const int64_t cg = l.c / l.groups;
  std::vector<double> sum(l.n * l.c, 0.0), sumsq(l.n * l.c, 0.0);
  if (!l.channels_last) {  // rows (n, c) of S contiguous elements
    at::parallel_for(0, l.n * l.c, 1, [&](int64_t begin, int64_t end) {
      float buffer[kChunk];
      for (int64_t nc = begin; nc < end; ++nc) {
        for (int64_t s0 = 0; s0 < l.hw; s0 += kChunk) {
          const int64_t count = std::min(kChunk, l.hw - s0);
          double ps, pq;
          row_moments(as_float_row(x + nc * l.hw + s0, count, buffer), count, &ps, &pq);
          sum[nc] += ps;
          sumsq[nc] += pq;
        }
      }
    });
  } else {  // rows (n, s) of C contiguous elements: per-channel sums per sample
    at::parallel_for(0, l.n, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(l.c);
      for (int64_t n = begin; n < end; ++n) {
        double* ps = sum.data() + n * l.c;
        double* pq = sumsq.data() + n * l.c;
        for (int64_t s = 0; s < l.hw; ++s) {
          const float* row = as_float_row(x + (n * l.hw + s) * l.c, l.c, buffer.data());
#pragma omp simd
          for (int64_t c = 0; c < l.c; ++c) {
            const double v = row[c];
            ps[c] += v;
            pq[c] += v * v;
          }
        }
      }
    });
  }
  // Group statistics of h = x + add, then each (n, c)'s scale and shift.
  std::vector<float> scale(l.n * l.c), shift(l.n * l.c);
  const double count = static_cast<double>(cg * l.hw), hw = static_cast<double>(l.hw);
  for (int64_t n = 0; n < l.n; ++n) {
    for (int64_t g = 0; g < l.groups; ++g) {
      double s = 0.0, q = 0.0;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
        s += sum[n * l.c + c] + hw * a;
        q += sumsq[n * l.c + c] + 2.0 * a * sum[n * l.c + c] + hw * a * a;
      }
      const double mean = s / count;
      const double rstd = 1.0 / std::sqrt(std::max(q / count - mean * mean, 0.0) + eps);
      mean_out[n * l.groups + g] = static_cast<float>(mean);
      rstd_out[n * l.groups + g] = static_cast<float>(rstd);
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
        const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
        scale[n * l.c + c] = static_cast<float>(rstd * p.w[c]);
        shift[n * l.c + c] = static_cast<float>(p.b[c] + (a - mean) * rstd * p.w[c]);
      }
    }
  }
  const int64_t rows = l.channels_last ? l.n * l.hw : l.n * l.c;
  const int64_t width = l.channels_last ? l.c : l.hw;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    float in_buffer[kChunk], out_buffer[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const float* sc = l.channels_last ? scale.data() + (r / l.hw) * l.c : scale.data() + r;
      const float* sh = l.channels_last ? shift.data() + (r / l.hw) * l.c : shift.data() + r;
      for (int64_t i0 = 0; i0 < width; i0 += kChunk) {
        const int64_t count_i = std::min(kChunk, width - i0);
        const int64_t step = l.channels_last ? 1 : 0;
        const float* in = as_float_row(x + r * width + i0, count_i, in_buffer);
        if constexpr (std::is_same_v<T, float>) {
          affine_act_row(in, sc + step * i0, sh + step * i0, step, count_i, act, y + r * width + i0);
        } else {
          affine_act_row(in, sc + step * i0, sh + step * i0, step, count_i, act, out_buffer);
          for (int64_t i = 0; i < count_i; ++i) y[r * width + i0 + i] = static_cast<T>(out_buffer[i]);
        }
      }
    }
  });
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
  if (x.scalar_type() == at::kDouble) {  // gradcheck precision: all in double
    forward(x.const_data_ptr<double>(), l, p, eps, act, y.mutable_data_ptr<double>(), mean.mutable_data_ptr<double>(),
            rstd.mutable_data_ptr<double>());
  } else {
    DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_cpu", [&] {
      forward_float(x.const_data_ptr<scalar_t>(), l, p, eps, act, y.mutable_data_ptr<scalar_t>(),
                    mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
    });
  }
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  check_group_norm_backward_args(dy_in, x, mean, rstd, l);
  const at::Tensor dy = x.is_contiguous() ? dy_in.contiguous() : dy_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty_like(x);
  std::vector<double> A(l.n * l.c, 0.0), B(l.n * l.c, 0.0), dadd(l.n * l.c, 0.0);
  if (x.numel() > 0) {
    const Params p = read_params(l, weight, bias, add);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
      if (mean.scalar_type() == at::kDouble) {
        backward(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), l, p, mean.const_data_ptr<double>(),
                 rstd.const_data_ptr<double>(), act, dx.mutable_data_ptr<scalar_t>(), A, B, dadd);
      } else if (std::is_same_v<scalar_t, float> && !l.channels_last) {
        backward_float_nchw(dy.const_data_ptr<float>(), x.const_data_ptr<float>(), l, p, mean.const_data_ptr<float>(),
                            rstd.const_data_ptr<float>(), act, dx.mutable_data_ptr<float>(), A, B, dadd);
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
  const auto [dweight, dbias, dadd_t] =
      param_grads_as(from_doubles(dw, {l.c}), from_doubles(db, {l.c}), from_doubles(dadd, {l.n, l.c}), x, weight, bias, add);
  return {dx, dweight, dbias, dadd_t};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace ddpm_fast
