// Checks what emulate.h promises about barriers, so that the kernels' tests
// under it can fail: each mode runs a small kernel and prints what it saw.
// Used by tests/test_cuda_kernels_emulated.py.
//
//   emulate_selftest synced       a neighbour's shared write read after __syncthreads: prints "ok"
//   emulate_selftest unsynced     the same read without the barrier: prints "unwritten <count>"
//   emulate_selftest divergent    __syncthreads in a branch half the threads take: aborts
//   emulate_selftest cluster_exit a block reads another's shared memory, which may exit first: aborts
#include "emulate.h"

#include <cstring>
#include <vector>

namespace {

constexpr unsigned kThreads = 64, kGrid = 2;

// out[block, t] = the value thread t + 1 (t - 1 in odd blocks) wrote to shared memory.
__global__ void neighbour_kernel(float* out, bool sync) {
  DDPM_DYNAMIC_SHARED(float, values);
  const unsigned t = threadIdx.x, next = blockIdx.x % 2 ? (t + kThreads - 1) % kThreads : (t + 1) % kThreads;
  values[t] = static_cast<float>(t);
  if (sync) __syncthreads();
  out[blockIdx.x * kThreads + t] = values[next];
}

__global__ void divergent_kernel() {
  if (threadIdx.x % 2 == 0) __syncthreads();
}

// Block 1 reads block 0's shared memory and waits on the cluster; block 0 exits without waiting.
__global__ void cluster_exit_kernel(float* out) {
  DDPM_DYNAMIC_SHARED(float, values);
  auto cluster = cooperative_groups::this_cluster();
  values[threadIdx.x] = 1.0f;
  cluster.sync();
  if (cluster.block_rank() == 1) out[threadIdx.x] = *cluster.map_shared_rank(values + threadIdx.x, 0);
  if (cluster.block_rank() == 1) cluster.sync();
}

}  // namespace

int main(int argc, char** argv) {
  const char* mode = argc > 1 ? argv[1] : "";
  std::vector<float> out(kGrid * kThreads, -1.0f);
  if (!std::strcmp(mode, "synced") || !std::strcmp(mode, "unsynced")) {
    const bool sync = !std::strcmp(mode, "synced");
    emu::launch(neighbour_kernel, kGrid, kThreads, kThreads * sizeof(float), out.data(), sync);
    unsigned wrong = 0, unwritten[kGrid] = {};
    for (unsigned b = 0; b < kGrid; ++b) {
      for (unsigned t = 0; t < kThreads; ++t) {
        const unsigned next = b % 2 ? (t + kThreads - 1) % kThreads : (t + 1) % kThreads;
        const float v = out[b * kThreads + t];
        unwritten[b] += std::isnan(v);
        wrong += !std::isnan(v) && v != static_cast<float>(next);
      }
    }
    if (wrong) std::printf("wrong %u\n", wrong);
    else if (unwritten[0] || unwritten[1]) std::printf("unwritten %u %u\n", unwritten[0], unwritten[1]);
    else std::printf("ok\n");
  } else if (!std::strcmp(mode, "divergent")) {
    emu::launch(divergent_kernel, 1, kThreads, 0);
    std::printf("returned\n");
  } else if (!std::strcmp(mode, "cluster_exit")) {
    emu::launch_cluster(cluster_exit_kernel, 2, 2, kThreads, kThreads * sizeof(float), out.data());
    std::printf("returned\n");
  } else {
    std::fprintf(stderr, "usage: emulate_selftest synced|unsynced|divergent|cluster_exit\n");
    return 2;
  }
  return 0;
}
