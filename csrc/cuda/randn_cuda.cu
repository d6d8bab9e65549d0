// fill_randn_ on the GPU: kVec consecutive normals per thread, one 16-byte store.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../randn.h"
#include "cuda_utils.cuh"
#include "randn_kernels.cuh"

namespace ddpm_fast {
namespace {

}  // namespace

void fill_randn_cuda(at::Tensor& out, int64_t seed, int64_t offset, int64_t sample_stride) {
  const RandnCounters c = randn_counters(out, offset, sample_stride);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  DDPM_DISPATCH_FLOAT_TYPES(out.scalar_type(), "fill_randn_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    if (cuda::all_aligned<16>(dst)) {
      cuda::fill_randn_kernel<scalar_t, kVec>
          <<<cuda::grid_size((numel + kVec - 1) / kVec), cuda::kThreads, 0, stream>>>(
              dst, numel, static_cast<uint64_t>(seed), c);
    } else {
      cuda::fill_randn_kernel<scalar_t, 1><<<cuda::grid_size(numel), cuda::kThreads, 0, stream>>>(
          dst, numel, static_cast<uint64_t>(seed), c);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("fill_randn_", &fill_randn_cuda); }

}  // namespace ddpm_fast
