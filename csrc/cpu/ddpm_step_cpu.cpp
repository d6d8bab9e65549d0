// The reverse step on the CPU: one pass, noise drawn in blocks where sigma != 0.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../ddpm_step.h"
#include "float16_cpu.h"
#include "normal_cpu.h"
#include "timesteps_cpu.h"

namespace ddpm_fast {
namespace {

// Index in the model-input buffer of the elements [p0, p0 + count): the same
// position, or (other memory format) the transposed position within the sample.
void model_input_index(const StepLayout& s, int64_t p0, int64_t count, int64_t* index) {
  int64_t n = p0 / s.per_sample;
  const int64_t q0 = p0 - n * s.per_sample;
  int64_t outer = q0 / s.inner, inner = q0 % s.inner;
  for (int64_t i = 0; i < count; ++i) {
    index[i] = s.model_input_other ? n * s.per_sample + inner * s.outer + outer : p0 + i;
    if (++inner == s.inner) {
      inner = 0;
      if (++outer == s.outer) {
        outer = 0;
        ++n;
      }
    }
  }
}

// The model input of elements [p0, p0 + count), from their values y: in
// place (a block converted at once) where it has x's memory format, else
// scattered (index: count of scratch).
template <typename M>
void store_model_input(M* dst, const StepLayout& s, int64_t p0, int64_t count, const float* y, int64_t* index) {
  if (!s.model_input_other) {
    cpu::from_float_row(y, count, dst + p0);
    return;
  }
  model_input_index(s, p0, count, index);
  for (int64_t i = 0; i < count; ++i) dst[index[i]] = static_cast<M>(y[i]);
}

// Counters of the elements [p0 + i0, p0 + i1), all of sample n at timestep
// `step`: base + j with j the logical index within the sample.
void noise_counters(const StepLayout& s, int64_t p0, int64_t i0, int64_t i1, int64_t n, uint64_t base,
                    uint64_t* ctr) {
  const int64_t q0 = p0 + i0 - n * s.per_sample;
  if (!s.channels_last) {
    for (int64_t i = i0; i < i1; ++i) ctr[i] = base + static_cast<uint64_t>(q0 + (i - i0));
    return;
  }
  cpu::nhwc_counters(base, s.inner, s.outer, q0, i1 - i0, ctr + i0);  // NHWC: (hw, c); j = c * HW + hw
}

template <typename X, typename E>
void step_kernel(const at::Tensor& x_t, const at::Tensor& eps_t, const std::vector<int64_t>& t, const float* table,
                 const X* noise, uint64_t seed, uint64_t offset, uint64_t sample_stride, uint64_t step_stride,
                 bool clip, const StepLayout& s, at::Tensor& out_t, const std::optional<at::Tensor>& model_input) {
  const X* x = x_t.const_data_ptr<X>();
  const E* eps = eps_t.const_data_ptr<E>();
  X* out = out_t.mutable_data_ptr<X>();
  const bool per_sample_t = t.size() > 1;
  constexpr int64_t B = cpu::kNormalBlock;
  void* mi_data = model_input.has_value() ? model_input->mutable_data_ptr() : nullptr;
  const at::ScalarType mi_type = model_input.has_value() ? model_input->scalar_type() : at::kFloat;

  at::parallel_for(0, s.numel, 16 * B, [&](int64_t begin, int64_t end) {
    uint64_t ctr[B];
    float z[B], y[B], sigma[B], x_buffer[B], eps_buffer[B];
    int64_t mi_index[B];
    cpu::NhwcNoise nhwc(seed, s.inner, s.outer);  // (C, H*W) where x is channels_last
    int64_t n = begin / s.per_sample;  // the sample of p0, advanced (not divided) below
    for (int64_t p0 = begin; p0 < end; p0 += B) {
      const int64_t count = std::min(B, end - p0);
      while (p0 >= (n + 1) * s.per_sample) ++n;
      // Runs [i0, i1) of elements within one sample: mostly the whole block,
      // with one timestep, a scalar sigma and noise from normal_run (NCHW:
      // consecutive counters) or NhwcNoise; else the block's parts, with sigma
      // per element and counters one by one.
      const bool one_sample = p0 + count <= (n + 1) * s.per_sample;
      const float* xs = cpu::as_float_row(x + p0, count, x_buffer);  // 16-bit: converted a block at a time
      const float* es = cpu::as_float_row(eps + p0, count, eps_buffer);
      bool draw = false;
      float sigma1 = 0.0f;
      uint64_t base = 0;  // one_sample: the counter of the sample's logical index 0
      for (int64_t i0 = 0; i0 < count;) {
        const int64_t m = one_sample ? n : (p0 + i0) / s.per_sample;
        const int64_t i1 = one_sample ? count : std::min(count, (m + 1) * s.per_sample - p0);
        const int64_t step = t[per_sample_t ? m : 0];
        const float* row = table + step * kStepColumns;
        if (clip) {
          for (int64_t i = i0; i < i1; ++i) y[i] = step_mean(row, xs[i], es[i], true);
        } else {
          for (int64_t i = i0; i < i1; ++i) y[i] = step_mean(row, xs[i], es[i], false);
        }
        const uint64_t run_base =
            offset + static_cast<uint64_t>(m) * sample_stride + static_cast<uint64_t>(step) * step_stride;
        if (one_sample) {
          sigma1 = row[kSigma];
          base = run_base;
        } else {
          std::fill(sigma + i0, sigma + i1, row[kSigma]);
        }
        if (row[kSigma] != 0.0f && noise == nullptr) {
          draw = true;
          if (!one_sample) noise_counters(s, p0, i0, i1, m, run_base, ctr);
        } else if (!one_sample) {
          std::fill(ctr + i0, ctr + i1, 0);  // not drawn (or drawn and discarded)
        }
        i0 = i1;
      }
      // Lanes past the end are drawn and discarded.
      const float* zs = z;  // the noise: z, or the given noise's values
      if (noise != nullptr) {
        zs = cpu::as_float_row(noise + p0, count, z);
      } else if (draw && one_sample && !s.channels_last) {
        cpu::normal_run(seed, base + static_cast<uint64_t>(p0 - n * s.per_sample), z);
      } else if (draw && one_sample) {
        nhwc.fill(base, p0 - n * s.per_sample, count, z);
      } else if (draw) {
        std::fill(ctr + count, ctr + B, 0);
        cpu::normal_block(seed, ctr, z);
      } else {
        std::fill(z, z + count, 0.0f);
      }
      if (one_sample && sigma1 != 0.0f) {
        for (int64_t i = 0; i < count; ++i) y[i] = y[i] + sigma1 * zs[i];
      } else if (!one_sample) {
        for (int64_t i = 0; i < count; ++i) y[i] = sigma[i] != 0.0f ? y[i] + sigma[i] * zs[i] : y[i];
      }
      cpu::from_float_row(y, count, out + p0);
      if (mi_data != nullptr) {
        DDPM_DISPATCH_FLOAT_TYPES(mi_type, "ddpm_step_cpu_model_input", [&] {
          store_model_input(static_cast<scalar_t*>(mi_data), s, p0, count, y, mi_index);
        });
      }
    }
  });
}

}  // namespace

void ddpm_step_cpu(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& t, const at::Tensor& coefficients,
                   const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, int64_t sample_stride,
                   int64_t step_stride, bool clip_denoised, at::Tensor& out,
                   const std::optional<at::Tensor>& model_input) {
  const StepLayout s =
      check_ddpm_step_args(x, eps, t, coefficients, noise, sample_stride, step_stride, out, model_input);
  if (s.numel == 0) return;
  const std::vector<int64_t> steps = cpu::read_timesteps(t, coefficients.size(0));
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "ddpm_step_cpu", [&] {
    using X = scalar_t;
    DDPM_DISPATCH_FLOAT_TYPES(eps.scalar_type(), "ddpm_step_cpu_eps", [&] {
      step_kernel<X, scalar_t>(x, eps, steps, coefficients.const_data_ptr<float>(),
                               noise.has_value() ? noise->const_data_ptr<X>() : nullptr,
                               static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
                               static_cast<uint64_t>(sample_stride), static_cast<uint64_t>(step_stride),
                               clip_denoised, s, out, model_input);
    });
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("ddpm_step_", &ddpm_step_cpu); }

}  // namespace ddpm_fast
