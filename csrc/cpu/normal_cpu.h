// Blocks of Gaussian noise from the shared Philox stream, vectorized for the CPU.
#pragma once

#include <cstdint>

namespace ddpm_fast {
namespace cpu {

// Elements per call of normal_block: enough independent lanes to hide the
// latency of a Philox round, few enough to stay in registers and L1.
// A multiple of what the vector paths (normal_block_simd.inc) step by: 4 or 8
// Philox counters per register, 32 or 64 normals per Box-Muller step.
constexpr int64_t kNormalBlock = 64;

// z[i] = the stream's normal for counter ctr[i], i < kNormalBlock.
// AVX-512, AVX2 and portable paths, chosen at first call (simd.h). The two
// vector paths give the same bits; the portable one, which has no fused
// multiply-add, differs from them in the last bits of some normals.
void normal_block(uint64_t seed, const uint64_t* ctr, float* z);

// z[i] = the stream's normal for counter first + i (mod 2^64), i < kNormalBlock:
// normal_block of consecutive counters, which the vector paths make in
// registers (and draw a little faster, csrc/cpu/normal_block_simd.inc).
void normal_run(uint64_t seed, uint64_t first, float* z);

}  // namespace cpu
}  // namespace ddpm_fast
