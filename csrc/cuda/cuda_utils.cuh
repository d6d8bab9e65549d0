// Launch helpers shared by the *_launch.cu files (C10_CUDA_CHECK needs c10).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>

#include "block_ops.cuh"
#include "philox_normal.cuh"

namespace ddpm_fast {
namespace cuda {

template <int N, typename... Ptrs>
bool all_aligned(const Ptrs*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % (N) == 0) && ...);
}

// Enough blocks to fill the current GPU several times over; kernels loop over
// the rest. Its SM count is read once per device (GPUs of one machine may differ).
inline int64_t grid_size(int64_t work_items) {
  static std::mutex mutex;
  static std::map<int, int64_t> max_blocks;  // by device
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int64_t blocks = 0;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = max_blocks.find(device); it != max_blocks.end()) blocks = it->second;
  }
  if (blocks == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    blocks = int64_t{sms} * 16;
    const std::lock_guard<std::mutex> lock(mutex);
    max_blocks.emplace(device, blocks);
  }
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(needed, blocks));
}

}  // namespace cuda
}  // namespace ddpm_fast
