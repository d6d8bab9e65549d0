// The row loops of the CPU GroupNorm+SiLU (group_norm_silu_cpu.cpp drives
// them over tensors): SiLU and its gradient over float rows, the moments of a
// row, and both backward passes over NCHW rows and channels_last pixel rows,
// each in AVX2 + FMA and portably, picked at run time by DDPM_SIMD_PICK (only
// the portable loops where simd.h finds no x86).
//
// Free of ATen; meant for that one .cpp file only (its functions are internal
// to the file that includes it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "simd.h"

namespace ddpm_fast {
namespace {

// exp(x) for float, Cephes' polynomial on x = k ln2 + r, branch-free so that
// loops over it vectorize (within 2 ulp of expf over [-87, 88]). The polynomial
// sees x clamped to that range (NaN too, keeping the int conversion defined);
// the ends are restored last: exp(NaN) = NaN and exp(x > 88) = +Inf, so that
// silu(-Inf) = -Inf / (1 + Inf) is NaN, as F.silu has it.
inline __attribute__((always_inline)) float exp_poly(float x_in) {
  const float x = x_in >= -87.0f ? (x_in <= 88.0f ? x_in : 88.0f) : -87.0f;
  // floor(x log2e + 0.5) by truncating a positive value (vectorizes without SSE4.1's round).
  const int32_t k_int = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float k = static_cast<float>(k_int);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (k_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x_in > 88.0f ? std::numeric_limits<float>::infinity() : (x_in == x_in ? e : x_in);
}

#if DDPM_FAST_X86_SIMD
// Whether the AVX2 + FMA loops run: where the CPU has both, unless
// DDPM_FAST_NO_AVX2 is set (the tests run the portable loops that way too).
bool use_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && std::getenv("DDPM_FAST_NO_AVX2") == nullptr;
  }();
  return yes;
}
#define DDPM_SIMD_PICK(avx2_fn, portable_fn) (use_avx2() ? (avx2_fn) : (portable_fn))
#define DDPM_CLONES_AVX2 __attribute__((target_clones("avx2", "default")))
#else
#define DDPM_SIMD_PICK(avx2_fn, portable_fn) (portable_fn)
#define DDPM_CLONES_AVX2
#endif

#if DDPM_FAST_X86_SIMD
// exp(-u) on kN vectors of 8 floats (AVX2 + FMA): exp_poly's polynomial (with
// fused multiply-adds, so within an ulp of it), its clamp and its non-finite
// ends. Written out, the forward's SiLU pass ran about 1.5x faster than gcc's
// vectorization of the exp_poly loop (4.4 -> 2.4-3.0 ms at 32x128x32x32). Each
// step runs across the kN vectors (the unrolled `for k` loops): one vector's
// steps form a chain of about 25 dependent operations whose latency, one
// vector at a time, left the core idle.
#define DDPM_EACH_VECTOR _Pragma("GCC unroll 4") for (int k = 0; k < kN; ++k)
template <int kN>
__attribute__((target("avx2,fma"))) inline __attribute__((always_inline)) void exp_neg_avx2(const __m256* u,
                                                                                           __m256* out) {
  __m256 x_in[kN], r[kN], p[kN];
  __m256i k_int[kN];
  DDPM_EACH_VECTOR {
    x_in[k] = _mm256_sub_ps(_mm256_setzero_ps(), u[k]);
    // max/min return their second operand for NaN: a NaN x_in is clamped to -87 here.
    const __m256 x = _mm256_min_ps(_mm256_max_ps(x_in[k], _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    k_int[k] = _mm256_sub_epi32(
        _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(128.5f))),
        _mm256_set1_epi32(128));
    const __m256 kf = _mm256_cvtepi32_ps(k_int[k]);
    // Two steps, as exp_poly's (x - k*c1) + k*c2 (no fused multiply-adds there either).
    r[k] = _mm256_add_ps(_mm256_sub_ps(x, _mm256_mul_ps(kf, _mm256_set1_ps(0.693359375f))),
                         _mm256_mul_ps(kf, _mm256_set1_ps(2.12194440e-4f)));
    p[k] = _mm256_set1_ps(1.9875691500e-4f);
  }
  static constexpr float kPoly[5] = {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                                     5.0000001201e-1f};
#pragma GCC unroll 5
  for (int j = 0; j < 5; ++j) {
    const __m256 c = _mm256_set1_ps(kPoly[j]);
    DDPM_EACH_VECTOR p[k] = _mm256_fmadd_ps(p[k], r[k], c);
  }
  DDPM_EACH_VECTOR {
    const __m256 q = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p[k], r[k]), r[k], r[k]), _mm256_set1_ps(1.0f));
    const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k_int[k], _mm256_set1_epi32(127)), 23));
    __m256 e = _mm256_mul_ps(q, scale);
    e = _mm256_blendv_ps(e, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                         _mm256_cmp_ps(x_in[k], _mm256_set1_ps(88.0f), _CMP_GT_OQ));
    out[k] = _mm256_blendv_ps(e, x_in[k], _mm256_cmp_ps(x_in[k], x_in[k], _CMP_UNORD_Q));  // NaN stays NaN
  }
}

// silu(u) = u / (1 + exp(-u)) on kN vectors, in place.
template <int kN>
__attribute__((target("avx2,fma"))) inline __attribute__((always_inline)) void silu_avx2(__m256* u) {
  __m256 e[kN];
  exp_neg_avx2<kN>(u, e);
  DDPM_EACH_VECTOR u[k] = _mm256_div_ps(u[k], _mm256_add_ps(_mm256_set1_ps(1.0f), e[k]));
}
#undef DDPM_EACH_VECTOR

// dL/du = dy * s * (1 + u * (1 - s)), s = sigmoid(u) (silu_grad_float's formula).
__attribute__((target("avx2,fma"))) inline __m256 silu_grad_avx2(__m256 dy, __m256 u) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e;
  exp_neg_avx2<1>(&u, &e);
  const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
  return _mm256_mul_ps(_mm256_mul_ps(dy, sig), _mm256_fmadd_ps(u, _mm256_sub_ps(one, sig), one));
}

// in[i] * scale[i * step] + shift[i * step] on the 8 elements from i, rounded
// twice, as the portable loop computes it (-ffp-contract=off).
__attribute__((target("avx2,fma"))) inline __attribute__((always_inline)) __m256 affine8(
    const float* in, const float* scale, const float* shift, int64_t step, int64_t i) {
  const __m256 a = step == 0 ? _mm256_set1_ps(scale[0]) : _mm256_loadu_ps(scale + i);
  const __m256 b = step == 0 ? _mm256_set1_ps(shift[0]) : _mm256_loadu_ps(shift + i);
  return _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(in + i), a), b);
}

// out[i] = act(in[i] * scale[i * step] + shift[i * step]) over a row (AVX2).
__attribute__((target("avx2,fma"))) void affine_act_row_avx2(const float* in, const float* scale, const float* shift,
                                                             int64_t step, int64_t count, bool act, float* out) {
  int64_t i = 0;
  if (act) {  // four vectors at a time (see exp_neg_avx2)
    for (; i + 32 <= count; i += 32) {
      __m256 u[4] = {affine8(in, scale, shift, step, i), affine8(in, scale, shift, step, i + 8),
                     affine8(in, scale, shift, step, i + 16), affine8(in, scale, shift, step, i + 24)};
      silu_avx2<4>(u);
      for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + i + 8 * k, u[k]);
    }
  }
  for (; i + 8 <= count; i += 8) {
    __m256 u = affine8(in, scale, shift, step, i);
    if (act) silu_avx2<1>(&u);
    _mm256_storeu_ps(out + i, u);
  }
  for (; i < count; ++i) {
    const float u = in[i] * scale[i * step] + shift[i * step];
    out[i] = act ? u / (1.0f + exp_poly(-u)) : u;
  }
}

#endif  // DDPM_FAST_X86_SIMD

// The same without AVX2.
void affine_act_row_portable(const float* in, const float* scale, const float* shift, int64_t step, int64_t count,
                             bool act, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    const float u = in[i] * scale[i * step] + shift[i * step];
    out[i] = act ? u / (1.0f + exp_poly(-u)) : u;
  }
}

// out[i] = act(in[i] * scale[i * step] + shift[i * step]) over a row; step 0
// broadcasts one scale/shift (an NCHW channel row), step 1 reads one per
// element (an NHWC pixel row, one channel each).
void affine_act_row(const float* in, const float* scale, const float* shift, int64_t step, int64_t count, bool act,
                    float* out) {
  DDPM_SIMD_PICK(affine_act_row_avx2, affine_act_row_portable)(in, scale, shift, step, count, act, out);
}

// Sums of (in[i] - shift) and of its squares over a row of at most kChunk
// values, in float (vectorizes 8-wide), added to the double totals. The shift
// (about the row's values) keeps the float sums from cancelling; over rows this
// short their rounding stays far below the tests' tolerances.
DDPM_CLONES_AVX2 void row_moments(const float* in, int64_t count, float shift, double* sum, double* sumsq) {
  float s = 0.0f, q = 0.0f;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < count; ++i) {
    const float v = in[i] - shift;
    s += v;
    q += v * v;
  }
  *sum += s;
  *sumsq += q;
}

// One channels_last pixel row's part of the per-channel moments: the sums of
// (row[c] - shift[c]) and of its squares added to float accumulators.
DDPM_CLONES_AVX2 void pixel_moments(const float* row, const float* shift, int64_t c_total, float* sum,
                                    float* sumsq) {
#pragma omp simd
  for (int64_t c = 0; c < c_total; ++c) {
    const float v = row[c] - shift[c];
    sum[c] += v;
    sumsq[c] += v * v;
  }
}

// Rows of any element type through float: converted in chunks where T is not float.
constexpr int64_t kChunk = 1024;

template <typename T>
const float* as_float_row(const T* row, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t i = 0; i < count; ++i) buffer[i] = static_cast<float>(row[i]);
    return buffer;
  }
}


// dL/du at u = xhat * w + b, through SiLU, in float (grad_u's formula).
inline __attribute__((always_inline)) float silu_grad_float(float dy, float u) {
  const float s = 1.0f / (1.0f + exp_poly(-u));
  return dy * s * (1.0f + u * (1.0f - s));
}

// Backward pass 1 over one contiguous (n, c) row of floats: the sums
// A = sum du * xhat, B = sum du and X = sum xhat, accumulated in double; with
// `act`, du (dL/du through SiLU) is also stored to `du_out` for pass 2, which
// then needs no exp. The `act` branch stays outside the loops, which would not
// vectorize around it.
void backward_row_sums_portable(const float* dy, const float* x, int64_t count, float shift, float rstd, float w,
                                float b, bool act, double* out, float* du_out) {
  double a_sum = 0.0, b_sum = 0.0, x_sum = 0.0;
  if (act) {
#pragma omp simd reduction(+ : a_sum, b_sum, x_sum)
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (x[i] + shift) * rstd;
      const float du = silu_grad_float(dy[i], xhat * w + b);
      du_out[i] = du;
      a_sum += static_cast<double>(du * xhat);
      b_sum += static_cast<double>(du);
      x_sum += static_cast<double>(xhat);
    }
  } else {
#pragma omp simd reduction(+ : a_sum, b_sum, x_sum)
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (x[i] + shift) * rstd;
      a_sum += static_cast<double>(dy[i] * xhat);
      b_sum += static_cast<double>(dy[i]);
      x_sum += static_cast<double>(xhat);
    }
  }
  out[0] = a_sum;
  out[1] = b_sum;
  out[2] = x_sum;
}

// Backward pass 2 over one contiguous (n, c) row: dx = rstd (w du - m1 - xhat m2),
// du being dy without SiLU or pass 1's stored du with it. `du` may be `dx`.
void backward_row_dx_portable(const float* du, const float* x, int64_t count, float shift, float rstd, float w,
                              float m1, float m2, float* dx) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float xhat = (x[i] + shift) * rstd;
    dx[i] = rstd * (du[i] * w - m1 - xhat * m2);
  }
}

#if DDPM_FAST_X86_SIMD
// Sum of the 8 lanes, in double.
__attribute__((target("avx2"))) inline double lane_sum(__m256 v) {
  const __m256d wide = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(wide), _mm256_extractf128_pd(wide, 1));
  return _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
}

// backward_row_sums_portable in AVX2: float lanes over chunks of kChunk
// elements, each chunk's sums added in double.
__attribute__((target("avx2,fma"))) void backward_row_sums_avx2(const float* dy, const float* x, int64_t count,
                                                                float shift, float rstd, float w, float b, bool act,
                                                                double* out, float* du_out) {
  const __m256 vshift = _mm256_set1_ps(shift), vrstd = _mm256_set1_ps(rstd);
  const __m256 vw = _mm256_set1_ps(w), vb = _mm256_set1_ps(b);
  const int64_t vector_end = count - count % 8;
  double a_sum = 0.0, b_sum = 0.0, x_sum = 0.0;
  for (int64_t i0 = 0; i0 < vector_end; i0 += kChunk) {
    const int64_t i1 = std::min(i0 + kChunk, vector_end);
    __m256 acc_a = _mm256_setzero_ps(), acc_b = _mm256_setzero_ps(), acc_x = _mm256_setzero_ps();
    for (int64_t i = i0; i < i1; i += 8) {
      const __m256 xhat = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(x + i), vshift), vrstd);
      __m256 du = _mm256_loadu_ps(dy + i);
      if (act) {
        du = silu_grad_avx2(du, _mm256_fmadd_ps(xhat, vw, vb));
        _mm256_storeu_ps(du_out + i, du);
      }
      acc_a = _mm256_fmadd_ps(du, xhat, acc_a);
      acc_b = _mm256_add_ps(acc_b, du);
      acc_x = _mm256_add_ps(acc_x, xhat);
    }
    a_sum += lane_sum(acc_a);
    b_sum += lane_sum(acc_b);
    x_sum += lane_sum(acc_x);
  }
  double tail[3];
  backward_row_sums_portable(dy + vector_end, x + vector_end, count - vector_end, shift, rstd, w, b, act, tail,
                             act ? du_out + vector_end : nullptr);
  out[0] = a_sum + tail[0];
  out[1] = b_sum + tail[1];
  out[2] = x_sum + tail[2];
}

// backward_row_dx_portable in AVX2.
__attribute__((target("avx2,fma"))) void backward_row_dx_avx2(const float* du, const float* x, int64_t count,
                                                              float shift, float rstd, float w, float m1, float m2,
                                                              float* dx) {
  const __m256 vshift = _mm256_set1_ps(shift), vrstd = _mm256_set1_ps(rstd), vw = _mm256_set1_ps(w);
  const __m256 vm1 = _mm256_set1_ps(m1), vm2 = _mm256_set1_ps(m2);
  const int64_t vector_end = count - count % 8;
  for (int64_t i = 0; i < vector_end; i += 8) {
    const __m256 xhat = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(x + i), vshift), vrstd);
    // rstd * (du * w - m1 - xhat * m2)
    const __m256 inner = _mm256_sub_ps(_mm256_fmsub_ps(_mm256_loadu_ps(du + i), vw, vm1), _mm256_mul_ps(xhat, vm2));
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(vrstd, inner));
  }
  backward_row_dx_portable(du + vector_end, x + vector_end, count - vector_end, shift, rstd, w, m1, m2, dx + vector_end);
}

#endif  // DDPM_FAST_X86_SIMD

// Backward pass 1 over one contiguous (n, c) row of floats (see the portable version).
void backward_row_sums(const float* dy, const float* x, int64_t count, float shift, float rstd, float w, float b,
                       bool act, double* out, float* du_out) {
  DDPM_SIMD_PICK(backward_row_sums_avx2, backward_row_sums_portable)(dy, x, count, shift, rstd, w, b, act, out, du_out);
}

// Backward pass 2 over one contiguous (n, c) row (see the portable version).
void backward_row_dx(const float* du, const float* x, int64_t count, float shift, float rstd, float w, float m1,
                     float m2, float* dx) {
  DDPM_SIMD_PICK(backward_row_dx_avx2, backward_row_dx_portable)(du, x, count, shift, rstd, w, m1, m2, dx);
}

// channels_last rows: one pixel's C channels, with per-channel coefficients
// (arrays of C floats). Pass 1 adds each channel's du * xhat, du and xhat to
// float accumulators and, with `act`, stores du to `du_out`; pass 2 writes
// dx = rstd (du w - m1 - xhat m2) from du (dy, or the stored du; may be dx).
struct PixelCoefs {
  const float *shift, *rstd, *w, *b, *m1, *m2;  // b only in pass 1, m1 and m2 only in pass 2
};

void pixel_row_sums_portable(const float* dy, const float* x, int64_t c_total, const PixelCoefs& k, bool act,
                             float* acc_a, float* acc_b, float* acc_x, float* du_out) {
  for (int64_t c = 0; c < c_total; ++c) {
    const float xhat = (x[c] + k.shift[c]) * k.rstd[c];
    float du = dy[c];
    if (act) du_out[c] = du = silu_grad_float(du, xhat * k.w[c] + k.b[c]);
    acc_a[c] += du * xhat;
    acc_b[c] += du;
    acc_x[c] += xhat;
  }
}

void pixel_row_dx_portable(const float* du, const float* x, int64_t c_total, const PixelCoefs& k, float* dx) {
  for (int64_t c = 0; c < c_total; ++c) {
    const float xhat = (x[c] + k.shift[c]) * k.rstd[c];
    dx[c] = k.rstd[c] * (du[c] * k.w[c] - k.m1[c] - xhat * k.m2[c]);
  }
}

#if DDPM_FAST_X86_SIMD
__attribute__((target("avx2,fma"))) void pixel_row_sums_avx2(const float* dy, const float* x, int64_t c_total,
                                                             const PixelCoefs& k, bool act, float* acc_a, float* acc_b,
                                                             float* acc_x, float* du_out) {
  const int64_t vector_end = c_total - c_total % 8;
  for (int64_t c = 0; c < vector_end; c += 8) {
    const __m256 xhat = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(k.shift + c)),
                                      _mm256_loadu_ps(k.rstd + c));
    __m256 du = _mm256_loadu_ps(dy + c);
    if (act) {
      du = silu_grad_avx2(du, _mm256_fmadd_ps(xhat, _mm256_loadu_ps(k.w + c), _mm256_loadu_ps(k.b + c)));
      _mm256_storeu_ps(du_out + c, du);
    }
    _mm256_storeu_ps(acc_a + c, _mm256_fmadd_ps(du, xhat, _mm256_loadu_ps(acc_a + c)));
    _mm256_storeu_ps(acc_b + c, _mm256_add_ps(du, _mm256_loadu_ps(acc_b + c)));
    _mm256_storeu_ps(acc_x + c, _mm256_add_ps(xhat, _mm256_loadu_ps(acc_x + c)));
  }
  const PixelCoefs tail{k.shift + vector_end, k.rstd + vector_end, k.w + vector_end, k.b + vector_end, nullptr, nullptr};
  pixel_row_sums_portable(dy + vector_end, x + vector_end, c_total - vector_end, tail, act, acc_a + vector_end,
                          acc_b + vector_end, acc_x + vector_end, act ? du_out + vector_end : nullptr);
}

__attribute__((target("avx2,fma"))) void pixel_row_dx_avx2(const float* du, const float* x, int64_t c_total,
                                                           const PixelCoefs& k, float* dx) {
  const int64_t vector_end = c_total - c_total % 8;
  for (int64_t c = 0; c < vector_end; c += 8) {
    const __m256 rstd = _mm256_loadu_ps(k.rstd + c);
    const __m256 xhat = _mm256_mul_ps(_mm256_add_ps(_mm256_loadu_ps(x + c), _mm256_loadu_ps(k.shift + c)), rstd);
    const __m256 inner = _mm256_sub_ps(_mm256_fmsub_ps(_mm256_loadu_ps(du + c), _mm256_loadu_ps(k.w + c),
                                                       _mm256_loadu_ps(k.m1 + c)),
                                       _mm256_mul_ps(xhat, _mm256_loadu_ps(k.m2 + c)));
    _mm256_storeu_ps(dx + c, _mm256_mul_ps(rstd, inner));
  }
  const PixelCoefs tail{k.shift + vector_end, k.rstd + vector_end, k.w + vector_end,
                        nullptr,              k.m1 + vector_end,   k.m2 + vector_end};
  pixel_row_dx_portable(du + vector_end, x + vector_end, c_total - vector_end, tail, dx + vector_end);
}
#endif  // DDPM_FAST_X86_SIMD

}  // namespace
}  // namespace ddpm_fast
