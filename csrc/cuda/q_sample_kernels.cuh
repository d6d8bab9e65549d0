// q_sample's device code (host side: q_sample_launch.cu, q_sample_cuda.cpp).
// Torch-free, so that tests/cuda_emulation can run it on the CPU.
#pragma once

#include <cstdint>

#include "../kernel_args.h"
#include "block_ops.cuh"
#include "philox_normal.cuh"

namespace ddpm_fast {
namespace cuda {

struct Coefficients {
  float a, b;  // sqrt(abar_t), sqrt(1 - abar_t)
};

// An out-of-range timestep cannot be reported without a host sync, so it
// turns the sample into NaN rather than reading outside the tables.
__device__ __forceinline__ Coefficients load_coefficients(const int64_t* t, int64_t sample,
                                                          const float* sqrt_ab,
                                                          const float* sqrt_1m_ab,
                                                          int64_t num_steps) {
  const int64_t step = t[sample];
  if (step < 0 || step >= num_steps) {
    const float nan = __int_as_float(0x7fc00000);
    return {nan, nan};
  }
  return {__ldg(sqrt_ab + step), __ldg(sqrt_1m_ab + step)};
}

template <typename T, int kVec, bool kDraw>
__global__ void q_sample_kernel(const T* __restrict__ x0,        // [numel] input, x's layout
                                const T* __restrict__ noise,     // [numel] given noise (!kDraw)
                                const int64_t* __restrict__ t,   // [1] or [N] timesteps
                                bool per_sample_t,               // t has one entry per sample
                                const float* __restrict__ sqrt_ab,     // [T] table
                                const float* __restrict__ sqrt_1m_ab,  // [T] table
                                int64_t num_steps,               // T
                                T* __restrict__ xt,              // [numel] output
                                T* __restrict__ eps_out,         // [numel] drawn noise (kDraw)
                                ElementLayout l, uint64_t seed, uint64_t offset) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
       p < l.numel; p += stride) {
    const bool full = p + kVec <= l.numel;
    alignas(16) T xv[kVec], nv[kVec];  // read and written as 16-byte packets
    if (full) {
      *reinterpret_cast<cuda::Packet<T, kVec>*>(xv) =
          *reinterpret_cast<const cuda::Packet<T, kVec>*>(x0 + p);
      if (!kDraw) {
        *reinterpret_cast<cuda::Packet<T, kVec>*>(nv) =
            *reinterpret_cast<const cuda::Packet<T, kVec>*>(noise + p);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        if (p + i < l.numel) {
          xv[i] = x0[p + i];
          if (!kDraw) nv[i] = noise[p + i];
        }
      }
    }

    // Sample index and (for channels_last) logical position of element p,
    // then advanced element by element without further divisions.
    int64_t sample = per_sample_t ? p / l.per_sample : 0;
    int64_t next_sample_at = per_sample_t ? (sample + 1) * l.per_sample : l.numel;
    Coefficients k = load_coefficients(t, sample, sqrt_ab, sqrt_1m_ab, num_steps);
    int64_t c = 0, hw = 0, n = 0;
    if (kDraw && l.channels_last) {
      c = p % l.channels;
      const int64_t q = p / l.channels;
      hw = q % l.spatial;
      n = q / l.spatial;
    }

    alignas(16) T yv[kVec], ev[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int64_t pi = p + i;
      if (pi >= l.numel) break;
      if (pi >= next_sample_at) {
        ++sample;
        next_sample_at += l.per_sample;
        k = load_coefficients(t, sample, sqrt_ab, sqrt_1m_ab, num_steps);
      }
      float z;
      if (kDraw) {
        const int64_t logical = l.channels_last ? (n * l.channels + c) * l.spatial + hw : pi;
        // Rounded to T first (as the reference does): x_t is made from the eps returned.
        z = static_cast<float>(static_cast<T>(cuda::philox_normal(seed, offset + static_cast<uint64_t>(logical))));
        if (l.channels_last && ++c == l.channels) {
          c = 0;
          if (++hw == l.spatial) {
            hw = 0;
            ++n;
          }
        }
      } else {
        z = static_cast<float>(nv[i]);
      }
      yv[i] = static_cast<T>(k.a * static_cast<float>(xv[i]) + k.b * z);
      ev[i] = static_cast<T>(z);
    }

    if (full) {
      *reinterpret_cast<cuda::Packet<T, kVec>*>(xt + p) =
          *reinterpret_cast<const cuda::Packet<T, kVec>*>(yv);
      if (kDraw) {
        *reinterpret_cast<cuda::Packet<T, kVec>*>(eps_out + p) =
            *reinterpret_cast<const cuda::Packet<T, kVec>*>(ev);
      }
    } else {
      for (int i = 0; i < kVec && p + i < l.numel; ++i) {
        xt[p + i] = yv[i];
        if (kDraw) eps_out[p + i] = ev[i];
      }
    }
  }
}

}  // namespace cuda
}  // namespace ddpm_fast
