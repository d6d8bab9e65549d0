// The row loops of the CPU GroupNorm+SiLU (group_norm_silu_cpu.cpp and
// group_norm_silu_backward_cpu.cpp drive them over tensors): SiLU and its
// gradient, the moments of a row, and both backward passes over NCHW rows and
// channels_last pixel rows, the hand-vectorized ones in AVX2 + FMA, in
// AVX-512 and portably, picked at run time by DDPM_SIMD_CALL (only the
// portable loops where simd.h finds no x86).
//
// The loops take rows of x, dy and dx of float, c10::Half or c10::BFloat16
// and compute in float (the backward's stored du is float): the vector loops
// convert in registers, the portable ones value by value (the forward's
// moment loops a row to a float buffer first, which keeps their sums in the
// float loop's order).
//
// Free of ATen; meant for those two .cpp files (its functions are internal to
// the file that includes it, and inline, so that each keeps those it uses).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "float16_cpu.h"
#include "simd_vec.h"

namespace ddpm_fast {
namespace {

// exp(x) for float, a polynomial on x = k ln2 + r, branch-free so that loops
// over it vectorize (within 1.4 ulp of exp over [-87, 88], 1.1 with fused
// multiply-adds; checked at every 4th float there). The polynomial sees x
// clamped to that range (NaN too, keeping the int conversion defined); the
// ends are restored last: exp(NaN) = NaN and exp(x > 88) = +Inf, so that
// silu(-Inf) = -Inf / (1 + Inf) is NaN, as F.silu has it.
// The polynomial is the degree-6 minimax fit of exp(r) in relative error on
// |r| <= ln2 / 2 (Remez exchange in double; 1.9e-9, 1.7e-8 with the
// coefficients rounded to float), highest power first. Cephes' degree-7 form
// (1 + r + r^2 P(r), 8 operations) was as accurate in float and cost the
// AVX-512 SiLU loop 0.33 ns a value in cache against 0.29 for these 6 fused
// multiply-adds. The AVX-512 loops use it too.
constexpr float kExpPoly[7] = {1.3836815488e-3f, 8.3748400211e-3f, 4.1668228805e-2f, 1.6666419804e-1f,
                               4.9999991059e-1f, 1.0f,             1.0f};

// The AVX2 loops' exp (group_norm_silu_rows_simd.inc) on a finer reduction:
// 2^(j / 8) rounded to float, j = 0 .. 7, and exp(r) = 1 + r + r^2 P(r) on
// |r| <= ln2 / 16, P of degree 1 (the minimax fit in relative error, by
// Lawson's iteration in double: 2.6e-8 with its coefficients rounded to
// float), highest power first.
alignas(32) constexpr float kExp2Eighths[8] = {1.0f,          1.090507746e+00f, 1.189207077e+00f, 1.296839595e+00f,
                                               1.414213538f, 1.542210817e+00f, 1.681792855e+00f, 1.834008098e+00f};
constexpr float kExpPolyEighth[2] = {1.6666857898e-01f, 5.0006449223e-01f};

inline __attribute__((always_inline)) float exp_poly(float x_in) {
  const float x = x_in >= -87.0f ? (x_in <= 88.0f ? x_in : 88.0f) : -87.0f;
  // floor(x log2e + 0.5) by truncating a positive value (vectorizes without SSE4.1's round).
  const int32_t k_int = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float k = static_cast<float>(k_int);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = kExpPoly[0];
  for (int j = 1; j < 7; ++j) p = p * r + kExpPoly[j];
  const int32_t bits = (k_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float e = p * scale;
  return x_in > 88.0f ? std::numeric_limits<float>::infinity() : (x_in == x_in ? e : x_in);
}

// Sums of (in[i] - shift) and of its squares over a row of at most kChunk
// values, in float, added to the double totals (16-bit rows: the template
// overload after kChunk). The shift (about the row's
// values) keeps the float sums from cancelling; over rows this short their
// rounding stays far below the tests' tolerances. (The vector versions keep
// several partial sums, so their rounding differs slightly from this loop's.)
inline void row_moments_portable(const float* in, int64_t count, float shift, double* sum, double* sumsq) {
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

// NCHW rows shorter than this (the U-Net's 8x8, 4x4 and 2x2 maps, ...) go
// through the affine+SiLU pass a whole (sample, group) block at a time, by
// affine_act_channels: row by row, the vector loops would run mostly partial
// vectors (a row of 4 fills a quarter of an AVX-512 vector) and pay a call's
// fixed costs every few vectors; with add, their moments go by
// block_moments_add. On the AVX-512 VM (2026-12-01, alternating old and new
// in one process, fp32, 32 groups) blocks ran 1.3-1.5x faster than the
// per-element coefficient arrays before them at 32x256x4x4 and 2x2 (1.2-1.35x
// with add), 1.1-1.2x faster than rows at 8x8, 1.06-1.09x at 9x9, but
// 0.87-0.97x at 12x12 and 16x16.
constexpr int64_t kShortRow = 128;
// The coefficient arrays given to affine_act_channels hold this many floats
// past their last row's (the vector loops load whole vectors from any row).
constexpr int64_t kChannelPad = 16;
// For a vector that starts r values into a row of `count` < kShortRow values,
// the row (relative to its own) that each of its first 16 lanes falls in:
// offset[r][j] = (r + j) / count (affine_act_channels' permutation indices).
struct RowLanes {
  int32_t offset[kShortRow][16];
  int64_t count;
  explicit RowLanes(int64_t row_count) : count(row_count) {
    for (int64_t r = 0; r < count; ++r) {
      int32_t row = 0;
      for (int64_t j = 0, in_row = r; j < 16; ++j, ++in_row) {  // no divisions: the table is built per task
        if (in_row == count) {
          in_row = 0;
          ++row;
        }
        offset[r][j] = row;
      }
    }
  }
};
// The same over `rows` rows of lanes.count values (at most kChunk in all), of
// in + add[k] - shift in row k (add padded by kChannelPad), the sum rounded to
// float first as x + add is in the reference: an NCHW block of short rows.
inline void block_moments_add_portable(const float* in, const float* add, int64_t rows, const RowLanes& lanes,
                                       float shift, double* sum, double* sumsq) {
  float s = 0.0f, q = 0.0f;
  for (int64_t k = 0; k < rows; ++k) {
    const float* row = in + k * lanes.count;
#pragma omp simd reduction(+ : s, q)
    for (int64_t i = 0; i < lanes.count; ++i) {
      const float v = (row[i] + add[k]) - shift;
      s += v;
      q += v * v;
    }
  }
  *sum += s;
  *sumsq += q;
}

// The per-channel moments of `pixels` channels_last pixel rows of c_total
// channels (row p at rows + p c_total): the sums of (row[c] - shift[c]) and of
// its squares added to float accumulators.
template <class T>
inline void pixel_moments_portable(const T* rows, const float* shift, int64_t c_total, int64_t pixels, float* sum,
                                   float* sumsq) {
  for (int64_t p = 0; p < pixels; ++p) {
    const T* row = rows + p * c_total;
#pragma omp simd
    for (int64_t c = 0; c < c_total; ++c) {
      const float v = static_cast<float>(row[c]) - shift[c];
      sum[c] += v;
      sumsq[c] += v * v;
    }
  }
}

// The float sums of the moment loops and of the backward's pass 1 run over at
// most this many values (the forward calls its moment loops chunk by chunk,
// whatever T is).
constexpr int64_t kChunk = 1024;

// 16-bit rows of the two moment loops above go to a float buffer first:
// converted value by value inside the loop, gcc leaves the sums unvectorized,
// and their rounding would differ from that of the same values given as float.
template <class T>
inline void row_moments_portable(const T* in, int64_t count, float shift, double* sum, double* sumsq) {
  float buffer[kChunk];
  row_moments_portable(cpu::as_float_row(in, count, buffer), count, shift, sum, sumsq);
}
template <class T>
inline void block_moments_add_portable(const T* in, const float* add, int64_t rows, const RowLanes& lanes, float shift,
                                       double* sum, double* sumsq) {
  float buffer[kChunk];
  block_moments_add_portable(cpu::as_float_row(in, rows * lanes.count, buffer), add, rows, lanes, shift, sum, sumsq);
}

// out[i] = act(in[i] * scale[i * step] + shift[i * step]) over `rows`
// consecutive rows of `count` elements (row r from in + r count to
// out + r count), each with the same coefficients; step 0 broadcasts one
// scale/shift (an NCHW channel row), step 1 reads one per element (NHWC pixel
// rows, one channel each; a sample's rows go in one call, not a call each).
//
// The four cases are separate loops: with `step` and `act` inside, gcc
// vectorized none of them (scale[i * step] is a gather to it).
template <bool kAct, bool kBroadcast, class T>
inline void affine_act_loop(const T* in, const float* scale, const float* shift, int64_t count, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float u = static_cast<float>(in[i]) * scale[kBroadcast ? 0 : i] + shift[kBroadcast ? 0 : i];
    out[i] = static_cast<T>(kAct ? u / (1.0f + exp_poly(-u)) : u);
  }
}

// What a row loop pulls into L2 while it computes: the input row of the
// caller's next task, element i of this row bringing in bytes
// [i size, (i + 1) size) of it. (The vector loops spread these prefetches over
// the row; the portable loop ignores them.)
struct Prefetch {
  const char* in;  // null: none
  int64_t size;    // bytes per element
  // The same prefetches for a row `offset` elements on.
  Prefetch at(int64_t offset) const { return {in == nullptr ? nullptr : in + offset * size, size}; }
};

template <class T>
inline void affine_act_row_portable(const T* in, const float* scale, const float* shift, int64_t step, int64_t count,
                                    int64_t rows, bool act, T* out, Prefetch /*ahead*/) {
  const auto loop = step == 0 ? (act ? affine_act_loop<true, true, T> : affine_act_loop<false, true, T>)
                              : (act ? affine_act_loop<true, false, T> : affine_act_loop<false, false, T>);
  for (int64_t r = 0; r < rows; ++r) loop(in + r * count, scale, shift, count, out + r * count);
}

// out = act(in * scale[k] + shift[k]) over `rows` consecutive rows of
// lanes.count values, row k with scale[k] and shift[k] (an NCHW block of short
// rows; the arrays padded by kChannelPad). The vector loops run the block as
// one row, each vector's coefficients permuted from the W rows' from its first.
template <class T>
inline void affine_act_channels_portable(const T* in, const float* scale, const float* shift, int64_t rows,
                                         const RowLanes& lanes, bool act, T* out) {
  const int64_t count = lanes.count;
  for (int64_t k = 0; k < rows; ++k)
    (act ? affine_act_loop<true, true, T> : affine_act_loop<false, true, T>)(in + k * count, scale + k, shift + k,
                                                                             count, out + k * count);
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
template <class Tdy, class T>
inline void backward_row_sums_portable(const Tdy* dy, const T* x, int64_t count, float shift, float rstd, float w,
                                       float b, bool act, double* out, float* du_out) {
  double a_sum = 0.0, b_sum = 0.0, x_sum = 0.0;
  if (act) {
#pragma omp simd reduction(+ : a_sum, b_sum, x_sum)
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (static_cast<float>(x[i]) + shift) * rstd;
      const float du = silu_grad_float(static_cast<float>(dy[i]), xhat * w + b);
      du_out[i] = du;
      a_sum += static_cast<double>(du * xhat);
      b_sum += static_cast<double>(du);
      x_sum += static_cast<double>(xhat);
    }
  } else {
#pragma omp simd reduction(+ : a_sum, b_sum, x_sum)
    for (int64_t i = 0; i < count; ++i) {
      const float xhat = (static_cast<float>(x[i]) + shift) * rstd;
      const float d = static_cast<float>(dy[i]);
      a_sum += static_cast<double>(d * xhat);
      b_sum += static_cast<double>(d);
      x_sum += static_cast<double>(xhat);
    }
  }
  out[0] = a_sum;
  out[1] = b_sum;
  out[2] = x_sum;
}

// Backward pass 2 over one contiguous (n, c) row: dx = rstd (w du - m1 - xhat m2),
// du being dy without SiLU or pass 1's stored du with it. `du` may be `dx`.
template <class Tdu, class T>
inline void backward_row_dx_portable(const Tdu* du, const T* x, int64_t count, float shift, float rstd, float w,
                                     float m1, float m2, T* dx) {
#pragma omp simd
  for (int64_t i = 0; i < count; ++i) {
    const float xhat = (static_cast<float>(x[i]) + shift) * rstd;
    dx[i] = static_cast<T>(rstd * (static_cast<float>(du[i]) * w - m1 - xhat * m2));
  }
}

// backward_row_sums without act over a block's rows, one call per block (see
// the SIMD version).
template <class Tdu, class T>
inline void backward_block_sums_portable(const Tdu* du, const T* x, int64_t rows, int64_t count, const float* shift,
                                         float rstd, const float* w, const float* b, double* a, double* b_sums,
                                         double* x_sums) {
  for (int64_t k = 0; k < rows; ++k) {
    double sums[3];
    backward_row_sums_portable(du + k * count, x + k * count, count, shift[k], rstd, w[k], b[k], false, sums, nullptr);
    a[k] = sums[0];
    b_sums[k] = sums[1];
    x_sums[k] = sums[2];
  }
}

// Backward pass 1 over `rows` consecutive NCHW rows of `count` values (a
// batch of blocks of short rows), row k with shift[k], rstd[k], w[k] and b[k]:
// with `act`, du (dL/du through SiLU) stored to du_out for pass 2; without,
// du = dy. Each row's sums A = sum du * xhat, B = sum du and X = sum xhat
// into a[k], b_sums[k] and x_sums[k]. One pass where silu_grad_block then
// backward_block_sums read each row twice and reduced each row's three sums
// on their own. The vector loops take rows of at least a vector (false
// otherwise: silu_grad_block and backward_block_sums then run); each row's
// sums are float, its lanes summed in a fixed order (see rows_sums).
template <class Tdy, class T>
inline bool backward_rows_sums_portable(const Tdy* dy, const T* x, int64_t rows, int64_t count, const float* shift,
                                        const float* rstd, const float* w, const float* b, bool act, float* du_out,
                                        double* a, double* b_sums, double* x_sums) {
  for (int64_t k = 0; k < rows; ++k) {
    double sums[3];
    backward_row_sums_portable(dy + k * count, x + k * count, count, shift[k], rstd[k], w[k], b[k], act, sums,
                               act ? du_out + k * count : nullptr);
    a[k] = sums[0];
    b_sums[k] = sums[1];
    x_sums[k] = sums[2];
  }
  return true;
}

// The backward over an NCHW block of `rows` short rows (RowLanes), row k with
// shift[k], w[k] and b[k] (arrays padded by kChannelPad): silu_grad_block
// writes pass 1's du = dL/du through SiLU (whose sums then go row by row, as
// dy does without act), with rstd[k] in row k (padded too), so that it can
// run over several blocks at once; backward_block_dx writes pass 2's dx, with
// one rstd for the block; each with the row loops' arithmetic (same bits) over
// all its rows at once.
template <class T>
inline void silu_grad_block_portable(const T* dy, const T* x, int64_t rows, const RowLanes& lanes, const float* shift,
                                     const float* rstd, const float* w, const float* b, float* du) {
  const int64_t count = lanes.count;
  for (int64_t k = 0; k < rows; ++k) {
#pragma omp simd
    for (int64_t i = k * count; i < (k + 1) * count; ++i) {
      const float xhat = (static_cast<float>(x[i]) + shift[k]) * rstd[k];
      du[i] = silu_grad_float(static_cast<float>(dy[i]), xhat * w[k] + b[k]);
    }
  }
}
template <class Tdu, class T>
inline void backward_block_dx_portable(const Tdu* du, const T* x, int64_t rows, const RowLanes& lanes,
                                       const float* shift, float rstd, const float* w, float m1, float m2, T* dx) {
  const int64_t count = lanes.count;
  for (int64_t k = 0; k < rows; ++k)
    backward_row_dx_portable(du + k * count, x + k * count, count, shift[k], rstd, w[k], m1, m2, dx + k * count);
}

// channels_last rows: `rows` consecutive pixel rows of C channels each, with
// per-channel coefficients (arrays of C floats). Pass 1 adds each channel's
// du * xhat, du and xhat to float accumulators, row after row, and, with
// `act`, stores du to `du_out`; pass 2 writes dx = rstd (du w - m1 - xhat m2)
// from du (dy, or the stored du; may be dx).
struct PixelCoefs {
  const float *shift, *rstd, *w, *b, *m1, *m2;  // b only in pass 1, m1 and m2 only in pass 2
};

template <class T>
inline void pixel_row_sums_portable(const T* dy, const T* x, int64_t c_total, int64_t rows, const PixelCoefs& k,
                                    bool act, float* acc_a, float* acc_b, float* acc_x, float* du_out) {
  for (int64_t p = 0; p < rows; ++p, dy += c_total, x += c_total, du_out += act ? c_total : 0) {
    for (int64_t c = 0; c < c_total; ++c) {
      const float xhat = (static_cast<float>(x[c]) + k.shift[c]) * k.rstd[c];
      float du = static_cast<float>(dy[c]);
      if (act) du_out[c] = du = silu_grad_float(du, xhat * k.w[c] + k.b[c]);
      acc_a[c] += du * xhat;
      acc_b[c] += du;
      acc_x[c] += xhat;
    }
  }
}

template <class Tdu, class T>
inline void pixel_row_dx_portable(const Tdu* du, const T* x, int64_t c_total, int64_t rows, const PixelCoefs& k,
                                  T* dx) {
  for (int64_t p = 0; p < rows; ++p, du += c_total, x += c_total, dx += c_total) {
    for (int64_t c = 0; c < c_total; ++c) {
      const float xhat = (static_cast<float>(x[c]) + k.shift[c]) * k.rstd[c];
      dx[c] = static_cast<T>(k.rstd[c] * (static_cast<float>(du[c]) * k.w[c] - k.m1[c] - xhat * k.m2[c]));
    }
  }
}

#if DDPM_FAST_X86_SIMD
// The same loops in AVX2 + FMA and in AVX-512 (group_norm_silu_rows_simd.inc).
DDPM_TARGET_AVX2_BEGIN
namespace avx2 {
using V = cpu::Avx2;
#include "group_norm_silu_rows_simd.inc"
}  // namespace avx2
DDPM_TARGET_END

DDPM_TARGET_AVX512_BEGIN
namespace avx512 {
using V = cpu::Avx512;
#include "group_norm_silu_rows_simd.inc"
}  // namespace avx512
DDPM_TARGET_AVX512_END
#endif  // DDPM_FAST_X86_SIMD

// The widest of each that this CPU runs (simd.h).
template <class T>
inline void row_moments(const T* in, int64_t count, float shift, double* sum, double* sumsq) {
  DDPM_SIMD_CALL(row_moments, in, count, shift, sum, sumsq);
}
template <class T>
inline void block_moments_add(const T* in, const float* add, int64_t rows, const RowLanes& lanes, float shift,
                              double* sum, double* sumsq) {
  DDPM_SIMD_CALL(block_moments_add, in, add, rows, lanes, shift, sum, sumsq);
}

template <class T>
inline void pixel_moments(const T* rows, const float* shift, int64_t c_total, int64_t pixels, float* sum,
                          float* sumsq) {
  DDPM_SIMD_CALL(pixel_moments, rows, shift, c_total, pixels, sum, sumsq);
}

template <class T>
inline void affine_act_row(const T* in, const float* scale, const float* shift, int64_t step, int64_t count,
                           int64_t rows, bool act, T* out, Prefetch ahead) {
  DDPM_SIMD_CALL(affine_act_row, in, scale, shift, step, count, rows, act, out, ahead);
}

template <class T>
inline void affine_act_channels(const T* in, const float* scale, const float* shift, int64_t rows,
                                const RowLanes& lanes, bool act, T* out) {
  DDPM_SIMD_CALL(affine_act_channels, in, scale, shift, rows, lanes, act, out);
}
template <class Tdy, class T>
inline void backward_row_sums(const Tdy* dy, const T* x, int64_t count, float shift, float rstd, float w, float b,
                              bool act, double* out, float* du_out) {
  DDPM_SIMD_CALL(backward_row_sums, dy, x, count, shift, rstd, w, b, act, out, du_out);
}

template <class Tdu, class T>
inline void backward_block_sums(const Tdu* du, const T* x, int64_t rows, int64_t count, const float* shift,
                                float rstd, const float* w, const float* b, double* a, double* b_sums,
                                double* x_sums) {
  DDPM_SIMD_CALL(backward_block_sums, du, x, rows, count, shift, rstd, w, b, a, b_sums, x_sums);
}
template <class Tdy, class T>
inline bool backward_rows_sums(const Tdy* dy, const T* x, int64_t rows, int64_t count, const float* shift,
                               const float* rstd, const float* w, const float* b, bool act, float* du_out, double* a,
                               double* b_sums, double* x_sums) {
  return DDPM_SIMD_CALL(backward_rows_sums, dy, x, rows, count, shift, rstd, w, b, act, du_out, a, b_sums, x_sums);
}
template <class T>
inline void silu_grad_block(const T* dy, const T* x, int64_t rows, const RowLanes& lanes, const float* shift,
                            const float* rstd, const float* w, const float* b, float* du) {
  DDPM_SIMD_CALL(silu_grad_block, dy, x, rows, lanes, shift, rstd, w, b, du);
}
template <class Tdu, class T>
inline void backward_block_dx(const Tdu* du, const T* x, int64_t rows, const RowLanes& lanes, const float* shift,
                              float rstd, const float* w, float m1, float m2, T* dx) {
  DDPM_SIMD_CALL(backward_block_dx, du, x, rows, lanes, shift, rstd, w, m1, m2, dx);
}
template <class Tdu, class T>
inline void backward_row_dx(const Tdu* du, const T* x, int64_t count, float shift, float rstd, float w, float m1,
                            float m2, T* dx) {
  DDPM_SIMD_CALL(backward_row_dx, du, x, count, shift, rstd, w, m1, m2, dx);
}
template <class T>
inline void pixel_row_sums(const T* dy, const T* x, int64_t c_total, int64_t rows, const PixelCoefs& k, bool act,
                           float* acc_a, float* acc_b, float* acc_x, float* du_out) {
  DDPM_SIMD_CALL(pixel_row_sums, dy, x, c_total, rows, k, act, acc_a, acc_b, acc_x, du_out);
}
template <class Tdu, class T>
inline void pixel_row_dx(const Tdu* du, const T* x, int64_t c_total, int64_t rows, const PixelCoefs& k, T* dx) {
  DDPM_SIMD_CALL(pixel_row_dx, du, x, c_total, rows, k, dx);
}

}  // namespace
}  // namespace ddpm_fast
