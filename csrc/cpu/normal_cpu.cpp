// The Philox stream of csrc/philox.h, 64 counters at a time.
//
// Scalar logf/cosf calls would keep the loop from vectorizing and cost most of
// the time, so log and cos are the Cephes single-precision polynomials
// (S. Moshier), written branch-free. Over the arguments used here (u1 in
// [1e-7, 1), 2*pi*u2 in [0, 2*pi)) they are within a few ulp of libm, which is
// the "to float rounding" agreement DESIGN.md asks of the backends.
#include "normal_cpu.h"

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "../philox.h"
#include "simd_vec.h"

namespace ddpm_fast {
namespace cpu {
namespace {

#define DDPM_ALWAYS_INLINE inline __attribute__((always_inline))

DDPM_ALWAYS_INLINE int32_t float_bits(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

DDPM_ALWAYS_INLINE float bits_float(int32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// log_pos's polynomial in m, highest power first; each subtraction of c is
// written as an addition of -c, which rounds the same (the vector paths use it too).
constexpr float kLogPoly[9] = {7.0376836292e-2f,  -1.1514610310e-1f, 1.1676998740e-1f,
                               -1.2420140846e-1f, 1.4249322787e-1f,  -1.6668057665e-1f,
                               2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};

// Natural log of a positive normal float.
DDPM_ALWAYS_INLINE float log_pos(float x) {
  const int32_t bits = float_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;               // x = m * 2^e
  float m = bits_float((bits & 0x007fffff) | 0x3f000000);  // m in [0.5, 1)
  const bool low = m < 0.707106781186547524f;            // keep m near 1
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = kLogPoly[0];
  for (int j = 1; j < 9; ++j) y = y * m + kLogPoly[j];
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;  // ln 2 split in two for accuracy
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// cos(x) for x >= 0 of moderate size: reduced by the even multiple j of pi/4
// nearest below-or-at x to r in [-pi/4, pi/4]; by j mod 8 (0, 2, 4, 6) the
// result is cos r, -sin r, -cos r, sin r. Branch-free so the loop vectorizes.
DDPM_ALWAYS_INLINE float cos_pos(float x) {
  int32_t j = static_cast<int32_t>(1.27323954473516f * x);  // 4/pi
  j += j & 1;
  const float y = static_cast<float>(j);
  const int32_t octant = j & 7;
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;  // pi/4 in three parts
  const float z = r * r;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) *
                      z * z - 0.5f * z + 1.0f;
  const float sign = static_cast<float>(1 - 2 * (((octant + 2) >> 2) & 1));
  return sign * ((octant & 2) ? s : c);
}

// The normals of Philox words w0, w1 (Box-Muller, as csrc/philox.h defines).
DDPM_ALWAYS_INLINE void box_muller_block(const uint32_t* w0, const uint32_t* w1, float* z) {
#pragma omp simd
  for (int64_t i = 0; i < kNormalBlock; ++i) {
    const float u = uint_to_uniform(w0[i]);
    const float u1 = u > kMinUniform ? u : kMinUniform;
    const float u2 = uint_to_uniform(w1[i]);
    z[i] = std::sqrt(-2.0f * log_pos(u1)) * cos_pos(kTwoPi * u2);
  }
}

// Portable x86-64 (SSE2) path: Philox with rounds outside and lanes inside, so
// that the compiler vectorizes each round across the block.
void normal_block_portable(uint64_t seed, const uint64_t* ctr, float* z) {
  constexpr int64_t B = kNormalBlock;
  uint32_t c0[B], c1[B], c2[B], c3[B];
  for (int64_t i = 0; i < B; ++i) {
    c0[i] = static_cast<uint32_t>(ctr[i]);
    c1[i] = static_cast<uint32_t>(ctr[i] >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
#pragma omp simd
    for (int64_t i = 0; i < B; ++i) {
      const uint64_t pb = static_cast<uint64_t>(kPhiloxRoundB) * c2[i];
      const uint64_t pa = static_cast<uint64_t>(kPhiloxRoundA) * c0[i];
      c0[i] = static_cast<uint32_t>(pb >> 32) ^ c1[i] ^ k0;
      c2[i] = static_cast<uint32_t>(pa >> 32) ^ c3[i] ^ k1;
      c1[i] = static_cast<uint32_t>(pb);
      c3[i] = static_cast<uint32_t>(pa);
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  box_muller_block(c0, c1, z);
}

void normal_run_portable(uint64_t seed, uint64_t first, float* z) {
  uint64_t ctr[kNormalBlock];
  for (int64_t i = 0; i < kNormalBlock; ++i) ctr[i] = first + static_cast<uint64_t>(i);
  normal_block_portable(seed, ctr, z);
}

}  // namespace

#if DDPM_FAST_X86_SIMD
// The vector paths (normal_block_simd.inc), for AVX2 and for AVX-512.
DDPM_TARGET_AVX2_BEGIN
namespace avx2 {
namespace {
using V = Avx2;
#include "normal_block_simd.inc"
}  // namespace
}  // namespace avx2
DDPM_TARGET_END

DDPM_TARGET_AVX512_BEGIN
namespace avx512 {
namespace {
using V = Avx512;
#include "normal_block_simd.inc"
}  // namespace
}  // namespace avx512
DDPM_TARGET_AVX512_END
#endif  // DDPM_FAST_X86_SIMD

// DDPM_FAST_CPU_SIMD=avx2 or none forces a narrower path (tests compare them).
void normal_block(uint64_t seed, const uint64_t* ctr, float* z) { DDPM_SIMD_PICK(normal_block)(seed, ctr, z); }

void normal_run(uint64_t seed, uint64_t first, float* z) { DDPM_SIMD_PICK(normal_run)(seed, first, z); }

}  // namespace cpu
}  // namespace ddpm_fast
