// Blocks of Gaussian noise from the shared Philox stream, vectorized for the CPU.
#pragma once

#include <cstdint>

namespace ddpm_fast {
namespace cpu {

// Elements per call of normal_block: enough lanes for the compiler to fill
// AVX2 registers, small enough to stay in L1.
constexpr int64_t kNormalBlock = 64;

// z[i] = the stream's normal for counter ctr[i], i < kNormalBlock.
// Built for AVX2 and for plain x86-64, chosen at load time; both give
// bit-identical results.
void normal_block(uint64_t seed, const uint64_t* ctr, float* z);

}  // namespace cpu
}  // namespace ddpm_fast
