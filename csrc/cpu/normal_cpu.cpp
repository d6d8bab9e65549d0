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
#include "simd.h"

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

#if DDPM_FAST_X86_SIMD
// ---- AVX2 path: the same words and the same floats as the portable path ----
//
// Philox: each 32-bit word lives in the low half of a 64-bit lane, so one
// vpmuludq gives a round's high and low words with no repacking. The high
// halves are left holding garbage (vpmuludq reads only the low halves, and
// the final packing drops them), which saves masking. Box-Muller: intrinsics
// doing the scalar functions' operations in the same order, without FMA, so
// the results are bit-identical to the portable path (a test checks).

#define DDPM_AVX2_INLINE __attribute__((target("avx2"))) inline __attribute__((always_inline))

// uint_to_uniform of eight words: v < 0 ? ~v : v is v ^ (v >> 31).
DDPM_AVX2_INLINE __m256 uniform8(__m256i w) {
  const __m256i v = _mm256_xor_si256(w, _mm256_srai_epi32(w, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(kUintToUniform));
}

// Box-Muller over kVectors vectors of eight at once. Each function below runs
// its operations step by step across the vectors (the `for k` loops, unrolled),
// because one vector's log polynomial is a chain of about 20 dependent
// operations whose latency, one vector at a time, left the core idle. On the
// project's Zen 3 VM, one thread: normal_block 4.4 -> 3.9 ns per normal
// (two vectors: 4.1, eight: 3.9 with more spills).
constexpr int kVectors = 4;
#define DDPM_EACH_VECTOR _Pragma("GCC unroll 4") for (int k = 0; k < kVectors; ++k)

// log_pos of positive normal floats.
DDPM_AVX2_INLINE void log8x(const __m256* x, __m256* out) {
  __m256 m[kVectors], z[kVectors], y[kVectors], fe[kVectors];
  DDPM_EACH_VECTOR {
    const __m256i bits = _mm256_castps_si256(x[k]);
    __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));  // sign bit is 0
    const __m256 mant = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
    const __m256 low = _mm256_cmp_ps(mant, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    e = _mm256_add_epi32(e, _mm256_castps_si256(low));  // all-ones lanes: e - 1
    m[k] = _mm256_sub_ps(_mm256_blendv_ps(mant, _mm256_add_ps(mant, mant), low), _mm256_set1_ps(1.0f));
    z[k] = _mm256_mul_ps(m[k], m[k]);
    fe[k] = _mm256_cvtepi32_ps(e);
    y[k] = _mm256_set1_ps(7.0376836292e-2f);
  }
  // log_pos's Horner steps; adding -c rounds exactly as subtracting c.
  static constexpr float kPoly[8] = {-1.1514610310e-1f, 1.1676998740e-1f,  -1.2420140846e-1f, 1.4249322787e-1f,
                                     -1.6668057665e-1f, 2.0000714765e-1f,  -2.4999993993e-1f, 3.3333331174e-1f};
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    const __m256 c = _mm256_set1_ps(kPoly[j]);
    DDPM_EACH_VECTOR y[k] = _mm256_add_ps(_mm256_mul_ps(y[k], m[k]), c);
  }
  DDPM_EACH_VECTOR {
    __m256 r = _mm256_mul_ps(_mm256_mul_ps(y[k], m[k]), z[k]);
    r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_set1_ps(-2.12194440e-4f), fe[k]));
    r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_set1_ps(-0.5f), z[k]));
    out[k] = _mm256_add_ps(_mm256_add_ps(m[k], r), _mm256_mul_ps(_mm256_set1_ps(0.693359375f), fe[k]));
  }
}

// cos_pos of non-negative floats.
DDPM_AVX2_INLINE void cos8x(const __m256* x, __m256* out) {
  __m256i j[kVectors];
  __m256 r[kVectors], z[kVectors], s[kVectors], c[kVectors];
  DDPM_EACH_VECTOR {
    j[k] = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_set1_ps(1.27323954473516f), x[k]));
    j[k] = _mm256_add_epi32(j[k], _mm256_and_si256(j[k], _mm256_set1_epi32(1)));
    const __m256 y = _mm256_cvtepi32_ps(j[k]);
    r[k] = _mm256_sub_ps(_mm256_sub_ps(_mm256_sub_ps(x[k], _mm256_mul_ps(y, _mm256_set1_ps(0.78515625f))),
                                       _mm256_mul_ps(y, _mm256_set1_ps(2.4187564849853515625e-4f))),
                         _mm256_mul_ps(y, _mm256_set1_ps(3.77489497744594108e-8f)));
    z[k] = _mm256_mul_ps(r[k], r[k]);
  }
  DDPM_EACH_VECTOR {
    s[k] = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(-1.9515295891e-4f), z[k]), _mm256_set1_ps(8.3321608736e-3f));
    c[k] = _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(2.443315711809948e-5f), z[k]),
                         _mm256_set1_ps(1.388731625493765e-3f));
  }
  DDPM_EACH_VECTOR {
    s[k] = _mm256_sub_ps(_mm256_mul_ps(s[k], z[k]), _mm256_set1_ps(1.6666654611e-1f));
    c[k] = _mm256_add_ps(_mm256_mul_ps(c[k], z[k]), _mm256_set1_ps(4.166664568298827e-2f));
  }
  DDPM_EACH_VECTOR {
    s[k] = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(s[k], z[k]), r[k]), r[k]);
    c[k] = _mm256_mul_ps(_mm256_mul_ps(c[k], z[k]), z[k]);
    c[k] = _mm256_add_ps(_mm256_sub_ps(c[k], _mm256_mul_ps(_mm256_set1_ps(0.5f), z[k])), _mm256_set1_ps(1.0f));
  }
  // j is even, so j & 7 is 0, 2, 4 or 6: sin where bit 1 of j is set, negated
  // where bit 2 of j + 2 is set. Flipping the sign bit is what the scalar
  // path's multiplication by -1 does.
  DDPM_EACH_VECTOR {
    const __m256 use_sin = _mm256_castsi256_ps(_mm256_slli_epi32(j[k], 30));  // bit 1 to the sign bit
    const __m256 negate = _mm256_castsi256_ps(
        _mm256_and_si256(_mm256_slli_epi32(_mm256_add_epi32(j[k], _mm256_set1_epi32(2)), 29),  // bit 2 to the sign bit
                         _mm256_set1_epi32(INT32_MIN)));
    out[k] = _mm256_xor_ps(_mm256_blendv_ps(c[k], s[k], use_sin), negate);
  }
}

// The normals of 8 * kVectors pairs of Philox words.
DDPM_AVX2_INLINE void box_muller8x(const uint32_t* w0, const uint32_t* w1, float* out) {
  __m256 u1[kVectors], angle[kVectors], lg[kVectors], cs[kVectors];
  DDPM_EACH_VECTOR {
    u1[k] = _mm256_max_ps(uniform8(_mm256_load_si256(reinterpret_cast<const __m256i*>(w0 + 8 * k))),
                          _mm256_set1_ps(kMinUniform));
    angle[k] = _mm256_mul_ps(_mm256_set1_ps(kTwoPi),
                             uniform8(_mm256_load_si256(reinterpret_cast<const __m256i*>(w1 + 8 * k))));
  }
  log8x(u1, lg);
  cos8x(angle, cs);
  DDPM_EACH_VECTOR {
    const __m256 radius = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), lg[k]));
    _mm256_storeu_ps(out + 8 * k, _mm256_mul_ps(radius, cs[k]));
  }
}
#undef DDPM_EACH_VECTOR

// Philox words w0, w1 of the counters ctr[0, 4 * kChains): kChains registers
// of four lanes each, independent so that their rounds overlap. Three chains
// keep the state (12 registers) and temporaries within the 16 ymm registers.
template <int kChains>
DDPM_AVX2_INLINE void philox_chains(uint64_t seed, const uint64_t* ctr, uint32_t* w0, uint32_t* w1) {
  constexpr int kLanes = 4;
  const __m256i round_a = _mm256_set1_epi64x(kPhiloxRoundA);
  const __m256i round_b = _mm256_set1_epi64x(kPhiloxRoundB);
  __m256i c0[kChains], c1[kChains], c2[kChains], c3[kChains];
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m256i key0 = _mm256_set1_epi64x(k0);
    const __m256i key1 = _mm256_set1_epi64x(k1);
    for (int v = 0; v < kChains; ++v) {
      if (r == 0) {  // c2 = c3 = 0: the B product is 0, so c0 = c1 ^ k0 and c1 = 0
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ctr + kLanes * v));
        const __m256i pa = _mm256_mul_epu32(x, round_a);
        c0[v] = _mm256_xor_si256(_mm256_srli_epi64(x, 32), key0);
        c2[v] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), key1);
        c3[v] = pa;
      } else {
        const __m256i pb = _mm256_mul_epu32(c2[v], round_b);
        const __m256i pa = _mm256_mul_epu32(c0[v], round_a);
        const __m256i hb = _mm256_srli_epi64(pb, 32);
        c0[v] = _mm256_xor_si256(r == 1 ? hb : _mm256_xor_si256(hb, c1[v]), key0);  // round 2: c1 = 0
        c2[v] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[v]), key1);
        c1[v] = pb;
        c3[v] = pa;
      }
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m256i even_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int v = 0; v < kChains; ++v) {  // low halves of the lanes, packed
    _mm_store_si128(reinterpret_cast<__m128i*>(w0 + kLanes * v),
                    _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c0[v], even_words)));
    _mm_store_si128(reinterpret_cast<__m128i*>(w1 + kLanes * v),
                    _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c1[v], even_words)));
  }
}

__attribute__((target("avx2"))) void normal_block_avx2(uint64_t seed, const uint64_t* ctr, float* z) {
  constexpr int64_t kGroup = 12;  // three chains of four lanes
  constexpr int64_t kFull = kNormalBlock / kGroup * kGroup;
  alignas(32) uint32_t w0[kNormalBlock], w1[kNormalBlock];
  for (int64_t g = 0; g < kFull; g += kGroup) philox_chains<3>(seed, ctr + g, w0 + g, w1 + g);
  for (int64_t g = kFull; g < kNormalBlock; g += 4) philox_chains<1>(seed, ctr + g, w0 + g, w1 + g);
  static_assert(kNormalBlock % (8 * kVectors) == 0);
  for (int64_t i = 0; i < kNormalBlock; i += 8 * kVectors) box_muller8x(w0 + i, w1 + i, z + i);
}
#endif  // DDPM_FAST_X86_SIMD

}  // namespace

void normal_block(uint64_t seed, const uint64_t* ctr, float* z) {
#if DDPM_FAST_X86_SIMD
  // DDPM_FAST_NO_AVX2=1 forces the portable path (tests compare the two).
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && std::getenv("DDPM_FAST_NO_AVX2") == nullptr;
  if (has_avx2) return normal_block_avx2(seed, ctr, z);
#endif
  normal_block_portable(seed, ctr, z);
}

}  // namespace cpu
}  // namespace ddpm_fast
