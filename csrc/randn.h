// fill_randn_: the shared Philox stream written into a contiguous tensor;
// element j of sample n takes counter offset + n * sample_stride + j.
#pragma once

#include <ATen/core/Tensor.h>

#include "layout.h"

namespace ddpm_fast {

inline void check_randn_out(const at::Tensor& out) {
  TORCH_CHECK(is_supported_float(out.scalar_type()),
              "ddpm_fast: randn output must be float32, float16 or bfloat16, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "ddpm_fast: randn output must be contiguous");
}

inline RandnCounters randn_counters(const at::Tensor& out, int64_t offset, int64_t sample_stride) {
  check_randn_out(out);
  TORCH_CHECK(sample_stride >= 0, "ddpm_fast: sample_stride must be >= 0, got ", sample_stride);
  const int64_t per_sample = out.dim() > 0 && out.size(0) > 0 ? out.numel() / out.size(0) : out.numel();
  return {static_cast<uint64_t>(offset), static_cast<uint64_t>(sample_stride == 0 ? per_sample : sample_stride),
          per_sample > 0 ? per_sample : 1};
}

void fill_randn_cpu(at::Tensor& out, int64_t seed, int64_t offset, int64_t sample_stride);
void fill_randn_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t sample_stride);

}  // namespace ddpm_fast
