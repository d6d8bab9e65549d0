// The reverse step on the GPU: one read of x_t and eps (and of given noise),
// one write of x_{t-1} (and of the next model input); kVec elements per thread.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ddpm_step.h"
#include "cuda_utils.cuh"

namespace ddpm_fast {
namespace {

constexpr int kVec = 4;

// Model-input element types, chosen at run time (one uniform branch per store).
enum class InputType : int { kNone, kFloat, kHalf, kBFloat16 };

__device__ __forceinline__ void store_model_input(void* mi, InputType type, int64_t index, float y) {
  switch (type) {
    case InputType::kFloat: static_cast<float*>(mi)[index] = y; break;
    case InputType::kHalf: static_cast<at::Half*>(mi)[index] = static_cast<at::Half>(y); break;
    case InputType::kBFloat16: static_cast<at::BFloat16*>(mi)[index] = static_cast<at::BFloat16>(y); break;
    case InputType::kNone: break;
  }
}

template <typename X, typename E, bool kVectorized>
__global__ void ddpm_step_kernel(const X* x,                     // [numel] x_t (out may alias it)
                                 const E* __restrict__ eps,      // [numel] model output, x_t's layout
                                 const int64_t* __restrict__ t,  // [1] or [N] timesteps
                                 bool per_sample_t,              // t has one entry per sample
                                 const float* __restrict__ table,  // [T, 8] step table
                                 int64_t num_steps,              // T; out-of-range t gives NaN
                                 const X* __restrict__ noise,    // [numel] given z, or null to draw it
                                 uint64_t seed, uint64_t offset, uint64_t sample_stride, uint64_t step_stride,
                                 bool clip, StepLayout s,
                                 X* out,                         // [numel] x_{t-1}; may alias x
                                 void* model_input, InputType model_input_type) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kVec;
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; p < s.numel;
       p += stride) {
    X xv[kVec], nv[kVec];
    E ev[kVec];
    if (kVectorized && p + kVec <= s.numel) {
      *reinterpret_cast<cuda::Packet<X, kVec>*>(xv) = *reinterpret_cast<const cuda::Packet<X, kVec>*>(x + p);
      *reinterpret_cast<cuda::Packet<E, kVec>*>(ev) = *reinterpret_cast<const cuda::Packet<E, kVec>*>(eps + p);
      if (noise != nullptr) {
        *reinterpret_cast<cuda::Packet<X, kVec>*>(nv) = *reinterpret_cast<const cuda::Packet<X, kVec>*>(noise + p);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
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
    X yv[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
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
      store_model_input(model_input, model_input_type, n * s.per_sample + (s.model_input_other ? q_other : q), y);
      yv[i] = static_cast<X>(y);
      if (++inner == s.inner) {
        inner = 0;
        if (++outer == s.outer) {
          outer = 0;
          ++n;
        }
      }
    }
    if (kVectorized && p + kVec <= s.numel) {
      *reinterpret_cast<cuda::Packet<X, kVec>*>(out + p) = *reinterpret_cast<const cuda::Packet<X, kVec>*>(yv);
    } else {
      for (int i = 0; i < kVec && p + i < s.numel; ++i) out[p + i] = yv[i];
    }
  }
}

InputType input_type(const std::optional<at::Tensor>& mi) {
  if (!mi.has_value()) return InputType::kNone;
  switch (mi->scalar_type()) {
    case at::kFloat: return InputType::kFloat;
    case at::kHalf: return InputType::kHalf;
    default: return InputType::kBFloat16;
  }
}

}  // namespace

void ddpm_step_cuda(const at::Tensor& x, const at::Tensor& eps, const at::Tensor& t, const at::Tensor& coefficients,
                    const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, int64_t sample_stride,
                    int64_t step_stride, bool clip_denoised, at::Tensor& out,
                    const std::optional<at::Tensor>& model_input) {
  const StepLayout s =
      check_ddpm_step_args(x, eps, t, coefficients, noise, sample_stride, step_stride, out, model_input);
  if (s.numel == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  void* mi = model_input.has_value() ? model_input->data_ptr() : nullptr;
  const bool per_sample_t = t.dim() == 1 && t.numel() > 1;
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "ddpm_step_cuda", [&] {
    using X = scalar_t;
    DDPM_DISPATCH_FLOAT_TYPES(eps.scalar_type(), "ddpm_step_cuda_eps", [&] {
      using E = scalar_t;
      const X* xp = x.const_data_ptr<X>();
      const E* ep = eps.const_data_ptr<E>();
      const X* np = noise.has_value() ? noise->const_data_ptr<X>() : nullptr;
      X* op = out.mutable_data_ptr<X>();
      const bool vectorized = cuda::all_aligned<sizeof(X) * kVec>(xp, op) && cuda::all_aligned<sizeof(E) * kVec>(ep) &&
                              (np == nullptr || cuda::all_aligned<sizeof(X) * kVec>(np));
      const int64_t blocks = cuda::grid_size((s.numel + kVec - 1) / kVec);
      auto launch = [&](auto kernel) {
        kernel<<<blocks, cuda::kThreads, 0, stream>>>(
            xp, ep, t.const_data_ptr<int64_t>(), per_sample_t, coefficients.const_data_ptr<float>(),
            coefficients.size(0), np, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
            static_cast<uint64_t>(sample_stride), static_cast<uint64_t>(step_stride), clip_denoised, s, op, mi,
            input_type(model_input));
      };
      if (vectorized) {
        launch(ddpm_step_kernel<X, E, true>);
      } else {
        launch(ddpm_step_kernel<X, E, false>);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) { m.impl("ddpm_step_", &ddpm_step_cuda); }

}  // namespace ddpm_fast
