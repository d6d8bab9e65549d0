// A CPU stand-in for the part of CUDA our kernels use, so that their logic
// (indexing, packets, reductions, barriers) is tested where there is no GPU.
// Blocks run one after another; a block's threads run as real threads, with a
// barrier for __syncthreads and a per-warp exchange for shuffles. The blocks of
// a thread-block cluster (launch_cluster) run at once, each with its own
// shared memory, for cooperative_groups' cluster barriers and
// map_shared_rank; kernels launched so use dynamic shared memory only (a
// __shared__ static would be shared by the cluster's blocks). It says
// nothing about speed, and not everything about the memory model: the GPU
// tests still decide. Include it before the kernels.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define DDPM_CUDA_EMULATION 1
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
inline thread_local Block* block = nullptr;  // the calling thread's block

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
        block = &state;
        thread_idx = {t, 0, 0};
        block_idx = {b, 0, 0};
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

// A thread-block cluster: its blocks, and a barrier over all their threads.
struct Cluster {
  Cluster(unsigned blocks, unsigned threads, size_t shared_bytes) : all(blocks * threads) {
    for (unsigned r = 0; r < blocks; ++r) {
      members.push_back(std::make_unique<Block>(threads, shared_bytes));
      running.push_back(std::make_unique<std::atomic<unsigned>>(threads));
      needed.push_back(std::make_unique<std::atomic<unsigned>>(0));
    }
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<Block>> members;
  std::vector<std::unique_ptr<std::atomic<unsigned>>> running;  // threads of each block not yet returned
  // Per block: 1 + the most cluster-barrier arrivals another block's thread had
  // made when it mapped this block's shared memory (0: never mapped). The
  // block may exit only once it has completed that many barriers: the
  // mapping thread's next arrival (after its reads) is then behind it.
  std::vector<std::unique_ptr<std::atomic<unsigned>>> needed;
};

inline thread_local Cluster* cluster = nullptr;
inline thread_local unsigned cluster_rank = 0;
inline thread_local std::optional<std::barrier<>::arrival_token> cluster_token;
inline thread_local unsigned cluster_arrivals = 0, cluster_completed = 0;  // the calling thread's barriers

// Runs kernel(args...) over `grid` blocks of `threads` threads in clusters of
// `cluster_size` consecutive blocks (grid a multiple of it), a cluster's
// blocks at once. A block whose thread returns before a cluster barrier that
// every block mapping its shared memory arrived at after mapping it (a read of
// an exited block's shared memory, which the GPU does not allow) aborts; its
// shared memory is poisoned (NaN) as its last thread returns.
template <typename Kernel, typename... Args>
void launch_cluster(Kernel kernel, unsigned grid, unsigned cluster_size, unsigned threads, size_t shared_bytes,
                    Args... args) {
  block_dim = {threads, 1, 1};
  grid_dim = {grid, 1, 1};
  if (cluster_size == 0 || grid % cluster_size != 0) std::abort();
  for (unsigned c0 = 0; c0 < grid; c0 += cluster_size) {
    Cluster state(cluster_size, threads, shared_bytes);
    std::vector<std::thread> pool;
    for (unsigned r = 0; r < cluster_size; ++r) {
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, r, t] {
          block = state.members[r].get();
          cluster = &state;
          cluster_rank = r;
          thread_idx = {t, 0, 0};
          block_idx = {c0 + r, 0, 0};
          kernel(args...);
          if (cluster_completed < state.needed[r]->load()) {
            std::fprintf(stderr, "emulate.h: block %u exited while its cluster may read its shared memory\n", c0 + r);
            std::abort();
          }
          if (state.running[r]->fetch_sub(1) == 1) {
            std::memset(block->shared.data(), 0xFF, block->shared.size());
          }
        });
      }
    }
    for (auto& th : pool) th.join();
  }
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

// cooperative_groups' cluster, as the kernels use it (launch_cluster).
namespace cooperative_groups {
struct cluster_group {
  static void sync() {
    ++emu::cluster_arrivals;
    emu::cluster->all.arrive_and_wait();
    ++emu::cluster_completed;
  }
  static void barrier_arrive() {
    ++emu::cluster_arrivals;
    emu::cluster_token.emplace(emu::cluster->all.arrive());
  }
  static void barrier_wait() {
    emu::cluster->all.wait(std::move(*emu::cluster_token));
    emu::cluster_token.reset();
    ++emu::cluster_completed;
  }
  // addr, a shared-memory address of the calling block, in block `rank`'s shared memory.
  template <typename T>
  static T* map_shared_rank(T* addr, int rank) {
    if (static_cast<unsigned>(rank) != emu::cluster_rank) {
      std::atomic<unsigned>& needed = *emu::cluster->needed[rank];
      const unsigned want = emu::cluster_arrivals + 1;
      for (unsigned n = needed.load(); n < want && !needed.compare_exchange_weak(n, want);) {
      }
    }
    const std::ptrdiff_t offset = reinterpret_cast<unsigned char*>(addr) - emu::block->shared.data();
    return reinterpret_cast<T*>(emu::cluster->members[rank]->shared.data() + offset);
  }
  static unsigned block_rank() { return emu::cluster_rank; }
  static unsigned num_blocks() { return static_cast<unsigned>(emu::cluster->members.size()); }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

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
