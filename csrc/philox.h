// Counter-based Gaussian noise shared by the CPU and CUDA kernels.
//
// The stream (shared/DESIGN.md, "Noise that does not depend on the backend"):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (c & 0xffffffff, c >> 32, 0, 0) with c = offset + logical index
//   Philox4x32 with 10 rounds; its first two words u1, u2 become uniforms as
//   Triton's uint_to_uniform_float does, and one normal by Box-Muller:
//   z = sqrt(-2 log max(u1, 1e-7)) * cos(2*pi*u2).
// For c < 2^32 this is exactly triton.language.randn(seed, c).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DDPM_HD __host__ __device__ __forceinline__
#else
#define DDPM_HD inline
#endif

namespace ddpm_fast {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;    // golden ratio
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;    // sqrt(3) - 1
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;  // Salmon et al., SC'11
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// Largest float scale with (2^31 - 1) * scale < 1 after float rounding.
constexpr float kUintToUniform = 4.6566127342e-10f;
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;  // keeps log() finite; caps |z| at 5.68

DDPM_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct PhiloxPair {
  uint32_t x, y;
};

// The first two output words of Philox4x32-10 for one 64-bit counter.
DDPM_HD PhiloxPair philox_pair(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(kPhiloxRoundB, p2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, p0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * p2;
    c3 = kPhiloxRoundA * p0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {c0, c1};
}

// A uniform in [0, 1): the word read as int32, folded onto [0, 2^31).
DDPM_HD float uint_to_uniform(uint32_t bits) {
  int32_t v = static_cast<int32_t>(bits);
  v = v < 0 ? ~v : v;
  return static_cast<float>(v) * kUintToUniform;
}

}  // namespace ddpm_fast
