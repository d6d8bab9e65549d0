// Timesteps read on the host for the CPU kernels, where checking their range
// costs nothing (on the GPU it would need a sync, so kernels write NaN instead).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace ddpm_fast {
namespace cpu {

inline std::vector<int64_t> read_timesteps(const at::Tensor& t, int64_t num_steps) {
  const at::Tensor flat = t.reshape({-1});
  const int64_t* p = flat.const_data_ptr<int64_t>();
  std::vector<int64_t> steps(p, p + flat.numel());
  for (int64_t v : steps) {
    TORCH_CHECK(v >= 0 && v < num_steps, "ddpm_fast: timestep ", v, " is out of range [0, ", num_steps, ")");
  }
  return steps;
}

}  // namespace cpu
}  // namespace ddpm_fast
