// fill_randn_ on the CPU.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../randn.h"
#include "normal_cpu.h"

namespace ddpm_fast {

void fill_randn_cpu(at::Tensor& out, int64_t seed, int64_t offset, int64_t sample_stride) {
  const RandnCounters c = randn_counters(out, offset, sample_stride);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  DDPM_DISPATCH_FLOAT_TYPES(out.scalar_type(), "fill_randn_cpu", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, numel, 16 * cpu::kNormalBlock, [&](int64_t begin, int64_t end) {
      uint64_t ctr[cpu::kNormalBlock];
      float z[cpu::kNormalBlock];
      int64_t n = begin / c.per_sample, j = begin % c.per_sample;  // then advanced, not divided
      for (int64_t p0 = begin; p0 < end; p0 += cpu::kNormalBlock) {
        const int64_t count = std::min(cpu::kNormalBlock, end - p0);
        const uint64_t first = c.offset + static_cast<uint64_t>(n) * c.sample_stride + static_cast<uint64_t>(j);
        if (j + count <= c.per_sample) {  // the block lies in one sample: consecutive counters
          cpu::normal_run(static_cast<uint64_t>(seed), first, z);
          j += count;
        } else {
          for (int64_t i = 0; i < cpu::kNormalBlock; ++i) {
            ctr[i] = c.offset + static_cast<uint64_t>(n) * c.sample_stride + static_cast<uint64_t>(j);
            if (i < count && ++j == c.per_sample) {
              j = 0;
              ++n;
            }
          }
          cpu::normal_block(static_cast<uint64_t>(seed), ctr, z);
        }
        if (j == c.per_sample) {
          j = 0;
          ++n;
        }
        for (int64_t i = 0; i < count; ++i) dst[p0 + i] = static_cast<scalar_t>(z[i]);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) { m.impl("fill_randn_", &fill_randn_cpu); }

}  // namespace ddpm_fast
