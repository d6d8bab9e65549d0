// The CUDA kernels' launches: defined in the *_launch.cu files, the only files
// nvcc compiles, called by the ops' *_cuda.cpp files, which check the tensors,
// allocate the outputs and pass raw pointers and the current stream. This
// header and the .cu files see none of torch's tensor headers: nvcc reads a
// header four times (its host split, the host compile, and once per GPU
// architecture), and torch's made most of the build (a 38-line .cu file took
// 56 s, 12 s with c10's Half and BFloat16 alone; 2026-12-03, 2-core VM).
// Errors raise c10::Error (TORCH_CHECK, C10_CUDA_CHECK), as everywhere.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernel_args.h"

// Runs M(T) for the element types every op takes (explicit instantiations).
#define DDPM_FOR_FLOAT_TYPES(M) M(float) M(c10::Half) M(c10::BFloat16)

namespace ddpm_fast {
namespace cuda {

// fill_randn_ (randn_kernels.cuh): out[0, numel) from the Philox stream.
template <typename T>
void launch_fill_randn(T* out, int64_t numel, uint64_t seed, const RandnCounters& c, cudaStream_t stream);

// q_sample (q_sample_kernels.cuh): xt = sqrt_ab[t] x0 + sqrt_1m_ab[t] noise;
// with noise null, the noise is drawn from (seed, offset) and written to eps.
template <typename T>
void launch_q_sample(const T* x0, const T* noise, const int64_t* t, bool per_sample_t, const float* sqrt_ab,
                     const float* sqrt_1m_ab, int64_t table_size, const ElementLayout& l, uint64_t seed,
                     uint64_t offset, T* xt, T* eps, cudaStream_t stream);

// ddpm_step_ (ddpm_step_kernels.cuh; the arguments are the kernel's).
template <typename X, typename E>
void launch_ddpm_step(const X* x, const E* eps, const int64_t* t, bool per_sample_t, const float* table,
                      int64_t num_steps, const X* noise, uint64_t seed, uint64_t offset, uint64_t sample_stride,
                      uint64_t step_stride, bool clip_denoised, const StepLayout& s, X* out, void* model_input,
                      InputType model_input_type, cudaStream_t stream);

// GroupNorm+SiLU (group_norm_silu_kernels.cuh, group_norm_silu_cluster_kernels.cuh).
// The tiles of the fused and split paths (gn::plan).
gn::Geometry gn_plan(const NormLayout& l, int64_t elem_bytes, bool backward);

// The forward on the cluster path (sm_90+), where the GPU, the build and the
// problem allow it: whether it ran (if not, nothing did).
template <typename T>
bool gn_forward_cluster(const T* x, const NormLayout& l, const gn::Params& p, float eps, T* y, float* mean,
                        float* rstd, cudaStream_t stream);
// The fused forward: y, and the groups' mean and rstd [N, G].
template <typename T>
void gn_forward_fused(const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p, float eps, T* y,
                      float* mean, float* rstd, cudaStream_t stream);
// The split forward's first pass: per (n, c, position tile) the column's float
// mean m and the sums of x - m and (x - m)^2, each [N, C, pos_tiles].
template <typename T>
void gn_moments(const T* x, const NormLayout& l, const gn::Geometry& g, float* m, float* d, float* q,
                cudaStream_t stream);
// The split forward's second pass: y from the groups' mean and rstd.
template <typename T>
void gn_normalize(const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p, const float* mean,
                  const float* rstd, T* y, cudaStream_t stream);

// The backward on the cluster path, as gn_forward_cluster: dx, and per (n, c)
// A, B and dadd (col_a, col_b, dadd zeroed by the caller).
template <typename T>
bool gn_backward_cluster(const T* dy, const T* x, const NormLayout& l, const gn::Params& p, const float* mean,
                         const float* rstd, T* dx, float* col_a, float* col_b, float* dadd, cudaStream_t stream);
// The fused backward: as gn_backward_cluster.
template <typename T>
void gn_backward_fused(const T* dy, const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p,
                       const float* mean, const float* rstd, T* dx, float* col_a, float* col_b, float* dadd,
                       cudaStream_t stream);
// The split backward's first pass: A, B, X per (n, c, position tile).
template <typename T>
void gn_backward_sums(const T* dy, const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p,
                      const float* mean, const float* rstd, float* a, float* b, float* xs, cudaStream_t stream);
// The split backward's second pass: dx from the groups' m1 and m2 [N, G].
template <typename T>
void gn_backward_dx(const T* dy, const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p,
                    const float* mean, const float* rstd, const float* m1, const float* m2, T* dx,
                    cudaStream_t stream);

}  // namespace cuda
}  // namespace ddpm_fast
