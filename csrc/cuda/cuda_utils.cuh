// Device-side normal sampling and launch helpers shared by the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../philox.h"
#include "block_ops.cuh"

namespace ddpm_fast {
namespace cuda {

// The stream's normal for one counter (csrc/philox.h), with CUDA's libm.
__device__ __forceinline__ float philox_normal(uint64_t seed, uint64_t counter) {
  const PhiloxPair r = philox_pair(seed, counter);
  const float u1 = fmaxf(kMinUniform, uint_to_uniform(r.x));
  const float u2 = uint_to_uniform(r.y);
  return sqrtf(-2.0f * logf(u1)) * cosf(kTwoPi * u2);
}

template <int N, typename... Ptrs>
bool all_aligned(const Ptrs*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % (N) == 0) && ...);
}

// Enough blocks to fill the GPU several times over; kernels loop over the rest.
inline int64_t grid_size(int64_t work_items) {
  static int max_blocks = [] {
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms * 16;
  }();
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, max_blocks));
}

}  // namespace cuda
}  // namespace ddpm_fast
