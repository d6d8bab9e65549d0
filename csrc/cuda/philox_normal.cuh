// The shared noise stream on the device (csrc/philox.h). Torch-free, like the
// kernels that use it, for tests/cuda_emulation.
#pragma once

#include <cstdint>

#include "../philox.h"

namespace ddpm_fast {
namespace cuda {

// The stream's normal for one counter (csrc/philox.h), with CUDA's libm.
__device__ __forceinline__ float philox_normal(uint64_t seed, uint64_t counter) {
  const PhiloxPair r = philox_pair(seed, counter);
  const float u1 = fmaxf(kMinUniform, uint_to_uniform(r.x));
  const float u2 = uint_to_uniform(r.y);
  return sqrtf(-2.0f * logf(u1)) * cosf(kTwoPi * u2);
}

}  // namespace cuda
}  // namespace ddpm_fast
