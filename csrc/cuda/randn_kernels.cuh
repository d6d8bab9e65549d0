// fill_randn_'s device code (host side: randn_launch.cu, randn_cuda.cpp).
// Torch-free, so that tests/cuda_emulation can run it on the CPU.
#pragma once

#include <cstdint>

#include "../kernel_args.h"
#include "block_ops.cuh"
#include "philox_normal.cuh"

namespace ddpm_fast {
namespace cuda {

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

}  // namespace cuda
}  // namespace ddpm_fast
