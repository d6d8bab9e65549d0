// fill_randn_: the shared Philox stream written into a tensor, element i
// (in logical order) taking counter offset + i.
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

void fill_randn_cpu(at::Tensor& out, int64_t seed, int64_t offset);
void fill_randn_cuda(at::Tensor& out, int64_t seed, int64_t offset);

}  // namespace ddpm_fast
