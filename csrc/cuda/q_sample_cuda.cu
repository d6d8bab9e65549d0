// q_sample on the GPU: one read of x0 (and of the noise, if given), one write
// of x_t (and of the drawn noise); kVec elements per thread, 16-byte accesses.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>


#include "../q_sample.h"
#include "cuda_utils.cuh"

namespace ddpm_fast {
namespace {

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
    T xv[kVec], nv[kVec];
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

    T yv[kVec], ev[kVec];
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
        z = cuda::philox_normal(seed, offset + static_cast<uint64_t>(logical));
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

template <typename T, bool kDraw>
void launch(const at::Tensor& x0, const at::Tensor* noise, const at::Tensor& t,
            const at::Tensor& sqrt_ab, const at::Tensor& sqrt_1m_ab, const ElementLayout& l,
            uint64_t seed, uint64_t offset, at::Tensor& xt, at::Tensor* eps) {
  constexpr int kVec = 16 / sizeof(T);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const T* x = x0.const_data_ptr<T>();
  const T* nz = noise ? noise->const_data_ptr<T>() : nullptr;
  T* y = xt.mutable_data_ptr<T>();
  T* e = eps ? eps->mutable_data_ptr<T>() : nullptr;
  const bool per_sample_t = t.dim() == 1 && t.numel() > 1;
  const bool vector_ok = cuda::all_aligned<16>(x, y) && (nz == nullptr || cuda::all_aligned<16>(nz)) &&
                         (e == nullptr || cuda::all_aligned<16>(e));
  if (vector_ok) {
    q_sample_kernel<T, kVec, kDraw>
        <<<cuda::grid_size((l.numel + kVec - 1) / kVec), cuda::kThreads, 0, stream>>>(
            x, nz, t.const_data_ptr<int64_t>(), per_sample_t, sqrt_ab.const_data_ptr<float>(),
            sqrt_1m_ab.const_data_ptr<float>(), sqrt_ab.numel(), y, e, l, seed, offset);
  } else {
    q_sample_kernel<T, 1, kDraw><<<cuda::grid_size(l.numel), cuda::kThreads, 0, stream>>>(
        x, nz, t.const_data_ptr<int64_t>(), per_sample_t, sqrt_ab.const_data_ptr<float>(),
        sqrt_1m_ab.const_data_ptr<float>(), sqrt_ab.numel(), y, e, l, seed, offset);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void q_sample_impl(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                   const at::Tensor& sqrt_1m_ab, const at::Tensor* noise, int64_t seed,
                   int64_t offset, at::Tensor& xt, at::Tensor* eps) {
  const ElementLayout l = check_q_sample_args(x0, t, sqrt_ab, sqrt_1m_ab, noise);
  if (l.numel == 0) return;
  const c10::cuda::CUDAGuard guard(x0.device());
  DDPM_DISPATCH_FLOAT_TYPES(x0.scalar_type(), "q_sample_cuda", [&] {
    if (noise == nullptr) {
      launch<scalar_t, true>(x0, nullptr, t, sqrt_ab, sqrt_1m_ab, l, static_cast<uint64_t>(seed),
                             static_cast<uint64_t>(offset), xt, eps);
    } else {
      launch<scalar_t, false>(x0, noise, t, sqrt_ab, sqrt_1m_ab, l, 0, 0, xt, nullptr);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> q_sample_randn_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                       const at::Tensor& sqrt_ab,
                                                       const at::Tensor& sqrt_1m_ab, int64_t seed,
                                                       int64_t offset) {
  at::Tensor xt = at::empty_like(x0);
  at::Tensor eps = at::empty_like(x0);
  q_sample_impl(x0, t, sqrt_ab, sqrt_1m_ab, nullptr, seed, offset, xt, &eps);
  return {xt, eps};
}

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& sqrt_ab,
                         const at::Tensor& sqrt_1m_ab, const at::Tensor& noise) {
  at::Tensor xt = at::empty_like(x0);
  q_sample_impl(x0, t, sqrt_ab, sqrt_1m_ab, &noise, 0, 0, xt, nullptr);
  return xt;
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("q_sample_randn", &q_sample_randn_cuda);
  m.impl("q_sample", &q_sample_cuda);
}

}  // namespace ddpm_fast
