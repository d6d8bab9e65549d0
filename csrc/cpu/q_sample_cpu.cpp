// q_sample on the CPU: one pass over x0, noise drawn (or read) in blocks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../q_sample.h"
#include "float16_cpu.h"
#include "normal_cpu.h"
#include "timesteps_cpu.h"

namespace ddpm_fast {
namespace {

template <typename scalar_t>
void q_sample_kernel(const at::Tensor& x0, const std::vector<int64_t>& t, const float* sqrt_ab,
                     const float* sqrt_1m_ab, const scalar_t* noise, uint64_t seed,
                     uint64_t offset, const ElementLayout& l, at::Tensor& xt, at::Tensor* eps) {
  const scalar_t* x = x0.const_data_ptr<scalar_t>();
  scalar_t* out = xt.mutable_data_ptr<scalar_t>();
  scalar_t* eps_out = eps ? eps->mutable_data_ptr<scalar_t>() : nullptr;
  const bool per_sample_t = t.size() > 1;
  const int64_t grain = 16 * cpu::kNormalBlock;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;

  at::parallel_for(0, l.numel, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t B = cpu::kNormalBlock;
    uint64_t ctr[B];
    float z[B], a[B], b[B], x_buffer[B], y_buffer[B];
    cpu::NhwcNoise nhwc(seed, l.channels, l.spatial);
    int64_t n = begin / l.per_sample;  // the sample of p0, advanced (not divided) below
    for (int64_t p0 = begin; p0 < end; p0 += B) {
      const int64_t count = std::min(B, end - p0);
      while (p0 >= (n + 1) * l.per_sample) ++n;
      // Mostly the block lies in one sample: one timestep, scalar coefficients
      // and noise from normal_run (NCHW: consecutive counters) or NhwcNoise.
      // Otherwise, runs of elements within one sample, coefficients per
      // element, counters one by one.
      const bool one_sample = p0 + count <= (n + 1) * l.per_sample;
      float a1 = 0.0f, b1 = 0.0f;
      if (one_sample) {
        const int64_t step = t[per_sample_t ? n : 0];
        a1 = sqrt_ab[step];
        b1 = sqrt_1m_ab[step];
      } else {
        for (int64_t i0 = 0; i0 < count;) {
          const int64_t m = (p0 + i0) / l.per_sample;
          const int64_t i1 = std::min(count, (m + 1) * l.per_sample - p0);
          const int64_t step = t[per_sample_t ? m : 0];
          std::fill(a + i0, a + i1, sqrt_ab[step]);
          std::fill(b + i0, b + i1, sqrt_1m_ab[step]);
          if (noise == nullptr && !l.channels_last) {
            for (int64_t i = i0; i < i1; ++i) ctr[i] = offset + static_cast<uint64_t>(p0 + i);
          } else if (noise == nullptr) {
            cpu::nhwc_counters(offset + static_cast<uint64_t>(m * l.per_sample), l.channels, l.spatial,
                               p0 + i0 - m * l.per_sample, i1 - i0, ctr + i0);
          }
          i0 = i1;
        }
      }
      // Lanes past the end are drawn and discarded.
      const float* zs = z;  // the noise: z, or the given noise's values
      if (noise != nullptr) {
        zs = cpu::as_float_row(noise + p0, count, z);
      } else if (one_sample && !l.channels_last) {
        cpu::normal_run(seed, offset + static_cast<uint64_t>(p0), z);
      } else if (one_sample) {
        nhwc.fill(offset + static_cast<uint64_t>(n * l.per_sample), p0 - n * l.per_sample, count, z);
      } else {
        std::fill(ctr + count, ctr + B, 0);
        cpu::normal_block(seed, ctr, z);
      }
      if (eps_out != nullptr) {
        // Drawn noise: x_t from eps as returned, rounded to x0's dtype (as the
        // reference makes it), so eps is exactly the noise in x_t.
        cpu::from_float_row(zs, count, eps_out + p0);
        if constexpr (!kFloat) zs = cpu::as_float_row(eps_out + p0, count, z);
      }
      // In float; 16-bit values converted a block at a time.
      const float* xs = cpu::as_float_row(x + p0, count, x_buffer);
      float* y = kFloat ? reinterpret_cast<float*>(out + p0) : y_buffer;
      if (one_sample) {
        for (int64_t i = 0; i < count; ++i) y[i] = a1 * xs[i] + b1 * zs[i];
      } else {
        for (int64_t i = 0; i < count; ++i) y[i] = a[i] * xs[i] + b[i] * zs[i];
      }
      if constexpr (!kFloat) cpu::from_float_row(y_buffer, count, out + p0);
    }
  });
}

void q_sample_impl(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                   const at::Tensor& sqrt_1m_ab, const at::Tensor* noise, int64_t seed,
                   int64_t offset, at::Tensor& xt, at::Tensor* eps) {
  const ElementLayout l = check_q_sample_args(x0, t, sqrt_ab, sqrt_1m_ab, noise);
  if (l.numel == 0) return;
  const std::vector<int64_t> steps = cpu::read_timesteps(t, sqrt_ab.numel());
  DDPM_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "q_sample_cpu", [&] {
    q_sample_kernel<scalar_t>(x0, steps, sqrt_ab.const_data_ptr<float>(),
                              sqrt_1m_ab.const_data_ptr<float>(),
                              noise ? noise->const_data_ptr<scalar_t>() : nullptr,
                              static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), l, xt,
                              eps);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> q_sample_randn_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                      const at::Tensor& sqrt_ab,
                                                      const at::Tensor& sqrt_1m_ab, int64_t seed,
                                                      int64_t offset) {
  at::Tensor xt = at::empty_like(x0);
  at::Tensor eps = at::empty_like(x0);
  q_sample_impl(x0, t, sqrt_ab, sqrt_1m_ab, nullptr, seed, offset, xt, &eps);
  return {xt, eps};
}

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                        const at::Tensor& sqrt_1m_ab, const at::Tensor& noise) {
  at::Tensor xt = at::empty_like(x0);
  q_sample_impl(x0, t, sqrt_ab, sqrt_1m_ab, &noise, 0, 0, xt, nullptr);
  return xt;
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("q_sample_randn", &q_sample_randn_cpu);
  m.impl("q_sample", &q_sample_cpu);
}

}  // namespace ddpm_fast
