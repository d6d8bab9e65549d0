// The arguments the CPU and CUDA kernels take, free of torch so that the CUDA
// kernels can also be compiled for tests/cuda_emulation. The checks that
// build them from tensors are in layout.h and the ops' headers.
#pragma once

#include <cstdint>

#include "philox.h"

namespace ddpm_fast {

struct ElementLayout {
  int64_t numel;          // elements in the tensor
  int64_t per_sample;     // elements per index of dim 0
  int64_t channels;       // C of an N x C x H x W channels_last tensor, else 1
  int64_t spatial;        // H * W of a channels_last tensor, else 1
  bool channels_last;     // memory order N, H, W, C
};

// Counter of element i: offset + (i / per_sample) * sample_stride + i % per_sample.
struct RandnCounters {
  uint64_t offset;
  uint64_t sample_stride;  // == per_sample for one plain stream
  int64_t per_sample;
};

// Row layout of a step table (schedules.STEP_COLUMNS).
enum StepColumn : int { kA = 0, kB, kSqrtRecipAc, kSqrtRecipm1Ac, kC1, kC2, kSigma, kStepColumns = 8 };

// How an element's memory position maps to its sample, its logical index and
// its position in a model-input buffer of the other memory format. Within a
// sample, memory order is (outer, inner): (C, H*W) for NCHW, (H*W, C) for NHWC.
struct StepLayout {
  int64_t numel;
  int64_t per_sample;
  int64_t inner;            // extent of the fastest memory index within a sample
  int64_t outer;            // extent of the other one (1 unless 4-d)
  bool channels_last;       // x is NHWC: logical index = transposed position
  bool model_input_other;   // model input is in the other memory format
};

// x of GroupNorm+SiLU viewed as N x C x (spatial) (check_group_norm_args in
// group_norm_silu.h builds it).
struct NormLayout {
  int64_t n, c, hw;      // x viewed as N x C x (spatial)
  int64_t groups;        // G; channels per group = c / groups
  bool channels_last;    // memory order N, spatial, C
};

namespace cuda {
// The reverse step's model-input element types, chosen at run time (one
// uniform branch per store).
enum class InputType : int { kNone, kFloat, kHalf, kBFloat16 };
}  // namespace cuda

namespace gn {
// How the CUDA GroupNorm+SiLU cuts a problem into tiles (gn::plan in
// cuda/group_norm_silu_kernels.cuh; read by every kernel).
struct Geometry {
  int64_t c, s, groups, cg;  // channels, positions, groups, channels per group
  int64_t cols;              // channels per tile (fused: whole groups)
  int64_t block_s;           // positions per tile
  int64_t col_tiles;         // tiles across the channels of one sample
  int64_t pos_tiles;         // tiles across the positions (1 when fused)
  bool channels_last;
  bool fused;
};

// Affine parameters and the add, as float32 (null when absent).
struct Params {
  const float* w;    // [C]
  const float* b;    // [C]
  const float* add;  // [N, C]
  bool act;
};
}  // namespace gn

// The noise-free part of the step for one element (row: its timestep's row).
// The clip keeps NaN as NaN, as torch.clamp does.
DDPM_HD float step_mean(const float* row, float x, float e, bool clip) {
  if (clip) {
    float x0 = row[kSqrtRecipAc] * x - row[kSqrtRecipm1Ac] * e;
    x0 = x0 < -1.0f ? -1.0f : (x0 > 1.0f ? 1.0f : x0);
    return row[kC1] * x0 + row[kC2] * x;
  }
  return row[kA] * x + row[kB] * e;
}

}  // namespace ddpm_fast
