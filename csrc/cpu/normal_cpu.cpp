// The Philox stream of csrc/philox.h, 64 counters at a time.
//
// Scalar logf/cosf calls would keep the loop from vectorizing and cost most of
// the time, so log and cos are the Cephes single-precision polynomials
// (S. Moshier), written branch-free. Over the arguments used here (u1 in
// [1e-7, 1), 2*pi*u2 in [0, 2*pi)) they are within a few ulp of libm, which is
// the "to float rounding" agreement DESIGN.md asks of the backends.
#include "normal_cpu.h"

#include <cmath>
#include <cstring>

#include "../philox.h"

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

// Natural log of a positive normal float.
DDPM_ALWAYS_INLINE float log_pos(float x) {
  const int32_t bits = float_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 126;               // x = m * 2^e
  float m = bits_float((bits & 0x007fffff) | 0x3f000000);  // m in [0.5, 1)
  const bool low = m < 0.707106781186547524f;            // keep m near 1
  e = low ? e - 1 : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;  // ln 2 split in two for accuracy
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// cos(x) for x >= 0 of moderate size, reduced to [-pi/4, pi/4] by octant.
DDPM_ALWAYS_INLINE float cos_pos(float x) {
  int32_t j = static_cast<int32_t>(1.27323954473516f * x);  // 4/pi
  j += j & 1;
  const float y = static_cast<float>(j);
  j &= 7;
  float sign = 1.0f;
  if (j > 3) {
    j -= 4;
    sign = -sign;
  }
  if (j > 1) sign = -sign;
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) -
                  y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) *
                      z * z - 0.5f * z + 1.0f;
  const bool use_sin = (j == 1) || (j == 2);
  return sign * (use_sin ? s : c);
}

}  // namespace

__attribute__((target_clones("avx2", "default"))) void normal_block(uint64_t seed, const uint64_t* ctr,
                                                                    float* z) {
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
      const uint32_t p0 = c0[i], p2 = c2[i];
      c0[i] = mulhi32(kPhiloxRoundB, p2) ^ c1[i] ^ k0;
      c2[i] = mulhi32(kPhiloxRoundA, p0) ^ c3[i] ^ k1;
      c1[i] = kPhiloxRoundB * p2;
      c3[i] = kPhiloxRoundA * p0;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
#pragma omp simd
  for (int64_t i = 0; i < B; ++i) {
    const float u1 = std::fmax(kMinUniform, uint_to_uniform(c0[i]));
    const float u2 = uint_to_uniform(c1[i]);
    z[i] = std::sqrt(-2.0f * log_pos(u1)) * cos_pos(kTwoPi * u2);
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
