// Launch helpers shared by the CUDA kernels' host code (needs c10).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "block_ops.cuh"
#include "philox_normal.cuh"

namespace ddpm_fast {
namespace cuda {

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
