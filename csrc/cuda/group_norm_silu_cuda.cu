// GroupNorm+SiLU on the GPU: the host side of group_norm_silu_kernels.cuh
// (tiles, fused and split paths, described there).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../group_norm_silu.h"
#include "cuda_utils.cuh"
#include "group_norm_silu_cluster_kernels.cuh"
#include "group_norm_silu_kernels.cuh"

namespace ddpm_fast {
namespace {

// Runs launch(std::integral_constant<int, V>) with V = 16 bytes of T when
// packets fit every tile row and every pointer, else with V = 1.
template <typename T, typename Launch, typename... Ptrs>
void with_packet_width(const gn::Geometry& g, Launch&& launch, const Ptrs*... ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (gn::packets_fit(g, kVec) && cuda::all_aligned<16>(ptrs...)) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// The dynamic shared memory `kernel` may take on the current device: the
// device's opt-in limit less the kernel's static arrays. Beyond 48 KB in all
// a kernel must be allowed more; each kernel is allowed all of it once per
// device, here, so that launches ask the driver nothing more and no two host
// threads can lower the limit under each other's launch.
int64_t dynamic_smem_allowed(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> allowed;  // by kernel and device
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  if (const auto it = allowed.find(key); it != allowed.end()) return it->second;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t bytes = static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  allowed.emplace(key, bytes);
  return bytes;
}

// kernel<<<blocks, kBlock, smem_bytes, stream>>>(args...), checked; every
// launch here goes through this. A tile past the shared memory the kernel is
// allowed (dynamic_smem_allowed), or a grid past CUDA's 2^31 - 1 blocks, is
// an error, not a failed or partial launch.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int64_t smem_bytes, cudaStream_t stream, Args&&... args) {
  TORCH_CHECK(blocks <= INT32_MAX, "ddpm_fast: GroupNorm+SiLU needs ", blocks,
              " thread blocks, more than CUDA's grid allows (2^31 - 1)");
  if (smem_bytes > 0) {
    const int64_t allowed = dynamic_smem_allowed(reinterpret_cast<const void*>(kernel));
    TORCH_CHECK(smem_bytes <= allowed, "ddpm_fast: GroupNorm+SiLU's tile needs ", smem_bytes,
                " bytes of shared memory; this GPU allows ", allowed, " to this kernel");
  }
  kernel<<<static_cast<unsigned>(blocks), gn::kBlock, smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor as_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

gn::Params make_params(const at::Tensor& w, const at::Tensor& b, const at::Tensor& add, bool act) {
  return {w.defined() ? w.const_data_ptr<float>() : nullptr, b.defined() ? b.const_data_ptr<float>() : nullptr,
          add.defined() ? add.const_data_ptr<float>() : nullptr, act};
}

int64_t grid_of(const NormLayout& l, const gn::Geometry& g) { return l.n * g.col_tiles * g.pos_tiles; }

// The cluster forward (sm_90+, group_norm_silu_cluster_kernels.cuh).
#if CUDART_VERSION >= 12000
// The dynamic shared memory a block of the cluster kernel may ask for on
// `device`: its opt-in limit (the kernel has no static arrays), or 0 where the
// GPU has no clusters (compute capability below 9.0, or no cluster launch).
int64_t cluster_smem_optin(int device) {
  static std::mutex mutex;
  static std::map<int, int64_t> by_device;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = by_device.find(device); it != by_device.end()) return it->second;
  int major = 0, cluster_launch = 0, optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t bytes = major >= 9 && cluster_launch ? optin : 0;
  by_device.emplace(device, bytes);
  return bytes;
}

cudaLaunchConfig_t cluster_config(int64_t blocks, int cluster, int64_t smem_bytes, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(cluster);
  attr->val.clusterDim.y = attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(gn::kBlock);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// Whether `kernel` runs in clusters of `cluster` blocks of `smem_bytes` each on
// `device`: built from sm_90 code or later (elsewhere its body only traps), the
// shared memory allowed, and cudaOccupancyMaxActiveClusters > 0. Asked once
// per kernel, device, cluster size and shared memory.
bool cluster_launchable(const void* kernel, int device, int cluster, int64_t smem_bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, int64_t>, bool> known;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = known.find({kernel, device, cluster, smem_bytes}); it != known.end()) return it->second;
  }
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  bool ok = attr.ptxVersion >= 90 && smem_bytes <= dynamic_smem_allowed(kernel);
  if (ok) {
    cudaLaunchAttribute dims;
    const cudaLaunchConfig_t config = cluster_config(cluster, cluster, smem_bytes, nullptr, &dims);
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // not launchable: the split path instead
      clusters = 0;
    }
    ok = clusters > 0;
  }
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(std::make_tuple(kernel, device, cluster, smem_bytes), ok);
  return ok;
}

// The cluster plan for x on the current device (tiles: 1 for the forward, 2
// for the backward); cluster 0 where the path does not apply: the GPU has no
// clusters, the tile does not fit, or DDPM_FAST_GN_CLUSTER=0 turns it off.
gn::ClusterPlan cluster_plan(const at::Tensor& x, const NormLayout& l, int tiles, int& device) {
  const char* env = std::getenv("DDPM_FAST_GN_CLUSTER");
  if (env != nullptr && env[0] == '0') return {};
  C10_CUDA_CHECK(cudaGetDevice(&device));
  gn::ClusterLimits lim;
  lim.max_block_bytes = cluster_smem_optin(device);
  const gn::ClusterPlan plan = gn::plan_cluster(l.c, l.hw, l.groups, x.element_size(), l.channels_last, lim, tiles);
  return l.n * plan.g.col_tiles * plan.g.pos_tiles <= INT32_MAX ? plan : gn::ClusterPlan{};
}

// kernel<<<the plan's blocks in clusters>>>(args...) where cluster_launchable
// says it runs; whether it ran.
template <typename... Params, typename... Args>
bool launch_in_clusters(void (*kernel)(Params...), const NormLayout& l, const gn::ClusterPlan& plan, int device,
                        cudaStream_t stream, Args&&... args) {
  if (!cluster_launchable(reinterpret_cast<const void*>(kernel), device, plan.cluster, plan.smem_bytes)) return false;
  cudaLaunchAttribute dims;
  const cudaLaunchConfig_t config =
      cluster_config(l.n * plan.g.col_tiles * plan.g.pos_tiles, plan.cluster, plan.smem_bytes, stream, &dims);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}
#endif

// The forward on the cluster path where it applies (the caller found that the
// fused path does not); false where it does not, and nothing ran.
bool forward_cluster(const at::Tensor& x, const NormLayout& l, const gn::Params& p, double eps, at::Tensor& y,
                     at::Tensor& mean, at::Tensor& rstd, cudaStream_t stream) {
#if CUDART_VERSION >= 12000
  int device = 0;
  const gn::ClusterPlan plan = cluster_plan(x, l, /*tiles=*/1, device);
  if (plan.cluster == 0) return false;
  bool ran = false;
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_cluster", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    with_packet_width<scalar_t>(plan.g, [&](auto vec) {
      ran = launch_in_clusters(gn::forward_cluster_kernel<scalar_t, decltype(vec)::value>, l, plan, device, stream,
                               xp, plan.g, p, static_cast<float>(eps), yp, mean.mutable_data_ptr<float>(),
                               rstd.mutable_data_ptr<float>());
    }, xp, yp);
  });
  return ran;
#else
  (void)x, (void)l, (void)p, (void)eps, (void)y, (void)mean, (void)rstd, (void)stream;
  return false;
#endif
}

// The backward on the cluster path where it applies (x and dy of a group in a
// cluster's shared memory); false where it does not, and nothing ran.
bool backward_cluster(const at::Tensor& dy, const at::Tensor& x, const NormLayout& l, const gn::Params& p,
                      const float* mean, const float* rstd, at::Tensor& dx, at::Tensor& col_a, at::Tensor& col_b,
                      at::Tensor& dadd, cudaStream_t stream) {
#if CUDART_VERSION >= 12000
  int device = 0;
  const gn::ClusterPlan plan = cluster_plan(x, l, /*tiles=*/2, device);
  if (plan.cluster == 0) return false;
  bool ran = false;
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_backward_cluster", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    with_packet_width<scalar_t>(plan.g, [&](auto vec) {
      ran = launch_in_clusters(gn::backward_cluster_kernel<scalar_t, decltype(vec)::value>, l, plan, device, stream,
                               dyp, xp, plan.g, p, mean, rstd, dxp, col_a.mutable_data_ptr<float>(),
                               col_b.mutable_data_ptr<float>(), dadd.mutable_data_ptr<float>());
    }, xp, dyp, dxp);
  });
  return ran;
#else
  (void)dy, (void)x, (void)l, (void)p, (void)mean, (void)rstd, (void)dx, (void)col_a, (void)col_b, (void)dadd;
  (void)stream;
  return false;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   const std::optional<at::Tensor>& add,
                                                                   int64_t num_groups, double eps, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "ddpm_fast: float64 GroupNorm runs on the CPU only");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({l.n, l.groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({l.n, l.groups}, x.options().dtype(at::kFloat));
  if (x.numel() == 0) {  // groups of no values (an empty spatial extent): no statistics, NaN
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {y, mean, rstd};
  }
  const at::Tensor w = as_float(weight), b = as_float(bias), a = as_float(add);
  const gn::Params p = make_params(w, b, a, act);
  const gn::Geometry g = gn::plan(l.c, l.hw, l.groups, x.element_size(), l.channels_last, /*backward=*/false);
  const int64_t smem = gn::tile_floats(g) * static_cast<int64_t>(sizeof(float));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // sm_90+: a group too large for a block, in a cluster's shared memory (one read, one write).
  if (!g.fused && forward_cluster(x, l, p, eps, y, mean, rstd, stream)) return {y, mean, rstd};
  DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (g.fused) {
      with_packet_width<scalar_t>(g, [&](auto vec) {
        launch(gn::forward_fused_kernel<scalar_t, decltype(vec)::value>, grid_of(l, g), smem, stream, xp, g, p,
               static_cast<float>(eps), yp, mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
      }, xp, yp);
      return;
    }
    at::Tensor parts = at::empty({3, l.n, l.c, g.pos_tiles}, x.options().dtype(at::kFloat));
    with_packet_width<scalar_t>(g, [&](auto vec) {
      launch(gn::moments_kernel<scalar_t, decltype(vec)::value>, grid_of(l, g), smem, stream, xp, g,
             parts[0].mutable_data_ptr<float>(), parts[1].mutable_data_ptr<float>(),
             parts[2].mutable_data_ptr<float>());
    }, xp);
    // The tile columns' moments combined in double by Chan's parallel formula:
    // a column of n values about its float mean m, with D = sum (x - m) and
    // Q = sum (x - m)^2, has the mean m + D / n and M2 = Q - D^2 / n; the
    // group's M2 is the columns' M2 plus n (column mean - group mean)^2 summed.
    // Every float sum is of deviations from its own column's mean, so none
    // cancels wherever the values lie (sums shifted by the group's first
    // value, before, lost the variance when that value lay far from the mean).
    const at::Tensor part = parts.to(at::kDouble);
    at::Tensor n_t = at::full({g.pos_tiles}, static_cast<double>(g.block_s), x.options().dtype(at::kDouble));
    n_t.select(0, g.pos_tiles - 1).fill_(static_cast<double>(l.hw - (g.pos_tiles - 1) * g.block_s));
    const at::Tensor dev = part[1];
    at::Tensor col_mean = part[0] + dev / n_t;  // [N, C, T]
    if (a.defined()) col_mean = col_mean + a.to(at::kDouble).view({l.n, l.c, 1});
    const at::Tensor col_m2 = part[2] - dev * dev / n_t;
    const double count = static_cast<double>(l.c / l.groups * l.hw);
    auto group_sum = [&](const at::Tensor& v) {  // [N, C, T] -> [N, G, 1, 1]
      return v.view({l.n, l.groups, -1, g.pos_tiles}).sum({2, 3}, /*keepdim=*/true);
    };
    const at::Tensor d_mean = group_sum(col_mean * n_t) / count;
    const at::Tensor spread = col_mean.view({l.n, l.groups, -1, g.pos_tiles}) - d_mean;
    const at::Tensor var = ((group_sum(col_m2) + (spread * spread * n_t).sum({2, 3}, true)) / count).clamp_min(0.0);
    mean.copy_(d_mean.view({l.n, l.groups}));
    rstd.copy_((var + eps).rsqrt().view({l.n, l.groups}));
    with_packet_width<scalar_t>(g, [&](auto vec) {
      launch(gn::normalize_kernel<scalar_t, decltype(vec)::value>, grid_of(l, g), 0, stream, xp, g, p,
             mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), yp);
    }, xp, yp);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "ddpm_fast: float64 GroupNorm runs on the CPU only");
  check_group_norm_backward_args(dy_in, x, mean, rstd, l);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = x.is_contiguous() ? dy_in.contiguous() : dy_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty_like(x);
  at::Tensor col_a = at::zeros({l.n, l.c}, x.options().dtype(at::kFloat));
  at::Tensor col_b = at::zeros({l.n, l.c}, x.options().dtype(at::kFloat));
  at::Tensor dadd = at::zeros({l.n, l.c}, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    const at::Tensor w = as_float(weight), b = as_float(bias), a = as_float(add);
    const gn::Params p = make_params(w, b, a, act);
    const gn::Geometry g = gn::plan(l.c, l.hw, l.groups, x.element_size(), l.channels_last, /*backward=*/true);
    const int64_t smem = 2 * gn::tile_floats(g) * static_cast<int64_t>(sizeof(float));
    const int64_t cg = l.c / l.groups;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const float* mp = mean.const_data_ptr<float>();
    const float* rp = rstd.const_data_ptr<float>();
    // sm_90+: x and dy of a group too large for a block, in a cluster's shared memory (one read of each).
    const bool clustered = !g.fused && backward_cluster(dy, x, l, p, mp, rp, dx, col_a, col_b, dadd, stream);
    if (!clustered) DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_backward_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      if (g.fused) {
        with_packet_width<scalar_t>(g, [&](auto vec) {
          launch(gn::backward_fused_kernel<scalar_t, decltype(vec)::value>, grid_of(l, g), smem, stream, dyp, xp, g,
                 p, mp, rp, dxp, col_a.mutable_data_ptr<float>(), col_b.mutable_data_ptr<float>(),
                 dadd.mutable_data_ptr<float>());
        }, xp, dyp, dxp);
        return;
      }
      at::Tensor sums = at::empty({3, l.n, l.c, g.pos_tiles}, x.options().dtype(at::kFloat));
      with_packet_width<scalar_t>(g, [&](auto vec) {
        launch(gn::backward_sums_kernel<scalar_t, decltype(vec)::value>, grid_of(l, g), smem, stream, dyp, xp, g, p,
               mp, rp, sums[0].mutable_data_ptr<float>(), sums[1].mutable_data_ptr<float>(),
               sums[2].mutable_data_ptr<float>());
      }, xp, dyp);
      const at::Tensor totals = sums.sum(-1);  // [3, N, C]: A, B, X
      col_a = totals[0];
      col_b = totals[1];
      const at::Tensor wf = w.defined() ? w : at::ones({l.c}, x.options().dtype(at::kFloat));
      const double count = static_cast<double>(cg * l.hw);
      const at::Tensor m1 = ((wf * col_b).view({l.n, l.groups, cg}).sum(-1) / count).contiguous();
      const at::Tensor m2 = ((wf * col_a).view({l.n, l.groups, cg}).sum(-1) / count).contiguous();
      with_packet_width<scalar_t>(g, [&](auto vec) {
        launch(gn::backward_dx_kernel<scalar_t, decltype(vec)::value>, grid_of(l, g), 0, stream, dyp, xp, g, p, mp,
               rp, m1.const_data_ptr<float>(), m2.const_data_ptr<float>(), dxp);
      }, xp, dyp, dxp);
      const auto per_channel = [&](const at::Tensor& t) { return t.repeat_interleave(cg, 1); };
      dadd = per_channel(rstd) * (wf * col_b - static_cast<double>(l.hw) * per_channel(m1) - totals[2] * per_channel(m2));
    });
  }
  const auto [dweight, dbias, dadd_t] = param_grads_as(col_a.sum(0), col_b.sum(0), dadd, x, weight, bias, add);
  return {dx, dweight, dbias, dadd_t};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cuda);
}

}  // namespace ddpm_fast
