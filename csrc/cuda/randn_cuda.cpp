// fill_randn_ on the GPU: the op's checks; the launch is in randn_launch.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../randn.h"
#include "launch.h"

namespace ddpm_fast {

void fill_randn_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t sample_stride) {
  const RandnCounters c = randn_counters(out, offset, sample_stride);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DDPM_DISPATCH_FLOAT_TYPES(out.scalar_type(), "fill_randn_cuda", [&] {
    cuda::launch_fill_randn(out.mutable_data_ptr<scalar_t>(), numel, static_cast<uint64_t>(seed), c, stream);
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("fill_randn_", &fill_randn_cuda); }

}  // namespace ddpm_fast
