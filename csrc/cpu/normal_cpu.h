// Blocks of Gaussian noise from the shared Philox stream, vectorized for the CPU.
#pragma once

#include <cstdint>

namespace ddpm_fast {
namespace cpu {

// Elements per call of normal_block: enough independent lanes to hide the
// latency of a Philox round, few enough to stay in registers and L1.
// A multiple of 16, the AVX2 path's group.
constexpr int64_t kNormalBlock = 64;

// z[i] = the stream's normal for counter ctr[i], i < kNormalBlock.
// An AVX2 path and a portable one, chosen at first call; both give
// bit-identical results.
void normal_block(uint64_t seed, const uint64_t* ctr, float* z);

}  // namespace cpu
}  // namespace ddpm_fast
