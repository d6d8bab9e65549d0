// The reverse step's device code (host side: ddpm_step_launch.cu,
// ddpm_step_cuda.cpp). Torch-free, so that tests/cuda_emulation can run it on
// the CPU.
#pragma once

#include <cstdint>

#include "../kernel_args.h"
#include "block_ops.cuh"
#include "philox_normal.cuh"

namespace ddpm_fast {
namespace cuda {

constexpr int kStepVec = 4;  // elements per thread

// Half and BFloat16: the 16-bit types (c10's on the GPU, the emulation's on the CPU).
template <typename Half, typename BFloat16>
__device__ __forceinline__ void store_model_input(void* mi, InputType type, int64_t index, float y) {
  switch (type) {
    case InputType::kFloat: static_cast<float*>(mi)[index] = y; break;
    case InputType::kHalf: static_cast<Half*>(mi)[index] = static_cast<Half>(y); break;
    case InputType::kBFloat16: static_cast<BFloat16*>(mi)[index] = static_cast<BFloat16>(y); break;
    case InputType::kNone: break;
  }
}

template <typename X, typename E, bool kVectorized, typename Half, typename BFloat16>
__global__ void ddpm_step_kernel(const X* x,                     // [numel] x_t (out may alias it)
                                 const E* eps,                   // [numel] model output, x_t's layout (out or
                                                                 // model_input may alias it: no __restrict__)
                                 const int64_t* __restrict__ t,  // [1] or [N] timesteps
                                 bool per_sample_t,              // t has one entry per sample
                                 const float* __restrict__ table,  // [T, 8] step table
                                 int64_t num_steps,              // T; out-of-range t gives NaN
                                 const X* noise,                 // [numel] given z, or null to draw it (out may
                                                                 // alias it)
                                 uint64_t seed, uint64_t offset, uint64_t sample_stride, uint64_t step_stride,
                                 bool clip, StepLayout s,
                                 X* out,                         // [numel] x_{t-1}; may alias x
                                 void* model_input, InputType model_input_type) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kStepVec;
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kStepVec; p < s.numel;
       p += stride) {
    alignas(16) X xv[kStepVec], nv[kStepVec];  // read and written as packets
    alignas(16) E ev[kStepVec];
    if (kVectorized && p + kStepVec <= s.numel) {
      *reinterpret_cast<cuda::Packet<X, kStepVec>*>(xv) = *reinterpret_cast<const cuda::Packet<X, kStepVec>*>(x + p);
      *reinterpret_cast<cuda::Packet<E, kStepVec>*>(ev) = *reinterpret_cast<const cuda::Packet<E, kStepVec>*>(eps + p);
      if (noise != nullptr) {
        *reinterpret_cast<cuda::Packet<X, kStepVec>*>(nv) = *reinterpret_cast<const cuda::Packet<X, kStepVec>*>(noise + p);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kStepVec; ++i) {
        if (p + i < s.numel) {
          xv[i] = x[p + i];
          ev[i] = eps[p + i];
          if (noise != nullptr) nv[i] = noise[p + i];
        }
      }
    }
    // Position of element p, then advanced element by element.
    int64_t n = p / s.per_sample;
    const int64_t q0 = p - n * s.per_sample;
    int64_t outer = q0 / s.inner, inner = q0 % s.inner;
    alignas(16) X yv[kStepVec];
#pragma unroll
    for (int i = 0; i < kStepVec; ++i) {
      if (p + i >= s.numel) break;
      const int64_t step = t[per_sample_t ? n : 0];
      const int64_t q = outer * s.inner + inner;        // position within the sample, memory order
      const int64_t q_other = inner * s.outer + outer;  // the same element in the other format
      float y;
      if (step < 0 || step >= num_steps) {
        y = __int_as_float(0x7fc00000);
      } else {
        const float* row = table + step * kStepColumns;
        y = step_mean(row, static_cast<float>(xv[i]), static_cast<float>(ev[i]), clip);
        const float sigma = __ldg(row + kSigma);
        if (sigma != 0.0f) {
          float z;
          if (noise != nullptr) {
            z = static_cast<float>(nv[i]);
          } else {
            const int64_t j = s.channels_last ? q_other : q;
            z = cuda::philox_normal(seed, offset + static_cast<uint64_t>(n) * sample_stride +
                                              static_cast<uint64_t>(step) * step_stride + static_cast<uint64_t>(j));
          }
          y += sigma * z;
        }
      }
      store_model_input<Half, BFloat16>(model_input, model_input_type, n * s.per_sample + (s.model_input_other ? q_other : q), y);
      yv[i] = static_cast<X>(y);
      if (++inner == s.inner) {
        inner = 0;
        if (++outer == s.outer) {
          outer = 0;
          ++n;
        }
      }
    }
    if (kVectorized && p + kStepVec <= s.numel) {
      *reinterpret_cast<cuda::Packet<X, kStepVec>*>(out + p) = *reinterpret_cast<const cuda::Packet<X, kStepVec>*>(yv);
    } else {
      for (int i = 0; i < kStepVec && p + i < s.numel; ++i) out[p + i] = yv[i];
    }
  }
}

}  // namespace cuda
}  // namespace ddpm_fast
