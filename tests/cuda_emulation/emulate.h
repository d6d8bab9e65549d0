// A CPU stand-in for the part of CUDA our kernels use, so that their logic
// (indexing, packets, reductions, barriers) is tested where there is no GPU.
// Blocks run one after another; a block's threads run as real threads, with a
// barrier for __syncthreads and a per-warp exchange for shuffles. It says
// nothing about speed, and not everything about the memory model: the GPU
// tests still decide. Include it before the kernels.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time, so a function's static is what its block's threads share.
#define __shared__ static
#define DDPM_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::dynamic_shared())

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

struct Block {
  explicit Block(unsigned threads, size_t shared_bytes)
      : all(threads), lanes(threads), shared(shared_bytes + 16, 0xFF) {  // 0xFF..: NaN until written
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;
  std::vector<unsigned char> shared;
};

inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline Block* block = nullptr;

inline unsigned char* dynamic_shared() { return block->shared.data(); }

// Runs kernel(args...) over `grid` blocks of `threads` threads (a multiple of 32).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t shared_bytes, Args... args) {
  block_dim = {threads, 1, 1};
  grid_dim = {grid, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    Block state(threads, shared_bytes);
    block = &state;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        thread_idx = {t, 0, 0};
        block_idx = {b, 0, 0};
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
  block = nullptr;
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }

// Every lane of the warp must call it, as on the GPU with a full mask.
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  std::barrier<>& warp = *emu::block->warps[t / 32];
  emu::block->lanes[t] = v;
  warp.arrive_and_wait();
  const float other = emu::block->lanes[(t & ~31u) | ((t % 32) ^ static_cast<unsigned>(lane_mask))];
  warp.arrive_and_wait();
  return other;
}

inline float __expf(float v) { return std::exp(v); }
template <typename T>
T __ldg(const T* p) {
  return *p;
}
inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
using std::isfinite;  // CUDA's isfinite(float), a device function in the global namespace

namespace emu {

using half = _Float16;  // IEEE binary16, rounded to nearest even like the GPU's

// bfloat16 as the GPU rounds it (to nearest even), to run the 8-wide packets.
struct bf16 {
  uint16_t bits;
  bf16() = default;
  bf16(float f) {  // NOLINT: implicit, like the CUDA type
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    bits = static_cast<uint16_t>(u >> 16);
  }
  operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

}  // namespace emu
