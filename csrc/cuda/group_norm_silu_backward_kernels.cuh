// GroupNorm+SiLU backward kernels (the tiles and paths of
// group_norm_silu_kernels.cuh, which includes this file). With xhat, u and
// du = dy * SiLU'(u) per element and the per-(n, c) sums A = sum du*xhat,
// B = sum du, X = sum xhat; per group m1 = sum w*B / M and m2 = sum w*A / M
// (M elements per group):
//   dx = rstd * (du * w - m1 - xhat * m2),  dadd = rstd * (w*B - S*m1 - X*m2).
#pragma once

namespace ddpm_fast {
namespace gn {

// A channel's constants for xhat, u and du.
struct ChannelTerms {
  float rstd, shift, w, b;  // xhat = h * rstd + shift (shift = (add - mean) * rstd); u = xhat * w + b
};

__device__ __forceinline__ ChannelTerms channel_terms(const Geometry& g, const Params& p, const Tile& t,
                                                      const float* mean, const float* rstd, int k) {
  const int64_t ng = t.n * g.groups + (t.c0 + k) / g.cg;
  const float r = rstd[ng];
  return {r, (param(p.add, t.n * g.c + t.c0 + k, 0.0f) - mean[ng]) * r, param(p.w, t.c0 + k, 1.0f),
          param(p.b, t.c0 + k, 0.0f)};
}

// xhat and du of one element from x and dy.
__device__ __forceinline__ void xhat_du(const ChannelTerms& c, bool act, float x, float dy, float& xhat, float& du) {
  xhat = x * c.rstd + c.shift;
  du = act ? silu_grad(dy, xhat * c.w + c.b) : dy;
}

// Per group of the tile, the means over its elements of w * B (m1) and of
// w * A (m2), from its channels' sums A = col_a, B = col_b, in channel order.
__device__ __forceinline__ void group_grad_means(const Geometry& g, const Params& p, const Tile& t, const float* col_a,
                                                 const float* col_b, float* g_m1, float* g_m2) {
  const int ngroups = t.ncols / static_cast<int>(g.cg);
  const float count = static_cast<float>(g.cg * g.s);
  for (int j = threadIdx.x; j < ngroups; j += blockDim.x) {
    float s1 = 0.0f, s2 = 0.0f;
    for (int k = j * g.cg; k < (j + 1) * g.cg; ++k) {
      const float w = param(p.w, t.c0 + k, 1.0f);
      s1 += w * col_b[k];
      s2 += w * col_a[k];
    }
    g_m1[j] = s1 / count;
    g_m2[j] = s2 / count;
  }
}

// Copies the tile's x and dy into shared memory (xs, then ds) and gives
// done(k, {A, B, X}) for each channel k. With kKeep, xs and ds hold xhat and du
// afterwards.
template <bool kKeep, int V, typename T, typename Done>
__device__ __forceinline__ void tile_sums(const T* __restrict__ dy, const T* __restrict__ x, const Geometry& g,
                                          const Params& p, const float* mean, const float* rstd, const Tile& t,
                                          float* xs, float* ds, float* scratch, Done&& done) {
  load_tile<V>(x, t, g.channels_last, xs);
  load_tile<V>(dy, t, g.channels_last, ds);
  __syncthreads();
  channel_sums<3>(
      t, scratch, [&](int k) { return channel_terms(g, p, t, mean, rstd, k); },
      [&](const ChannelTerms& c, int i, float* acc) {
        float xhat, du;
        xhat_du(c, p.act, xs[i], ds[i], xhat, du);
        if (kKeep) {
          xs[i] = xhat;
          ds[i] = du;
        }
        acc[0] += du * xhat;
        acc[1] += du;
        acc[2] += xhat;
      },
      done);
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    backward_fused_kernel(const T* __restrict__ dy, const T* __restrict__ x,  // [N, C, S], x's memory order
                          Geometry g, Params p,
                          const float* __restrict__ mean, const float* __restrict__ rstd,  // [N, G]
                          T* __restrict__ dx,                                 // [N, C, S]
                          float* __restrict__ a_out, float* __restrict__ b_out,  // [N, C]: A and B
                          float* __restrict__ dadd_out) {                     // [N, C]
  DDPM_DYNAMIC_SHARED(float, smem);
  __shared__ float col_a[kMaxCols], col_b[kMaxCols], col_x[kMaxCols], g_m1[kMaxCols], g_m2[kMaxCols];
  __shared__ float scratch[kBlock / 32];
  const Tile t = make_tile(g, blockIdx.x);
  float* xs = smem;                   // x, then xhat
  float* ds = smem + tile_floats(g);  // dy, then du
  const int64_t nc = t.n * g.c + t.c0;
  tile_sums<true, V>(dy, x, g, p, mean, rstd, t, xs, ds, scratch, [&](int k, const float* acc) {
    col_a[k] = acc[0], col_b[k] = acc[1], col_x[k] = acc[2];
    a_out[nc + k] = acc[0];
    b_out[nc + k] = acc[1];
  });
  __syncthreads();
  group_grad_means(g, p, t, col_a, col_b, g_m1, g_m2);
  __syncthreads();
  for (int k = threadIdx.x; k < t.ncols; k += blockDim.x) {  // dx = du * col_a + xhat * col_b + col_x
    const int j = k / static_cast<int>(g.cg);
    const float r = rstd[t.n * g.groups + t.c0 / g.cg + j], w = param(p.w, t.c0 + k, 1.0f);
    dadd_out[nc + k] = r * (w * col_b[k] - static_cast<float>(g.s) * g_m1[j] - col_x[k] * g_m2[j]);
    col_a[k] = r * w;
    col_b[k] = -r * g_m2[j];
    col_x[k] = -r * g_m1[j];
  }
  __syncthreads();
  for_each_packet<V>(t, g.channels_last, [&](int row, int col, int k0, int k_step) {
    cuda::Packet<T, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int k = k0 + v * k_step, i = row * t.pitch + col + v;
      out.v[v] = static_cast<T>(ds[i] * col_a[k] + xs[i] * col_b[k] + col_x[k]);
    }
    *reinterpret_cast<cuda::Packet<T, V>*>(dx + t.start + row * t.stride + col) = out;
  });
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    backward_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x, Geometry g, Params p,
                         const float* __restrict__ mean, const float* __restrict__ rstd,
                         float* __restrict__ a_out, float* __restrict__ b_out,  // [N, C, T]: per position tile
                         float* __restrict__ x_out) {
  DDPM_DYNAMIC_SHARED(float, smem);
  __shared__ float scratch[kBlock / 32];
  const Tile t = make_tile(g, blockIdx.x);
  const int64_t nc = t.n * g.c + t.c0;
  tile_sums<false, V>(dy, x, g, p, mean, rstd, t, smem, smem + tile_floats(g), scratch, [&](int k, const float* acc) {
    const int64_t at = (nc + k) * g.pos_tiles + blockIdx.x % g.pos_tiles;
    a_out[at] = acc[0];
    b_out[at] = acc[1];
    x_out[at] = acc[2];
  });
}

template <typename T, int V>
__global__ void __launch_bounds__(kBlock)
    backward_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, Geometry g, Params p,
                       const float* __restrict__ mean, const float* __restrict__ rstd,
                       const float* __restrict__ m1, const float* __restrict__ m2,  // [N, G]
                       T* __restrict__ dx) {
  __shared__ ChannelTerms terms[kMaxCols];
  __shared__ float col_m1[kMaxCols], col_m2[kMaxCols];
  const Tile t = make_tile(g, blockIdx.x);
  for (int k = threadIdx.x; k < t.ncols; k += blockDim.x) {
    terms[k] = channel_terms(g, p, t, mean, rstd, k);
    const int64_t ng = t.n * g.groups + (t.c0 + k) / g.cg;
    col_m1[k] = m1[ng];
    col_m2[k] = m2[ng];
  }
  __syncthreads();
  for_each_packet<V>(t, g.channels_last, [&](int row, int col, int k0, int k_step) {
    const int64_t at = t.start + row * t.stride + col;
    const cuda::Packet<T, V> xv = *reinterpret_cast<const cuda::Packet<T, V>*>(x + at);
    const cuda::Packet<T, V> dv = *reinterpret_cast<const cuda::Packet<T, V>*>(dy + at);
    cuda::Packet<T, V> out;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int k = k0 + v * k_step;
      const ChannelTerms& c = terms[k];
      float xhat, du;
      xhat_du(c, p.act, static_cast<float>(xv.v[v]), static_cast<float>(dv.v[v]), xhat, du);
      out.v[v] = static_cast<T>(c.rstd * (du * c.w - col_m1[k] - xhat * col_m2[k]));
    }
    *reinterpret_cast<cuda::Packet<T, V>*>(dx + at) = out;
  });
}

}  // namespace gn
}  // namespace ddpm_fast
