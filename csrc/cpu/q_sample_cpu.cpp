// q_sample on the CPU: one pass over x0, noise drawn (or read) in blocks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../q_sample.h"
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

  at::parallel_for(0, l.numel, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t B = cpu::kNormalBlock;
    uint64_t ctr[B];
    float z[B], a[B], b[B];
    for (int64_t p0 = begin; p0 < end; p0 += B) {
      const int64_t count = std::min(B, end - p0);
      // Runs of elements within one sample: scalar coefficients, and (NCHW)
      // consecutive counters, in loops the compiler vectorizes.
      for (int64_t i0 = 0; i0 < count;) {
        const int64_t n = (p0 + i0) / l.per_sample;
        const int64_t i1 = std::min(count, (n + 1) * l.per_sample - p0);
        const int64_t step = t[per_sample_t ? n : 0];
        std::fill(a + i0, a + i1, sqrt_ab[step]);
        std::fill(b + i0, b + i1, sqrt_1m_ab[step]);
        if (noise == nullptr && !l.channels_last) {
          for (int64_t i = i0; i < i1; ++i) ctr[i] = offset + static_cast<uint64_t>(p0 + i);
        } else if (noise == nullptr) {  // NHWC memory: logical index (n, c, hw) of each position
          const int64_t q0 = p0 + i0 - n * l.per_sample;
          int64_t c = q0 % l.channels, hw = q0 / l.channels;
          for (int64_t i = i0; i < i1; ++i) {
            ctr[i] = offset + static_cast<uint64_t>(n * l.per_sample + c * l.spatial + hw);
            if (++c == l.channels) {
              c = 0;
              ++hw;
            }
          }
        }
        i0 = i1;
      }
      if (noise == nullptr) {
        std::fill(ctr + count, ctr + B, 0);  // lanes past the end: discarded
        cpu::normal_block(seed, ctr, z);
      } else {
        for (int64_t i = 0; i < count; ++i) z[i] = static_cast<float>(noise[p0 + i]);
      }
      for (int64_t i = 0; i < count; ++i) {
        out[p0 + i] = static_cast<scalar_t>(a[i] * static_cast<float>(x[p0 + i]) + b[i] * z[i]);
      }
      if (eps_out != nullptr) {
        for (int64_t i = 0; i < count; ++i) eps_out[p0 + i] = static_cast<scalar_t>(z[i]);
      }
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
