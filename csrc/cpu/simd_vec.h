// Two vector types with one interface, so that each hand-written CPU loop is
// written once and compiled for both (see simd.h):
//
//   Avx2:   8 floats in a __m256, masks as all-ones lanes of a __m256;
//   Avx512: 16 floats in a __m512, masks in a __mmask16.
//
// A loop file includes its width-generic part twice, between
// DDPM_TARGET_AVX2_BEGIN / DDPM_TARGET_AVX512_BEGIN and DDPM_TARGET_AVX512_END, in
// namespaces avx2 and avx512 with `using V = Avx2` / `Avx512` (the member
// functions below are always inlined, which GCC allows only into code of the
// same target). Only x86 builds include this file.
//
// Float arithmetic is plain IEEE single precision: fmadd/fmsub are fused, the
// rest round as the scalar operations do, so a loop that avoids the fused ones
// gives the same bits at either width and in the portable loops.
#pragma once

#include <cstdint>

#include "simd.h"

#if DDPM_FAST_X86_SIMD

#define DDPM_VEC_FN static inline __attribute__((always_inline))

namespace ddpm_fast {
namespace cpu {

DDPM_TARGET_AVX2_BEGIN
struct Avx2 {
  using F = __m256;   // floats
  using I = __m256i;  // 32-bit ints, or 64-bit lanes (the Philox words)
  using M = __m256;   // lane masks: all ones where true
  static constexpr int kFloats = 8;
  static constexpr int kWords64 = 4;
  static constexpr int kRegisters = 16;
  static constexpr bool kScalef = false;  // no vscalefps (see Avx512)

  DDPM_VEC_FN F set1(float x) { return _mm256_set1_ps(x); }
  DDPM_VEC_FN F load(const float* p) { return _mm256_loadu_ps(p); }
  DDPM_VEC_FN void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  DDPM_VEC_FN F add(F a, F b) { return _mm256_add_ps(a, b); }
  DDPM_VEC_FN F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  DDPM_VEC_FN F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  DDPM_VEC_FN F div(F a, F b) { return _mm256_div_ps(a, b); }
  DDPM_VEC_FN F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }  // a * b + c, one rounding
  DDPM_VEC_FN F fmsub(F a, F b, F c) { return _mm256_fmsub_ps(a, b, c); }  // a * b - c, one rounding
  DDPM_VEC_FN F fnmsub(F a, F b, F c) { return _mm256_fnmsub_ps(a, b, c); }  // -(a * b) - c, one rounding
  DDPM_VEC_FN F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
  // max/min return b where either is NaN.
  DDPM_VEC_FN F max(F a, F b) { return _mm256_max_ps(a, b); }
  DDPM_VEC_FN F min(F a, F b) { return _mm256_min_ps(a, b); }
  DDPM_VEC_FN F sqrt(F a) { return _mm256_sqrt_ps(a); }
  DDPM_VEC_FN F to_float(I v) { return _mm256_cvtepi32_ps(v); }
  DDPM_VEC_FN I trunc_int(F v) { return _mm256_cvttps_epi32(v); }
  DDPM_VEC_FN I bits(F v) { return _mm256_castps_si256(v); }
  DDPM_VEC_FN F from_bits(I v) { return _mm256_castsi256_ps(v); }
  DDPM_VEC_FN M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  DDPM_VEC_FN F select(M m, F if_true, F if_false) { return _mm256_blendv_ps(if_false, if_true, m); }
  // Lane j gets table's lane index[j] (0 <= index[j] < kFloats).
  DDPM_VEC_FN F permute(F table, I index) { return _mm256_permutevar8x32_ps(table, index); }
  // Loops end with a partial vector through these (no scalar code: see the
  // note at the end of this file). The first n lanes, 0 <= n <= kFloats:
  DDPM_VEC_FN M first(int64_t n) {
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  // Loads m's lanes (the others are 0 and not read) / stores m's lanes.
  DDPM_VEC_FN F load_first(M m, const float* p) { return _mm256_maskload_ps(p, _mm256_castps_si256(m)); }
  DDPM_VEC_FN void store_first(M m, float* p, F v) { _mm256_maskstore_ps(p, _mm256_castps_si256(m), v); }
  // The lanes' sum, in double.
  DDPM_VEC_FN double sum_double(F v) {
    const __m256d wide = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                                       _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(wide), _mm256_extractf128_pd(wide, 1));
    return _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
  }
  // Lane k: the sum of v[k]'s lanes, for kFloats vectors v (rows of a
  // block's backward, summed kFloats at a time: one sum_double per row cost
  // more than the row's SiLU gradient at rows of one vector). In float, each
  // vector's lanes added in one fixed tree, whatever the other vectors hold:
  // halves folded (permute2f128), then pairs within 128 bits twice (shuffle).
  DDPM_VEC_FN F transpose_sums(const F* v) {
    F a[4], b[2];
    for (int k = 0; k < 4; ++k)  // lanes 0-3: row 2k's 4 partial sums, 4-7: row 2k + 1's
      a[k] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x20),
                           _mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x31));
    for (int k = 0; k < 2; ++k)  // per 128 bits, 2 partials of rows 4k, 4k + 2 | 4k + 1, 4k + 3
      b[k] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // rows 0, 2, 4, 6 | 1, 3, 5, 7, then in order
    const F s = _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }

  // 16-bit values, as their bits: kFloats IEEE halves (F16C, round to nearest
  // even); kFloats uint16s zero-extended to 32-bit lanes, and lanes holding
  // values below 2^16 stored as uint16s (bfloat16 in the loop files).
  DDPM_VEC_FN F load_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  DDPM_VEC_FN void store_half(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  DDPM_VEC_FN I load_u16(const uint16_t* p) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  DDPM_VEC_FN void store_u16(uint16_t* p, I v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
  DDPM_VEC_FN M is_nan(F v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }

  DDPM_VEC_FN I set1_i32(int32_t x) { return _mm256_set1_epi32(x); }
  DDPM_VEC_FN I add_i32(I a, I b) { return _mm256_add_epi32(a, b); }
  DDPM_VEC_FN I sub_i32(I a, I b) { return _mm256_sub_epi32(a, b); }
  DDPM_VEC_FN I and_bits(I a, I b) { return _mm256_and_si256(a, b); }
  DDPM_VEC_FN I or_bits(I a, I b) { return _mm256_or_si256(a, b); }
  DDPM_VEC_FN I xor_bits(I a, I b) { return _mm256_xor_si256(a, b); }
  template <int n> DDPM_VEC_FN I shl_i32(I v) { return _mm256_slli_epi32(v, n); }
  template <int n> DDPM_VEC_FN I shr_i32(I v) { return _mm256_srli_epi32(v, n); }  // logical
  template <int n> DDPM_VEC_FN I sar_i32(I v) { return _mm256_srai_epi32(v, n); }  // arithmetic
  // Lanes of v that have `bit` (a single bit) set.
  DDPM_VEC_FN M has_bit(I v, int32_t bit) {
    const I b = _mm256_set1_epi32(bit);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(v, b), b));
  }
  // v - 1 where m.
  DDPM_VEC_FN I dec_where(I v, M m) { return _mm256_add_epi32(v, _mm256_castps_si256(m)); }
  DDPM_VEC_FN I load_words(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

  // 64-bit lanes (Philox): kWords64 of them.
  DDPM_VEC_FN I set1_u64(uint64_t x) { return _mm256_set1_epi64x(static_cast<int64_t>(x)); }
  DDPM_VEC_FN I load_u64(const uint64_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  DDPM_VEC_FN I add_u64(I a, I b) { return _mm256_add_epi64(a, b); }
  DDPM_VEC_FN I iota_u64() { return _mm256_setr_epi64x(0, 1, 2, 3); }  // lane i holds i
  // The 64-bit products of the lanes' low 32-bit halves.
  DDPM_VEC_FN I mul_low_halves(I a, I b) { return _mm256_mul_epu32(a, b); }
  // The lanes' high 32-bit halves moved to their low halves (the high halves
  // then hold whatever the vector type leaves there: callers read only low
  // halves). A shift here; Avx512's shuffle measured 3% slower in AVX2.
  DDPM_VEC_FN I high_halves(I v) { return _mm256_srli_epi64(v, 32); }
  DDPM_VEC_FN I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  // The lanes' low 32-bit halves, to p[0, kWords64).
  DDPM_VEC_FN void store_low_halves(uint32_t* p, I v) {
    const __m256i even_words = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, even_words)));
  }
  // Those of a, then those of b, to p[0, 2 * kWords64).
  DDPM_VEC_FN void store_low_halves2(uint32_t* p, I a, I b) {
    store_low_halves(p, a);
    store_low_halves(p + kWords64, b);
  }
};
DDPM_TARGET_END

DDPM_TARGET_AVX512_BEGIN
struct Avx512 {
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int kFloats = 16;
  static constexpr int kWords64 = 8;
  static constexpr int kRegisters = 32;
  // vscalefps: exp(x) = 2^k p(r) without building 2^k from bits, so without
  // the clamp that keeps k in the exponent's range that way.
  static constexpr bool kScalef = true;

  DDPM_VEC_FN F set1(float x) { return _mm512_set1_ps(x); }
  DDPM_VEC_FN F load(const float* p) { return _mm512_loadu_ps(p); }
  DDPM_VEC_FN void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  DDPM_VEC_FN F add(F a, F b) { return _mm512_add_ps(a, b); }
  DDPM_VEC_FN F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  DDPM_VEC_FN F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  DDPM_VEC_FN F div(F a, F b) { return _mm512_div_ps(a, b); }
  DDPM_VEC_FN F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  DDPM_VEC_FN F fmsub(F a, F b, F c) { return _mm512_fmsub_ps(a, b, c); }
  DDPM_VEC_FN F fnmsub(F a, F b, F c) { return _mm512_fnmsub_ps(a, b, c); }  // -(a * b) - c, one rounding
  DDPM_VEC_FN F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  // sign(a) min(|a|, limit) for limit > 0, in one vrangeps; NaN stays NaN.
  DDPM_VEC_FN F clamp_abs(F a, float limit) { return _mm512_range_ps(a, _mm512_set1_ps(limit), 0x2); }
  // a * 2^floor(k), overflowing to Inf and underflowing gradually as IEEE does.
  DDPM_VEC_FN F scalef(F a, F k) { return _mm512_scalef_ps(a, k); }
  DDPM_VEC_FN F max(F a, F b) { return _mm512_max_ps(a, b); }
  DDPM_VEC_FN F min(F a, F b) { return _mm512_min_ps(a, b); }
  DDPM_VEC_FN F sqrt(F a) { return _mm512_sqrt_ps(a); }
  DDPM_VEC_FN F to_float(I v) { return _mm512_cvtepi32_ps(v); }
  DDPM_VEC_FN I trunc_int(F v) { return _mm512_cvttps_epi32(v); }
  DDPM_VEC_FN I bits(F v) { return _mm512_castps_si512(v); }
  DDPM_VEC_FN F from_bits(I v) { return _mm512_castsi512_ps(v); }
  DDPM_VEC_FN M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  DDPM_VEC_FN F select(M m, F if_true, F if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }
  DDPM_VEC_FN F permute(F table, I index) { return _mm512_permutexvar_ps(index, table); }
  DDPM_VEC_FN M first(int64_t n) { return static_cast<M>((1u << n) - 1u); }
  DDPM_VEC_FN F load_first(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  DDPM_VEC_FN void store_first(M m, float* p, F v) { _mm512_mask_storeu_ps(p, m, v); }
  DDPM_VEC_FN double sum_double(F v) {
    return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)),
                                              _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1))));
  }
  // Lane k: the sum of v[k]'s lanes (see Avx2), folding each vector's lanes
  // in halves four times, two vectors' halves into one vector each time
  // (vpermt2ps).
  DDPM_VEC_FN F fold(F x, F y, __m512i lo, __m512i hi) {
    return _mm512_add_ps(_mm512_permutex2var_ps(x, lo, y), _mm512_permutex2var_ps(x, hi, y));
  }
  DDPM_VEC_FN F transpose_sums(const F* v) {
    const __m512i lo8 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i hi8 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const __m512i lo4 = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
    const __m512i hi4 = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const __m512i lo2 = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
    const __m512i hi2 = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    const __m512i lo1 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i hi1 = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    F a[8], b[4], c[2];
    for (int k = 0; k < 8; ++k) a[k] = fold(v[2 * k], v[2 * k + 1], lo8, hi8);  // 8 partials of 2 rows
    for (int k = 0; k < 4; ++k) b[k] = fold(a[2 * k], a[2 * k + 1], lo4, hi4);  // 4 of 4
    for (int k = 0; k < 2; ++k) c[k] = fold(b[2 * k], b[2 * k + 1], lo2, hi2);  // 2 of 8
    return fold(c[0], c[1], lo1, hi1);
  }

  // 16-bit values, as their bits (see Avx2).
  DDPM_VEC_FN F load_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  DDPM_VEC_FN void store_half(uint16_t* p, F v) {
    const __m256i halves = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), halves);
  }
  DDPM_VEC_FN I load_u16(const uint16_t* p) {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  DDPM_VEC_FN void store_u16(uint16_t* p, I v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(v));
  }
  DDPM_VEC_FN M is_nan(F v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }

  DDPM_VEC_FN I set1_i32(int32_t x) { return _mm512_set1_epi32(x); }
  DDPM_VEC_FN I add_i32(I a, I b) { return _mm512_add_epi32(a, b); }
  DDPM_VEC_FN I sub_i32(I a, I b) { return _mm512_sub_epi32(a, b); }
  DDPM_VEC_FN I and_bits(I a, I b) { return _mm512_and_si512(a, b); }
  DDPM_VEC_FN I or_bits(I a, I b) { return _mm512_or_si512(a, b); }
  DDPM_VEC_FN I xor_bits(I a, I b) { return _mm512_xor_si512(a, b); }
  template <int n> DDPM_VEC_FN I shl_i32(I v) { return _mm512_slli_epi32(v, n); }
  template <int n> DDPM_VEC_FN I shr_i32(I v) { return _mm512_srli_epi32(v, n); }
  template <int n> DDPM_VEC_FN I sar_i32(I v) { return _mm512_srai_epi32(v, n); }
  DDPM_VEC_FN M has_bit(I v, int32_t bit) { return _mm512_test_epi32_mask(v, _mm512_set1_epi32(bit)); }
  DDPM_VEC_FN I dec_where(I v, M m) { return _mm512_mask_sub_epi32(v, m, v, _mm512_set1_epi32(1)); }
  DDPM_VEC_FN I load_words(const uint32_t* p) { return _mm512_loadu_si512(p); }

  DDPM_VEC_FN I set1_u64(uint64_t x) { return _mm512_set1_epi64(static_cast<int64_t>(x)); }
  DDPM_VEC_FN I load_u64(const uint64_t* p) { return _mm512_loadu_si512(p); }
  DDPM_VEC_FN I add_u64(I a, I b) { return _mm512_add_epi64(a, b); }
  DDPM_VEC_FN I iota_u64() { return _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0); }
  DDPM_VEC_FN I mul_low_halves(I a, I b) { return _mm512_mul_epu32(a, b); }
  // A shuffle (the high halves get the old low ones), on port 5 where the
  // multiplies and shifts take port 0.
  DDPM_VEC_FN I high_halves(I v) { return _mm512_shuffle_epi32(v, _MM_PERM_CDAB); }
  DDPM_VEC_FN I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi64(a, b, c, 0x96); }  // one vpternlogq
  DDPM_VEC_FN void store_low_halves(uint32_t* p, I v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi64_epi32(v));
  }
  DDPM_VEC_FN void store_low_halves2(uint32_t* p, I a, I b) {  // one vpermt2d, one store
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    _mm512_storeu_si512(p, _mm512_permutex2var_epi32(a, even, b));
  }
};
DDPM_TARGET_END

}  // namespace cpu
}  // namespace ddpm_fast

#undef DDPM_VEC_FN

// Why the loops end in partial vectors and not in the portable scalar code:
// that code is compiled for SSE, and SSE instructions that run while the upper
// halves of ymm/zmm0-15 hold data are slow. GCC puts a vzeroupper before calls
// and returns, but not before a tail call compiled to a jump, which is what
// the first version's tails became. On the project's AVX-512 VM (Xeon,
// 2026-12-01) a 20-step SSE loop after a function that left zmm1 dirty took
// 245 ns instead of 54, and an AVX-512 SiLU row of 17 elements 300 ns where
// one of 16 took 17.

#endif  // DDPM_FAST_X86_SIMD
