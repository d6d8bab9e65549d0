// fill_randn_ on the GPU: kVec consecutive normals per thread, one 16-byte store.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../randn.h"
#include "cuda_utils.cuh"

namespace ddpm_fast {
namespace {

__device__ __forceinline__ uint64_t counter_of(int64_t i, const RandnCounters& c) {
  const int64_t n = i / c.per_sample;
  return c.offset + static_cast<uint64_t>(n) * c.sample_stride + static_cast<uint64_t>(i - n * c.per_sample);
}

template <typename T, int kVec>
__global__ void fill_randn_kernel(T* __restrict__ out, int64_t numel, uint64_t seed, RandnCounters c) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
       p < numel; p += stride) {
    if (p + kVec <= numel) {
      cuda::Packet<T, kVec> pk;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        pk.v[i] = static_cast<T>(cuda::philox_normal(seed, counter_of(p + i, c)));
      }
      *reinterpret_cast<cuda::Packet<T, kVec>*>(out + p) = pk;
    } else {
      for (int64_t q = p; q < numel; ++q) {
        out[q] = static_cast<T>(cuda::philox_normal(seed, counter_of(q, c)));
      }
    }
  }
}

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
      fill_randn_kernel<scalar_t, kVec>
          <<<cuda::grid_size((numel + kVec - 1) / kVec), cuda::kThreads, 0, stream>>>(
              dst, numel, static_cast<uint64_t>(seed), c);
    } else {
      fill_randn_kernel<scalar_t, 1><<<cuda::grid_size(numel), cuda::kThreads, 0, stream>>>(
          dst, numel, static_cast<uint64_t>(seed), c);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("fill_randn_", &fill_randn_cuda); }

}  // namespace ddpm_fast
