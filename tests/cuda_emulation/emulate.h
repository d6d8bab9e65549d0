// A CPU stand-in for the part of CUDA our kernels use, so that their logic
// (indexing, packets, reductions, barriers) is tested where there is no GPU.
// Blocks run one after another; a block's threads run as fibers (ucontext, each
// on its own stack with a guard page) that one OS thread switches between at
// barriers (__syncthreads, a warp's exchange for shuffles, cluster barriers). A
// fiber runs until it waits at a barrier, and the threads run in ascending
// order in even blocks, descending in odd ones: a thread that reads another's
// write with no barrier between them reads it before it is made in one of the
// two orders, and dynamic shared memory starts as NaN, so the read shows. A
// missing barrier between a read and a later overwrite shows in every fourth
// block, where thread 0 is starved (it runs only when no other thread can, so
// the others overwrite what it has yet to read). A barrier that
// not every thread reaches (one inside a divergent branch) aborts as a
// deadlock. The blocks of a thread-block cluster (launch_cluster) run at once,
// each with its own shared memory, for cooperative_groups' cluster barriers and
// map_shared_rank; kernels launched so use dynamic shared memory only (a
// __shared__ static would be shared by the cluster's blocks). It says nothing
// about speed, and not everything about the memory model: the GPU tests still
// decide. Include it before the kernels.
// (Real threads and std::barrier did this until 2026-12: about 10 times slower
// on 2 cores, most of it in the OS's scheduler.)
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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

// One GPU thread: its saved context, and what CUDA tells it.
struct Fiber {
  ucontext_t context;
  dim3 thread_idx, block_idx;
  struct Block* block = nullptr;
  unsigned cluster_rank = 0;
  unsigned cluster_token = 0;                          // the generation of its pending cluster arrival
  bool starved = false;  // resumed only in rounds after one where no other fiber moved (see run)
  unsigned cluster_arrivals = 0, cluster_completed = 0;  // its cluster barriers
  bool done = false;
};

inline Fiber* current = nullptr;  // the running fiber
inline ucontext_t scheduler;      // where a fiber yields to
inline uint64_t events = 0;       // barrier arrivals and finished fibers, to detect a deadlock
inline dim3 block_dim, grid_dim;
constexpr size_t kStack = 128 * 1024, kGuard = 4096;

inline void yield() { swapcontext(&current->context, &scheduler); }

// A barrier for `expected` fibers: arrive() returns the generation to wait out.
struct Barrier {
  explicit Barrier(unsigned n) : expected(n) {}
  unsigned arrive() {
    const unsigned generation_now = generation;
    if (++count == expected) {
      count = 0;
      ++generation;
    }
    ++events;
    return generation_now;
  }
  void wait(unsigned token) {
    while (generation == token) yield();
  }
  void arrive_and_wait() { wait(arrive()); }
  unsigned expected, count = 0, generation = 0;
};

struct Block {
  explicit Block(unsigned threads, size_t shared_bytes)
      : all(threads), warps(threads / 32, Barrier(32)), lanes(threads), shared(shared_bytes + 16, 0xFF) {}  // 0xFF..: NaN
  Barrier all;
  std::vector<Barrier> warps;
  std::vector<float> lanes;
  std::vector<unsigned char> shared;
};

inline unsigned char* dynamic_shared() { return current->block->shared.data(); }

// Stacks for fibers, each 128 KiB above a guard page (an overflow faults),
// kept from launch to launch: mapping them per block cost more than the run.
inline char* stack_of(size_t i) {
  constexpr size_t kEach = kStack + kGuard;
  static std::vector<char*> mapped;
  while (mapped.size() <= i) {
    void* memory = mmap(nullptr, kEach, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED || mprotect(memory, kGuard, PROT_NONE) != 0) std::abort();
    mapped.push_back(static_cast<char*>(memory) + kGuard);
  }
  return mapped[i];
}

// Runs `body` once in each of `fibers` (set up by the caller, not yet started)
// until all have returned, resuming them in the vector's order (starved ones
// only in a round after one that moved no other fiber); aborts when a whole
// round that skipped none leaves every waiting fiber waiting.
inline void run(std::vector<Fiber>& fibers, const std::function<void()>& body) {
  static const std::function<void()>* running_body;
  running_body = &body;
  const size_t n = fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    getcontext(&f.context);
    f.context.uc_stack = {stack_of(i), 0, kStack};
    f.context.uc_link = &scheduler;  // where the fiber goes when body returns
    makecontext(&f.context, +[] {
      (*running_body)();
      current->done = true;
      ++events;
    }, 0);
  }
  bool stalled = false;  // the last round moved no fiber: starved ones run in this one
  for (size_t live = n; live > 0;) {
    const uint64_t before = events;
    bool skipped = false;
    for (size_t k = 0; k < n; ++k) {
      Fiber& f = fibers[k];
      if (f.done) continue;
      if (f.starved && !stalled) {
        skipped = true;
        continue;
      }
      current = &f;
      swapcontext(&scheduler, &f.context);
      live -= f.done;
    }
    stalled = events == before;
    if (live > 0 && stalled && !skipped) {
      std::fprintf(stderr, "emulate.h: deadlock: %zu threads wait at barriers no other thread will reach\n", live);
      std::abort();
    }
  }
  current = nullptr;
}

// The fibers' order in block b: ascending in even blocks, descending in odd ones.
inline unsigned thread_in_order(unsigned b, unsigned k, unsigned threads) { return b % 2 ? threads - 1 - k : k; }
// In every fourth block (b % 4 == 3) thread 0 is starved: it runs only when no
// other thread can, and yields after each block barrier, so that the other
// warps run ahead past it. A shared value thread 0 reads after a barrier but
// another thread overwrites with no barrier between (a write-after-read race,
// e.g. scratch reused by the next reduction) is then overwritten first.
inline bool starved_in(unsigned b, unsigned thread) { return b % 4 == 3 && thread == 0; }

// A thread-block cluster: its blocks, and a barrier over all their threads.
struct Cluster {
  Cluster(unsigned blocks, unsigned threads, size_t shared_bytes) : all(blocks * threads) {
    for (unsigned r = 0; r < blocks; ++r) {
      members.push_back(std::make_unique<Block>(threads, shared_bytes));
      running.push_back(threads);
      needed.push_back(0);
    }
  }
  Barrier all;
  std::vector<std::unique_ptr<Block>> members;
  std::vector<unsigned> running;  // threads of each block not yet returned
  // Per block: 1 + the most cluster-barrier arrivals another block's thread had
  // made when it mapped this block's shared memory (0: never mapped). The
  // block may exit only once it has completed that many barriers: the
  // mapping thread's next arrival (after its reads) is then behind it.
  std::vector<unsigned> needed;
};

inline Cluster* cluster = nullptr;  // the running cluster

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
    cluster = &state;
    std::vector<Fiber> fibers(cluster_size * threads);
    for (unsigned r = 0; r < cluster_size; ++r) {
      for (unsigned k = 0; k < threads; ++k) {
        Fiber& f = fibers[r * threads + k];
        f.block = state.members[r].get();
        f.cluster_rank = r;
        f.thread_idx = {thread_in_order(c0 + r, k, threads), 0, 0};
        f.starved = starved_in(c0 + r, f.thread_idx.x);
        f.block_idx = {c0 + r, 0, 0};
      }
    }
    run(fibers, [&] {
      kernel(args...);
      const unsigned r = current->cluster_rank;
      if (current->cluster_completed < state.needed[r]) {
        std::fprintf(stderr, "emulate.h: block %u exited while its cluster may read its shared memory\n", c0 + r);
        std::abort();
      }
      if (--state.running[r] == 0) std::memset(current->block->shared.data(), 0xFF, current->block->shared.size());
    });
    cluster = nullptr;
  }
}

// Runs kernel(args...) over `grid` blocks of `threads` threads (a multiple of
// 32), one block at a time: clusters of one block.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, unsigned grid, unsigned threads, size_t shared_bytes, Args... args) {
  launch_cluster(kernel, grid, 1, threads, shared_bytes, args...);
}

}  // namespace emu

#define threadIdx (emu::current->thread_idx)
#define blockIdx (emu::current->block_idx)
#define blockDim emu::block_dim
#define gridDim emu::grid_dim

inline void __syncthreads() {
  emu::current->block->all.arrive_and_wait();
  if (emu::current->starved) {  // released last, it lets the others run ahead (a step: no deadlock)
    ++emu::events;
    emu::yield();
  }
}

// Every lane of the warp must call it, as on the GPU with a full mask.
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  const unsigned t = threadIdx.x;
  emu::Block& block = *emu::current->block;
  emu::Barrier& warp = block.warps[t / 32];
  block.lanes[t] = v;
  warp.arrive_and_wait();
  const float other = block.lanes[(t & ~31u) | ((t % 32) ^ static_cast<unsigned>(lane_mask))];
  warp.arrive_and_wait();
  return other;
}

// cooperative_groups' cluster, as the kernels use it (launch_cluster).
namespace cooperative_groups {
struct cluster_group {
  static void sync() {
    barrier_arrive();
    barrier_wait();
  }
  static void barrier_arrive() {
    ++emu::current->cluster_arrivals;
    emu::current->cluster_token = emu::cluster->all.arrive();
  }
  static void barrier_wait() {
    emu::cluster->all.wait(emu::current->cluster_token);
    ++emu::current->cluster_completed;
  }
  // addr, a shared-memory address of the calling block, in block `rank`'s shared memory.
  template <typename T>
  static T* map_shared_rank(T* addr, int rank) {
    if (static_cast<unsigned>(rank) != emu::current->cluster_rank) {
      unsigned& needed = emu::cluster->needed[rank];
      needed = std::max(needed, emu::current->cluster_arrivals + 1);
    }
    const std::ptrdiff_t offset = reinterpret_cast<unsigned char*>(addr) - emu::current->block->shared.data();
    return reinterpret_cast<T*>(emu::cluster->members[rank]->shared.data() + offset);
  }
  static unsigned block_rank() { return emu::current->cluster_rank; }
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
