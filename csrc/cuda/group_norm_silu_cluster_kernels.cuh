// GroupNorm+SiLU on a thread-block cluster (Hopper, sm_90+): the third path of
// group_norm_silu_kernels.cuh, forward and backward, for groups too large for
// one block's shared memory (the fused path) but not for a cluster's.
//
// A cluster of K blocks (K <= 8, the portable cluster size) holds a tile of
// whole groups of one sample, all positions: block r of the cluster holds the
// r-th position tile (the Geometry's pos_tiles = K, so make_tile and the tile
// walks of the other paths apply unchanged). Each block
//   1. copies its slice of x into its shared memory, as x's own type (half
//      the bytes of float for 16-bit x), several 16-byte packets in flight
//      per thread: the one read of x;
//   2. forms per channel the float mean m of its slice, then in a second pass
//      over shared memory D = sum (x - m) and Q = sum (x - m)^2, like the
//      split path's moments_kernel: no sum cancels wherever the values lie
//      (D = 0 where m is not finite, as there);
//   3. combines its channels per group in double, in a fixed order, as the
//      split path's host combines its tile columns: the mean (with add) as the
//      sum of the columns' n m_k over the count, then M2 as the sum of the
//      columns' M2 and of n (m_k - mean)^2 (combine_parts); publishes the
//      part's mean and M2 in its shared memory;
//   4. cluster barrier; reads the K blocks' parts from their shared memory
//      (distributed shared memory, map_shared_rank), in rank order, and
//      combines them the same way: every block computes the same mean and
//      rstd, bit for bit, and the rank-0 block writes them out. It then
//      arrives at a second cluster barrier (its reads of the others' shared
//      memory are done);
//   5. writes y from shared memory (the one write), then waits at that second
//      barrier before it exits: a block's shared memory must outlive the
//      others' reads of it.
// All sums are in a fixed order: results are deterministic. Everything a block
// keeps is in dynamic shared memory (a header of per-channel and per-group
// tables, then the tile), none in static arrays.
//
// The backward (backward_cluster_kernel) works the same way with x and dy in
// shared memory (two tiles, so it fits half the group size: bfloat16 and
// float16 at the issue's layer, 32 x 128 x 256 x 256 in 32 groups, not
// float32): per-channel sums A, B, X of the
// slice, summed over the cluster's blocks in rank order, then dx. One read of
// x and dy, one write of dx, against the split backward's two reads of each.
//
// The host (group_norm_silu_launch.cu) takes this path when the fused one
// does not fit, the code was compiled for sm_90 or later, the GPU is of compute
// capability 9.0 or later with cluster launch, plan_cluster finds K <= 8 blocks
// whose shared memory holds the tile(s), and cudaOccupancyMaxActiveClusters
// says such clusters can run; otherwise the split path. DDPM_FAST_GN_CLUSTER=0
// in the environment turns the path off. Built for an older architecture the
// kernels only trap: the host never launches them there.
#pragma once

#include <cstdint>

#include "group_norm_silu_kernels.cuh"

#if defined(__CUDACC__) && !defined(DDPM_CUDA_EMULATION)
#include <cooperative_groups.h>
#endif

namespace ddpm_fast {
namespace gn {

constexpr int kClusterMaxCols = 128;  // channels per cluster tile (sizes the header's tables)
// The dynamic shared memory before the tile: per-group double mean and M2
// (published to the cluster), per-channel float m, D, Q (reused for the scale
// and shift of y), per-group float mean and rstd, the reductions' scratch.
constexpr int64_t kClusterHeaderBytes = 2 * kClusterMaxCols * 8 + 5 * kClusterMaxCols * 4 + (kBlock / 32) * 4;
static_assert(kClusterHeaderBytes % 16 == 0, "the tile starts 16-byte aligned");
// Blocks an SM should hold at once (the kernel's register budget: 64 a
// thread): two bfloat16 blocks of the issue's layer (32 x 128 x 256 x 256, 32
// groups: 69 KB each over 8 blocks) fit an H100's shared memory. Unbounded,
// ptxas takes 84 to 90 registers, one block an SM; bounded, it spills about
// 80 bytes. Not yet measured on a GPU.
constexpr int kClusterMinBlocks = 2;

struct ClusterLimits {
  int max_cluster = 8;                    // blocks per cluster: 8, the portable limit
  int64_t target_block_bytes = 96 << 10;  // more blocks while one asks for more (two blocks an SM fit)
  // A block's dynamic shared memory at most (the host: the GPU's opt-in
  // limit); 0: no cluster path.
  int64_t max_block_bytes = 0;
  int64_t min_row_bytes = 16;  // channels_last: pack groups until a row fills a 16-byte packet
};

struct ClusterPlan {
  Geometry g{};            // pos_tiles = cluster: block r of a cluster takes position tile r
  int cluster = 0;         // blocks per cluster; 0 where the path does not apply
  int64_t smem_bytes = 0;  // dynamic shared memory per block
};

// Positions per block when a cluster of k blocks shares s: a multiple of 8, so
// that NCHW rows start 16-byte aligned for packets of any element size.
inline int64_t cluster_block_s(int64_t s, int64_t k) { return ((s + k - 1) / k + 7) / 8 * 8; }

// The backward's header: per-channel float A, B, X (published to the
// cluster), their cluster totals (then m1 and m2 by channel), per-group m1 and
// m2, per-channel ChannelTerms, the reductions' scratch.
constexpr int64_t kClusterBackwardHeaderBytes = 8 * kClusterMaxCols * 4 + kClusterMaxCols * 16 + (kBlock / 32) * 4;
static_assert(kClusterBackwardHeaderBytes % 16 == 0, "the tiles start 16-byte aligned");

// A block's dynamic shared memory: the header, then `tiles` tiles (forward:
// x; backward: x and dy) of `cols` channels by `block_s` positions as T.
inline int64_t cluster_smem_bytes(int64_t cols, int64_t block_s, bool channels_last, int64_t elem_bytes,
                                  int tiles = 1) {
  return (tiles == 1 ? kClusterHeaderBytes : kClusterBackwardHeaderBytes) +
         tiles * padded_tile_floats(cols, block_s, channels_last) * elem_bytes;
}

// The cluster plan: tiles of whole groups of one sample (NCHW: one group;
// channels_last: groups packed until a row fills min_row_bytes, where that
// still fits), over the fewest blocks (a power of two) that keep each block
// within target_block_bytes, else within max_block_bytes. tiles: 1 for the
// forward (x), 2 for the backward (x and dy).
inline ClusterPlan plan_cluster(int64_t c, int64_t s, int64_t groups, int64_t elem_bytes, bool channels_last,
                                const ClusterLimits& lim, int tiles = 1) {
  ClusterPlan plan;
  const int64_t cg = c / groups;
  if (lim.max_block_bytes <= 0 || cg > kClusterMaxCols || s <= 0) return plan;
  const auto blocks_for = [&](int64_t cols, int64_t limit) -> int64_t {  // 0: none within the limit
    for (int64_t k = 2; k <= lim.max_cluster; k *= 2) {
      if (cluster_smem_bytes(cols, cluster_block_s(s, k), channels_last, elem_bytes, tiles) <= limit) return k;
    }
    return 0;
  };
  int64_t gpt = 1;  // groups per tile
  while (channels_last && gpt * cg * elem_bytes < lim.min_row_bytes && gpt * 2 <= groups &&
         gpt * 2 * cg <= kClusterMaxCols && blocks_for(gpt * 2 * cg, lim.max_block_bytes) > 0) {
    gpt *= 2;
  }
  const int64_t cols = gpt * cg;
  const int64_t target = lim.target_block_bytes < lim.max_block_bytes ? lim.target_block_bytes : lim.max_block_bytes;
  int64_t k = blocks_for(cols, target);
  if (k == 0) k = blocks_for(cols, lim.max_block_bytes);
  if (k == 0) return plan;
  Geometry& g = plan.g;
  g = Geometry{c, s, groups, cg, cols, cluster_block_s(s, k), (c + cols - 1) / cols, 0, channels_last, false};
  g.pos_tiles = (s + g.block_s - 1) / g.block_s;  // k, or fewer where the rounding up to 8 covers s sooner
  plan.cluster = static_cast<int>(g.pos_tiles);
  plan.smem_bytes = cluster_smem_bytes(cols, g.block_s, channels_last, elem_bytes, tiles);
  return plan;
}

// The tile of `src` into shared memory as T, rows padded to `pitch`: U packets
// a thread in flight at once (a block of a cluster may be alone on its SM).
template <int V, int U, typename T>
__device__ __forceinline__ void load_tile_as_is(const T* __restrict__ src, const Tile& t, T* tile) {
  const int per_row = t.row_len / V, total = t.rows * per_row;
  const int dq = blockDim.x / per_row, dr = blockDim.x % per_row;
  int row = threadIdx.x / per_row, col = (threadIdx.x % per_row) * V;
  for (int i = threadIdx.x; i < total; i += U * blockDim.x) {
    cuda::Packet<T, V> p[U];
    int rows[U], cols[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      rows[u] = row, cols[u] = col;
      if (i + u * static_cast<int>(blockDim.x) < total) {
        p[u] = *reinterpret_cast<const cuda::Packet<T, V>*>(src + t.start + row * t.stride + col);
      }
      col += dr * V;
      row += dq;
      if (col >= t.row_len) {
        col -= t.row_len;
        ++row;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i + u * static_cast<int>(blockDim.x) < total) {
#pragma unroll
        for (int v = 0; v < V; ++v) tile[rows[u] * t.pitch + cols[u] + v] = p[u].v[v];
      }
    }
  }
}

// The mean and M2 of `parts` parts, part i of count(i) values with mean
// mean_of(i) and M2 m2_of(i), in double and in order: the mean is the parts'
// sum of count * mean over the total count (+-Inf where a part's mean is +-Inf
// among finite ones, NaN for both or a NaN, as the fused path's sum gives it),
// then M2 = sum (m2 + count (mean_i - mean)^2), exact for exact parts (Chan's
// parallel formula, with the spread about the final mean). Chan's running
// update, mean += (mb - mean) nb / n, made the mean NaN where a finite part
// followed an infinite one (Inf - Inf); here M2 is NaN wherever a part's mean
// is not finite (mean_i - mean is NaN), whatever the order, and so is rstd.
template <typename Count, typename Mean, typename M2>
__device__ __forceinline__ void combine_parts(int parts, Count count, Mean mean_of, M2 m2_of, double& n,
                                              double& mean, double& m2) {
  double sum = 0;
  n = 0;
  for (int i = 0; i < parts; ++i) {
    n += count(i);
    sum += count(i) * mean_of(i);
  }
  mean = sum / n;
  m2 = 0;
  for (int i = 0; i < parts; ++i) {
    const double d = mean_of(i) - mean;
    m2 += m2_of(i) + count(i) * (d * d);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock, kClusterMinBlocks)
    forward_cluster_kernel(const T* __restrict__ x,  // [N, C, S], NCHW or NHWC memory
                           Geometry g, Params p, float eps,
                           T* __restrict__ y,               // [N, C, S], x's memory order
                           float* __restrict__ mean_out,    // [N, G]
                           float* __restrict__ rstd_out) {  // [N, G]
#if defined(DDPM_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  namespace cg = cooperative_groups;
  DDPM_DYNAMIC_SHARED(double, cluster_smem);
  double* part_mean = cluster_smem;  // [groups of the tile]: this block's part, read by the cluster
  double* part_m2 = part_mean + kClusterMaxCols;
  float* col_m = reinterpret_cast<float*>(part_m2 + kClusterMaxCols);  // [channels]
  float* col_d = col_m + kClusterMaxCols;
  float* col_q = col_d + kClusterMaxCols;
  float* g_mean = col_q + kClusterMaxCols;  // [groups of the tile]
  float* g_rstd = g_mean + kClusterMaxCols;
  float* scratch = g_rstd + kClusterMaxCols;  // [kBlock / 32]
  T* tile = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(cluster_smem) + kClusterHeaderBytes);
  const cg::cluster_group cluster = cg::this_cluster();

  const Tile t = make_tile(g, blockIdx.x);  // blockIdx.x % pos_tiles: the block's rank in its cluster
  load_tile_as_is<V, 4>(x, t, tile);
  __syncthreads();
  auto none = [](int) { return 0.0f; };
  channel_sums<1>(t, scratch, none, [&](float, int i, float* acc) { acc[0] += static_cast<float>(tile[i]); },
                  [&](int k, const float* acc) { col_m[k] = acc[0] / static_cast<float>(t.ns); });
  __syncthreads();
  channel_sums<2>(
      t, scratch, [&](int k) { return col_m[k]; },
      [&](float m, int i, float* acc) {
        const float d = static_cast<float>(tile[i]) - m;
        acc[0] += d;
        acc[1] += d * d;
      },
      [&](int k, const float* acc) {
        col_d[k] = isfinite(col_m[k]) ? acc[0] : 0.0f;  // x - m is NaN at an infinite x: n m is the sum
        col_q[k] = acc[1];
      });
  __syncthreads();
  const int ngroups = t.ncols / static_cast<int>(g.cg), cg_ = static_cast<int>(g.cg);
  const int64_t nc = t.n * g.c + t.c0;
  for (int j = threadIdx.x; j < ngroups; j += blockDim.x) {  // this block's part of each group
    const double ns = t.ns;
    const int k0 = j * cg_;
    double n, mean, m2;
    combine_parts(
        cg_, [&](int) { return ns; },
        [&](int i) {  // the column's mean of x + add, m + D / ns
          return static_cast<double>(col_m[k0 + i]) + col_d[k0 + i] / ns + param(p.add, nc + k0 + i, 0.0f);
        },
        [&](int i) {  // the column's M2 about its own mean, Q - D^2 / ns; NaN stays NaN
          const double d = col_d[k0 + i], m2k = col_q[k0 + i] - d * d / ns;
          return m2k < 0 ? 0.0 : m2k;
        },
        n, mean, m2);
    part_mean[j] = mean;
    part_m2[j] = m2;
  }
  cluster.sync();  // every block's part published (release / acquire across the cluster)
  for (int j = threadIdx.x; j < ngroups; j += blockDim.x) {
    double n, mean, m2;
    combine_parts(
        static_cast<int>(g.pos_tiles),
        [&](int r) {
          const int64_t ns_r = g.s - r * g.block_s < g.block_s ? g.s - r * g.block_s : g.block_s;
          return static_cast<double>(g.cg * ns_r);
        },
        [&](int r) { return *cluster.map_shared_rank(part_mean + j, r); },
        [&](int r) { return *cluster.map_shared_rank(part_m2 + j, r); }, n, mean, m2);
    const double var = m2 / n;  // no clamp: every term of m2 is >= 0 (or NaN, which must stay NaN)
    g_mean[j] = static_cast<float>(mean);
    g_rstd[j] = static_cast<float>(1.0 / sqrt(var + static_cast<double>(eps)));
    if (t.s0 == 0) {
      const int64_t at = t.n * g.groups + t.c0 / g.cg + j;
      mean_out[at] = g_mean[j];
      rstd_out[at] = g_rstd[j];
    }
  }
  cluster.barrier_arrive();  // this block has read the others' shared memory; it waits before it exits
  __syncthreads();
  write_y_from_tile<V>(g, p, t, tile, g_mean, g_rstd, col_d, col_q, y);  // col_d, col_q: y's scale and shift
  cluster.barrier_wait();
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture without clusters: the host never launches it there
#endif
}

// The backward on the cluster plan (tiles = 2): x and dy of a block's slice in
// its shared memory (one read of each); per channel A = sum du*xhat, B = sum
// du, X = sum xhat over the slice, published; after a cluster barrier every
// block sums the cluster's parts in rank order (the same totals in every
// block), and the rank-0 block writes A, B and dadd; then dx from shared
// memory (one write), xhat and du formed again from x and dy. The block waits
// at a second cluster barrier, arrived at after its reads of the others'
// shared memory, before it exits. Outputs as backward_fused_kernel's.
// No register bound: its blocks (x and dy) fill an SM's shared memory alone at
// the issue's layer; bounded to two blocks an SM, ptxas spills.
template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    backward_cluster_kernel(const T* __restrict__ dy, const T* __restrict__ x,  // [N, C, S], x's memory order
                            Geometry g, Params p,
                            const float* __restrict__ mean, const float* __restrict__ rstd,  // [N, G]
                            T* __restrict__ dx,                                               // [N, C, S]
                            float* __restrict__ a_out, float* __restrict__ b_out,            // [N, C]: A and B
                            float* __restrict__ dadd_out) {                                  // [N, C]
#if defined(DDPM_CUDA_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  namespace cg = cooperative_groups;
  DDPM_DYNAMIC_SHARED(double, cluster_smem);
  float* part = reinterpret_cast<float*>(cluster_smem);  // [3][channels]: this block's A, B, X, read by the cluster
  float* col_a = part + 3 * kClusterMaxCols;             // the cluster's A, B, X; then m1 and m2 by channel
  float* col_b = col_a + kClusterMaxCols;
  float* col_x = col_b + kClusterMaxCols;
  float* g_m1 = col_x + kClusterMaxCols;  // [groups of the tile]
  float* g_m2 = g_m1 + kClusterMaxCols;
  ChannelTerms* terms = reinterpret_cast<ChannelTerms*>(g_m2 + kClusterMaxCols);  // [channels]
  float* scratch = reinterpret_cast<float*>(terms + kClusterMaxCols);           // [kBlock / 32]
  T* xs = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(cluster_smem) + kClusterBackwardHeaderBytes);
  T* ds = xs + tile_floats(g);
  const cg::cluster_group cluster = cg::this_cluster();

  const Tile t = make_tile(g, blockIdx.x);  // blockIdx.x % pos_tiles: the block's rank in its cluster
  load_tile_as_is<V, 4>(x, t, xs);
  load_tile_as_is<V, 4>(dy, t, ds);
  for (int k = threadIdx.x; k < t.ncols; k += blockDim.x) terms[k] = channel_terms(g, p, t, mean, rstd, k);
  __syncthreads();
  channel_sums<3>(
      t, scratch, [&](int k) { return terms[k]; },
      [&](const ChannelTerms& c, int i, float* acc) {
        float xhat, du;
        xhat_du(c, p.act, static_cast<float>(xs[i]), static_cast<float>(ds[i]), xhat, du);
        acc[0] += du * xhat;
        acc[1] += du;
        acc[2] += xhat;
      },
      [&](int k, const float* acc) {
        part[k] = acc[0];
        part[kClusterMaxCols + k] = acc[1];
        part[2 * kClusterMaxCols + k] = acc[2];
      });
  cluster.sync();  // every block's part published (release / acquire across the cluster)
  const int64_t nc = t.n * g.c + t.c0;
  for (int k = threadIdx.x; k < t.ncols; k += blockDim.x) {
    float a = 0.0f, b = 0.0f, xsum = 0.0f;
    for (int r = 0; r < static_cast<int>(g.pos_tiles); ++r) {
      const float* other = cluster.map_shared_rank(part, r);
      a += other[k];
      b += other[kClusterMaxCols + k];
      xsum += other[2 * kClusterMaxCols + k];
    }
    col_a[k] = a, col_b[k] = b, col_x[k] = xsum;
    if (t.s0 == 0) {
      a_out[nc + k] = a;
      b_out[nc + k] = b;
    }
  }
  cluster.barrier_arrive();  // this block has read the others' shared memory; it waits before it exits
  __syncthreads();
  group_grad_means(g, p, t, col_a, col_b, g_m1, g_m2);
  __syncthreads();
  for (int k = threadIdx.x; k < t.ncols; k += blockDim.x) {  // dx = rstd * (du * w - m1 - xhat * m2)
    const int j = k / static_cast<int>(g.cg);
    if (t.s0 == 0) {
      dadd_out[nc + k] =
          terms[k].rstd * (terms[k].w * col_b[k] - static_cast<float>(g.s) * g_m1[j] - col_x[k] * g_m2[j]);
    }
    col_a[k] = g_m1[j];
    col_b[k] = g_m2[j];
  }
  __syncthreads();
  for_each_packet<V>(t, g.channels_last, [&](int row, int col, int k0, int k_step) {
    cuda::Packet<T, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int k = k0 + v * k_step, i = row * t.pitch + col + v;
      const ChannelTerms& c = terms[k];
      float xhat, du;
      xhat_du(c, p.act, static_cast<float>(xs[i]), static_cast<float>(ds[i]), xhat, du);
      out.v[v] = static_cast<T>(c.rstd * (du * c.w - col_a[k] - xhat * col_b[k]));
    }
    *reinterpret_cast<cuda::Packet<T, V>*>(dx + t.start + row * t.stride + col) = out;
  });
  cluster.barrier_wait();
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture without clusters: the host never launches it there
#endif
}

}  // namespace gn
}  // namespace ddpm_fast
