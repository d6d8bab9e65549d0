// fill_randn_ on the CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../randn.h"
#include "normal_cpu.h"

namespace ddpm_fast {

void fill_randn_cpu(at::Tensor& out, int64_t seed, int64_t offset) {
  check_randn_out(out);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  DDPM_DISPATCH_FLOAT_TYPES(out.scalar_type(), "fill_randn_cpu", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, 16 * cpu::kNormalBlock, [&](int64_t begin, int64_t end) {
      uint64_t ctr[cpu::kNormalBlock];
      float z[cpu::kNormalBlock];
      for (int64_t p0 = begin; p0 < end; p0 += cpu::kNormalBlock) {
        const int64_t n = std::min(cpu::kNormalBlock, end - p0);
        for (int64_t i = 0; i < cpu::kNormalBlock; ++i) {
          ctr[i] = static_cast<uint64_t>(offset) + static_cast<uint64_t>(p0 + i);
        }
        cpu::normal_block(static_cast<uint64_t>(seed), ctr, z);
        for (int64_t i = 0; i < n; ++i) dst[p0 + i] = static_cast<scalar_t>(z[i]);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("fill_randn_", &fill_randn_cpu); }

}  // namespace ddpm_fast
