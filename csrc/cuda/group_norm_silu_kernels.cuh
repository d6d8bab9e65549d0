// GroupNorm+SiLU kernels for the GPU (math: csrc/group_norm_silu.h; the same
// plan as the Triton kernels, kernels/group_norm_silu.py). Torch-free, so that
// tests/cuda_emulation can run them on the CPU.
//
// A block works on a tile of one sample: `ns` positions by `ncols` channels.
// It walks the tile in x's memory order (NCHW: rows are channels, positions
// contiguous; channels_last: rows are positions, channels contiguous) with
// V-element (16-byte) packets, so that every access is coalesced and no
// element pays a division to find its channel: the walk steps its (row,
// column) by fixed increments.
//
// * Fused path: the tile holds whole groups, all positions. The block copies
//   it into shared memory (one read of x), forms per-channel sums over it, the
//   group mean, then the variance about the mean, and writes y from shared
//   memory (one write): the one-read-one-write floor.
// * Split path (large H*W): `moments_kernel` copies its tile into shared
//   memory and writes per (sample, channel, position tile) the tile column's
//   float mean m of x and, in a second pass over shared memory, the sums of
//   x - m and (x - m)^2: moments about the column's own mean, so that no
//   sum cancels wherever the group's values lie. The host combines them in
//   double (Chan's parallel formula, torch, a fixed order); `normalize_kernel`
//   writes y. Two reads and one write.
// The backward has the same two paths over A = sum du*xhat, B = sum du,
// X = sum xhat per (n, c). All sums are in a fixed order: results are
// deterministic.
// * Cluster path, a third path (Hopper, sm_90+;
//   group_norm_silu_cluster_kernels.cuh): a group too large for the fused
//   path but not for a thread-block cluster's shared memory (up to 8 blocks)
//   is spread over the cluster's blocks, one position tile each; the blocks
//   combine their moments (backward: A, B, X) through distributed shared
//   memory, then each writes y (dx) from its own. One read and one write, one
//   launch. The host takes it, where the GPU and the build allow, before the
//   split path.
#pragma once

#include <cstdint>

#include "../kernel_args.h"
#include "block_ops.cuh"

#ifndef DDPM_DYNAMIC_SHARED
#define DDPM_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace ddpm_fast {
namespace gn {

constexpr int kBlock = 512;      // threads per block
constexpr int64_t kMaxCols = 256;  // channels per tile (sizes the per-channel tables in shared memory)

// Tile sizes: a first choice, not yet tuned on a GPU. Tests shrink them to
// force the split path on small inputs.
struct Limits {
  int64_t max_tile = 16384;          // forward: elements in shared memory (64 KB and padding)
  int64_t max_tile_backward = 8192;  // backward: x and dy
  int64_t target_tile = 4096;        // pack small groups until a block has about this many
  int64_t split_tile = 4096;         // elements per block on the split path
  int64_t min_row_bytes = 32;        // a channels_last row fills a 32-byte sector
  // A fused tile's shared memory with its padding (padded_tile_floats), at most: so
  // that it fits the smallest opt-in limit of the GPUs built for (99 KB on
  // sm_86/sm_89, less the kernels' static arrays), not only the H100's 227
  // KB. Narrow channels_last tiles (one or two channels of many positions)
  // pad up to twice their size and take the split path past this.
  int64_t max_smem_floats = 24000;           // forward: the tile
  int64_t max_smem_floats_backward = 12000;  // backward: x and dy, two tiles
};

// Floats of shared memory a tile of `cols` channels by `rows_s` positions
// takes: rows padded by one against bank conflicts.
__host__ __device__ inline int64_t padded_tile_floats(int64_t cols, int64_t rows_s, bool channels_last) {
  return channels_last ? rows_s * (cols + 1) : cols * (rows_s + 1);
}

inline Geometry plan(int64_t c, int64_t s, int64_t groups, int64_t elem_bytes, bool channels_last, bool backward,
                     const Limits& lim = Limits{}) {
  const int64_t max_tile = backward ? lim.max_tile_backward : lim.max_tile, cg = c / groups;
  const int64_t max_padded = backward ? lim.max_smem_floats_backward : lim.max_smem_floats;
  // Whether a fused tile of `cols` channels fits: its values, and its shared
  // memory with the padding.
  const auto fits = [&](int64_t cols) {
    return cols * s <= max_tile && padded_tile_floats(cols, s, channels_last) <= max_padded;
  };
  int64_t gpt = 1;  // groups per fused tile
  if (cg <= kMaxCols) {
    while (gpt * 2 <= groups && gpt * 2 * cg <= kMaxCols && fits(gpt * 2 * cg) &&
           (gpt * cg * s < lim.target_tile || (channels_last && gpt * cg * elem_bytes < lim.min_row_bytes))) {
      gpt *= 2;
    }
  }
  Geometry g{c, s, groups, cg, 0, 0, 0, 0, channels_last, false};
  if (cg <= kMaxCols && fits(gpt * cg)) {
    g.fused = true;
    g.cols = gpt * cg;
    g.block_s = s;
  } else {  // any column range will do: torch forms the group sums
    g.cols = c < (channels_last ? 64 : 4) ? c : (channels_last ? 64 : 4);
    // Rows a multiple of 8 (a 16-byte packet of the narrowest type) where there are
    // 8 or more: 3 channels' 4096 / 3 = 1365 rows left no tile start packet-aligned.
    int64_t rows = lim.split_tile / g.cols;
    rows = rows >= 8 ? rows / 8 * 8 : (rows > 1 ? rows : 1);
    g.block_s = s < rows ? s : rows;
  }
  g.col_tiles = (c + g.cols - 1) / g.cols;
  g.pos_tiles = (s + g.block_s - 1) / g.block_s;
  return g;
}

// Floats of shared memory a tile of the plan takes (padded_tile_floats).
__host__ __device__ inline int64_t tile_floats(const Geometry& g) {
  return padded_tile_floats(g.cols, g.block_s, g.channels_last);
}

// Whether V-element packets fit every tile row: the rows' length, stride and start.
inline bool packets_fit(const Geometry& g, int v) {
  return g.channels_last ? (g.c % v == 0 && g.cols % v == 0) : (g.s % v == 0 && g.block_s % v == 0);
}

struct Tile {
  int64_t n, c0, s0;  // sample, first channel, first position
  int ncols, ns;      // channels, positions
  int64_t start;      // memory offset of (c0, s0)
  int rows, row_len;  // memory order: rows of row_len contiguous elements
  int64_t stride;     // memory distance between rows
  int pitch;          // shared-memory row pitch: row_len + 1
  int ck, cs;         // shared-memory steps along channels and positions
};

// The tile of block `block`: blocks run over (sample, channel tile, position tile), positions fastest.
__device__ __forceinline__ Tile make_tile(const Geometry& g, int64_t block) {
  const int64_t row_block = block / g.pos_tiles, pos_block = block % g.pos_tiles;
  Tile t;
  t.n = row_block / g.col_tiles;
  t.c0 = (row_block % g.col_tiles) * g.cols;
  t.s0 = pos_block * g.block_s;
  t.ncols = static_cast<int>(g.c - t.c0 < g.cols ? g.c - t.c0 : g.cols);
  t.ns = static_cast<int>(g.s - t.s0 < g.block_s ? g.s - t.s0 : g.block_s);
  if (g.channels_last) {
    t.start = (t.n * g.s + t.s0) * g.c + t.c0;
    t.rows = t.ns, t.row_len = t.ncols, t.stride = g.c;
  } else {
    t.start = (t.n * g.c + t.c0) * g.s + t.s0;
    t.rows = t.ncols, t.row_len = t.ns, t.stride = g.s;
  }
  t.pitch = t.row_len + 1;
  t.ck = g.channels_last ? 1 : t.pitch;
  t.cs = g.channels_last ? t.pitch : 1;
  return t;
}

// f(row, col, k0, k_step): every V-packet of the tile, in memory order, spread
// over the block. Column `col` of row `row` starts the packet; the channel of
// its element v is k0 + v * k_step (tile-local).
template <int V, typename F>
__device__ __forceinline__ void for_each_packet(const Tile& t, bool channels_last, F&& f) {
  const int per_row = t.row_len / V, total = t.rows * per_row;
  const int dq = blockDim.x / per_row, dr = blockDim.x % per_row;
  int row = threadIdx.x / per_row, col = (threadIdx.x % per_row) * V;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    f(row, col, channels_last ? col : row, channels_last ? 1 : 0);
    col += dr * V;
    row += dq;
    if (col >= t.row_len) {
      col -= t.row_len;
      ++row;
    }
  }
}

// The tile of `src` into shared memory as float, rows padded to `pitch`.
template <int V, typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ src, const Tile& t, bool channels_last, float* tile) {
  for_each_packet<V>(t, channels_last, [&](int row, int col, int, int) {
    const cuda::Packet<T, V> p = *reinterpret_cast<const cuda::Packet<T, V>*>(src + t.start + row * t.stride + col);
#pragma unroll
    for (int v = 0; v < V; ++v) tile[row * t.pitch + col + v] = static_cast<float>(p.v[v]);
  });
}

__device__ __forceinline__ int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Per-channel sums over the tile's positions, in a fixed order. Threads take
// runs of `width` per channel; for each channel k, `prep(k)` gives its
// constants, `elem(c, i, acc)` adds shared-memory element i to acc[0..N), and
// `done(k, acc)` receives the totals (in one thread).
template <int N, typename Prep, typename Elem, typename Done>
__device__ __forceinline__ void channel_sums(const Tile& t, float* scratch, Prep&& prep, Elem&& elem, Done&& done) {
  const int p2 = next_pow2(t.ncols);
  const int width = blockDim.x / p2 > 1 ? blockDim.x / p2 : 1;
  const int per_pass = blockDim.x / width, r = threadIdx.x % width;
  for (int kb = 0; kb < t.ncols; kb += per_pass) {
    const int k = kb + threadIdx.x / width;
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = 0.0f;
    if (k < t.ncols) {
      const auto c = prep(k);
      for (int s = r; s < t.ns; s += width) elem(c, k * t.ck + s * t.cs, acc);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = cuda::run_sum(acc[j], width, scratch);
    if (k < t.ncols && r == 0) done(k, acc);
  }
}

__device__ __forceinline__ float silu(float u) { return u / (1.0f + __expf(-u)); }

// dy * d SiLU(u) / du.
__device__ __forceinline__ float silu_grad(float dy, float u) {
  const float sg = 1.0f / (1.0f + __expf(-u));
  return dy * sg * (1.0f + u * (1.0f - sg));
}

__device__ __forceinline__ float param(const float* p, int64_t i, float fallback) { return p ? p[i] : fallback; }

// The forward's last step, y from the tile in shared memory: per channel the
// scale and shift of y = x * scale + shift before SiLU into col_a and col_b
// (the caller's tables; the tile's groups' g_mean and g_rstd are ready), then
// y in V-element packets. One function for the fused path (tile of S = float)
// and the cluster path (S = T, x's own type, half the shared memory for
// 16-bit x), so that both normalize alike, bit for bit: the tile's element is
// read as float (a no-op for float) and the float operations are the same.
template <int V, typename S, typename T>
__device__ __forceinline__ void write_y_from_tile(const Geometry& g, const Params& p, const Tile& t,
                                                  const S* tile, const float* g_mean, const float* g_rstd,
                                                  float* col_a, float* col_b, T* __restrict__ y) {
  const int64_t nc = t.n * g.c + t.c0;
  for (int k = threadIdx.x; k < t.ncols; k += blockDim.x) {
    const int j = k / static_cast<int>(g.cg);
    const float scale = g_rstd[j] * param(p.w, t.c0 + k, 1.0f);
    col_a[k] = scale;
    col_b[k] = (param(p.add, nc + k, 0.0f) - g_mean[j]) * scale + param(p.b, t.c0 + k, 0.0f);
  }
  __syncthreads();
  for_each_packet<V>(t, g.channels_last, [&](int row, int col, int k0, int k_step) {
    cuda::Packet<T, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int k = k0 + v * k_step;
      const float u = static_cast<float>(tile[row * t.pitch + col + v]) * col_a[k] + col_b[k];
      out.v[v] = static_cast<T>(p.act ? silu(u) : u);
    }
    *reinterpret_cast<cuda::Packet<T, V>*>(y + t.start + row * t.stride + col) = out;
  });
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    forward_fused_kernel(const T* __restrict__ x,  // [N, C, S], NCHW or NHWC memory
                         Geometry g, Params p, float eps,
                         T* __restrict__ y,                 // [N, C, S], x's memory order
                         float* __restrict__ mean_out,      // [N, G]
                         float* __restrict__ rstd_out) {    // [N, G]
  DDPM_DYNAMIC_SHARED(float, tile);
  __shared__ float col_a[kMaxCols], col_b[kMaxCols], g_mean[kMaxCols], g_rstd[kMaxCols];
  __shared__ float scratch[kBlock / 32];
  const Tile t = make_tile(g, blockIdx.x);
  load_tile<V>(x, t, g.channels_last, tile);
  __syncthreads();
  const int ngroups = t.ncols / static_cast<int>(g.cg);
  const int64_t g0 = t.c0 / g.cg, nc = t.n * g.c + t.c0;
  const float count = static_cast<float>(g.cg * g.s);
  auto add_of = [&](int k) { return param(p.add, nc + k, 0.0f); };
  auto none = [](int) { return 0.0f; };
  channel_sums<1>(t, scratch, none, [&](float, int i, float* acc) { acc[0] += tile[i]; },
                  [&](int k, const float* acc) { col_a[k] = acc[0] + t.ns * add_of(k); });
  __syncthreads();
  for (int j = threadIdx.x; j < ngroups; j += blockDim.x) {
    float sum = 0.0f;
    for (int k = j * g.cg; k < (j + 1) * g.cg; ++k) sum += col_a[k];
    g_mean[j] = sum / count;
  }
  __syncthreads();
  channel_sums<1>(
      t, scratch, [&](int k) { return add_of(k) - g_mean[k / g.cg]; },
      [&](float shift, int i, float* acc) {
        const float d = tile[i] + shift;
        acc[0] += d * d;
      },
      [&](int k, const float* acc) { col_b[k] = acc[0]; });
  __syncthreads();
  for (int j = threadIdx.x; j < ngroups; j += blockDim.x) {
    float sq = 0.0f;
    for (int k = j * g.cg; k < (j + 1) * g.cg; ++k) sq += col_b[k];
    g_rstd[j] = rsqrtf(sq / count + eps);
    mean_out[t.n * g.groups + g0 + j] = g_mean[j];
    rstd_out[t.n * g.groups + g0 + j] = g_rstd[j];
  }
  __syncthreads();
  write_y_from_tile<V>(g, p, t, tile, g_mean, g_rstd, col_a, col_b, y);
}

// Per (sample, channel, position tile), the tile column's moments of x about
// its own float mean m: m, D = sum (x - m) and Q = sum (x - m)^2 (add only
// moves the mean: the host adds it). D, of the order of m's rounding, lets the
// host recover the column's sum n m + D and its M2 = Q - D^2 / n however m
// was rounded. Where m is not finite (the column holds +-Inf or NaN), D is 0:
// x - m is NaN at an infinite x, and n m is the column's sum as it stands
// (+-Inf, or NaN), so that a group's mean is +-Inf as the fused path's sum
// gives it, not NaN (Q is NaN there: so is the group's variance). Two passes
// over the tile in shared memory, one read of x.
template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    moments_kernel(const T* __restrict__ x, Geometry g,
                   float* __restrict__ mean_out,  // [N, C, T]: m, the tile column's mean of x
                   float* __restrict__ dev_out,   // [N, C, T]: sum of x - m
                   float* __restrict__ sq_out) {  // [N, C, T]: sum of (x - m)^2
  DDPM_DYNAMIC_SHARED(float, tile);
  __shared__ float col_mean[kMaxCols];
  __shared__ float scratch[kBlock / 32];
  const Tile t = make_tile(g, blockIdx.x);
  load_tile<V>(x, t, g.channels_last, tile);
  __syncthreads();
  auto none = [](int) { return 0.0f; };
  channel_sums<1>(t, scratch, none, [&](float, int i, float* acc) { acc[0] += tile[i]; },
                  [&](int k, const float* acc) { col_mean[k] = acc[0] / static_cast<float>(t.ns); });
  __syncthreads();
  const int64_t at0 = (t.n * g.c + t.c0) * g.pos_tiles + blockIdx.x % g.pos_tiles;
  channel_sums<2>(
      t, scratch, [&](int k) { return col_mean[k]; },
      [&](float m, int i, float* acc) {
        const float d = tile[i] - m;
        acc[0] += d;
        acc[1] += d * d;
      },
      [&](int k, const float* acc) {
        const int64_t at = at0 + k * g.pos_tiles;
        mean_out[at] = col_mean[k];
        dev_out[at] = isfinite(col_mean[k]) ? acc[0] : 0.0f;
        sq_out[at] = acc[1];
      });
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    normalize_kernel(const T* __restrict__ x, Geometry g, Params p,
                     const float* __restrict__ mean, const float* __restrict__ rstd,  // [N, G]
                     T* __restrict__ y) {
  __shared__ float col_a[kMaxCols], col_b[kMaxCols];
  const Tile t = make_tile(g, blockIdx.x);
  const int64_t nc = t.n * g.c + t.c0;
  for (int k = threadIdx.x; k < t.ncols; k += blockDim.x) {
    const int64_t ng = t.n * g.groups + (t.c0 + k) / g.cg;
    const float scale = rstd[ng] * param(p.w, t.c0 + k, 1.0f);
    col_a[k] = scale;
    col_b[k] = (param(p.add, nc + k, 0.0f) - mean[ng]) * scale + param(p.b, t.c0 + k, 0.0f);
  }
  __syncthreads();
  for_each_packet<V>(t, g.channels_last, [&](int row, int col, int k0, int k_step) {
    const int64_t at = t.start + row * t.stride + col;
    const cuda::Packet<T, V> in = *reinterpret_cast<const cuda::Packet<T, V>*>(x + at);
    cuda::Packet<T, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int k = k0 + v * k_step;
      const float u = static_cast<float>(in.v[v]) * col_a[k] + col_b[k];
      out.v[v] = static_cast<T>(p.act ? silu(u) : u);
    }
    *reinterpret_cast<cuda::Packet<T, V>*>(y + at) = out;
  });
}

}  // namespace gn
}  // namespace ddpm_fast

#include "group_norm_silu_backward_kernels.cuh"
