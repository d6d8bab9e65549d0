// 16-bit rows to float and back (float16_cpu.h): whole vectors in AVX-512 or
// AVX2 + F16C (float16_simd.inc), the rest, and every value on other CPUs,
// through c10's conversions.
#include "float16_cpu.h"

#include "simd.h"
#include "simd_vec.h"

namespace ddpm_fast {
namespace cpu {
namespace {

// The portable loops convert nothing as vectors (the callers below do the rest).
inline int64_t half_to_float_portable(const uint16_t*, int64_t, float*) { return 0; }
inline int64_t bf16_to_float_portable(const uint16_t*, int64_t, float*) { return 0; }
inline int64_t float_to_half_portable(const float*, int64_t, uint16_t*) { return 0; }
inline int64_t float_to_bf16_portable(const float*, int64_t, uint16_t*) { return 0; }

#if DDPM_FAST_X86_SIMD
DDPM_TARGET_AVX2_BEGIN
namespace avx2 {
using V = Avx2;
#include "float16_simd.inc"
}  // namespace avx2
DDPM_TARGET_END
DDPM_TARGET_AVX512_BEGIN
namespace avx512 {
using V = Avx512;
#include "float16_simd.inc"
}  // namespace avx512
DDPM_TARGET_AVX512_END
#endif  // DDPM_FAST_X86_SIMD

template <typename From, typename To>
void finish(const From* in, int64_t done, int64_t count, To* out) {
  for (int64_t i = done; i < count; ++i) out[i] = static_cast<To>(in[i]);
}

}  // namespace

void half_to_float(const uint16_t* in, int64_t count, float* out) {
  finish(reinterpret_cast<const c10::Half*>(in), DDPM_SIMD_PICK(half_to_float)(in, count, out), count, out);
}
void bf16_to_float(const uint16_t* in, int64_t count, float* out) {
  finish(reinterpret_cast<const c10::BFloat16*>(in), DDPM_SIMD_PICK(bf16_to_float)(in, count, out), count, out);
}
void float_to_half(const float* in, int64_t count, uint16_t* out) {
  finish(in, DDPM_SIMD_PICK(float_to_half)(in, count, out), count, reinterpret_cast<c10::Half*>(out));
}
void float_to_bf16(const float* in, int64_t count, uint16_t* out) {
  finish(in, DDPM_SIMD_PICK(float_to_bf16)(in, count, out), count, reinterpret_cast<c10::BFloat16*>(out));
}

}  // namespace cpu
}  // namespace ddpm_fast
