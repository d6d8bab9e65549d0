// Blocks of Gaussian noise from the shared Philox stream, vectorized for the CPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Counters of the channels_last positions [q0, q0 + count) of one sample
// (pixel q / C, channel q % C), whose channel c has the counters
// base + c * spatial + pixel, to ctr[0, count).
inline void nhwc_counters(uint64_t base, int64_t channels, int64_t spatial, int64_t q0, int64_t count,
                          uint64_t* ctr) {
  int64_t c = q0 % channels, hw = q0 / channels;
  for (int64_t i = 0; i < count; ++i) {
    ctr[i] = base + static_cast<uint64_t>(c * spatial + hw);
    if (++c == channels) {
      c = 0;
      ++hw;
    }
  }
}

// The noise of channels_last samples, in memory order. Position q of a sample
// (pixel q / C, channel q % C) has the counter base + (q % C) * HW + q / C,
// so a channel's counters are consecutive along pixels: the noise is drawn a
// tile of kNormalBlock pixels x C channels at a time, one normal_run per
// channel, scattered into memory order, and kept for the next calls (a task's
// blocks come in order). Gathering each block's counters one by one instead
// cost 1.5x the NCHW time (q_sample, 128x3x32x32).
class NhwcNoise {
 public:
  NhwcNoise(uint64_t seed, int64_t channels, int64_t spatial)
      : seed_(seed), channels_(channels), spatial_(spatial) {}

  // z[i] = the noise of position q0 + i of the sample whose counters start
  // at `base`, i < count (positions within the sample). The tile is
  // allocated at the first call.
  void fill(uint64_t base, int64_t q0, int64_t count, float* z) {
    const int64_t tile_size = kNormalBlock * channels_;
    for (int64_t i = 0; i < count;) {
      const int64_t tile = (q0 + i) / tile_size;
      if (!drawn_ || base != base_ || tile != tile_index_) draw(base, tile);
      const int64_t start = q0 + i - tile * tile_size;
      const int64_t n = std::min(count - i, tile_size - start);
      std::copy_n(tile_.begin() + start, n, z + i);
      i += n;
    }
  }

 private:
  void draw(uint64_t base, int64_t tile) {
    tile_.resize(kNormalBlock * channels_);
    const int64_t hw0 = tile * kNormalBlock;
    const int64_t pixels = std::min(kNormalBlock, spatial_ - hw0);
    float z[kNormalBlock];
    for (int64_t c = 0; c < channels_; ++c) {
      normal_run(seed_, base + static_cast<uint64_t>(c * spatial_ + hw0), z);
      for (int64_t j = 0; j < pixels; ++j) tile_[j * channels_ + c] = z[j];
    }
    drawn_ = true;
    base_ = base;
    tile_index_ = tile;
  }

  uint64_t seed_;
  int64_t channels_, spatial_;
  std::vector<float> tile_;
  bool drawn_ = false;
  uint64_t base_ = 0;
  int64_t tile_index_ = 0;
};

}  // namespace cpu
}  // namespace ddpm_fast
