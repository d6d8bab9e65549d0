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
