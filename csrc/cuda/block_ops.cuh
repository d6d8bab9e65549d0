// Torch-free device helpers: 16-byte packets and block reductions. Kept apart
// from cuda_utils.cuh (which needs c10) so that tests/cuda_emulation can run
// the kernels that use them on the CPU.
#pragma once

#include <cstdint>

namespace ddpm_fast {
namespace cuda {

// N elements of T loaded or stored with one instruction (16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Packet {
  T v[N];
};

constexpr int kThreads = 256;

// Sum of v over runs of `width` consecutive threads (a power of two dividing
// blockDim.x, itself a multiple of 32), in a fixed order: the run's total is
// returned to its first thread (other threads get partial sums). Every thread
// of the block must call it. `scratch` is blockDim.x / 32 floats of shared
// memory, used (with two barriers) only when a run spans several warps.
__device__ __forceinline__ float run_sum(float v, int width, float* scratch) {
  for (int o = (width < 32 ? width : 32) / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (width <= 32) return v;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x % width == 0) {
    for (int w = warp + 1; w < warp + width / 32; ++w) v += scratch[w];
  }
  __syncthreads();  // scratch may be reused by the next call
  return v;
}

}  // namespace cuda
}  // namespace ddpm_fast
