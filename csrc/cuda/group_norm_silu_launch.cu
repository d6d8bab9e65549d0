// GroupNorm+SiLU's launches (launch.h; the kernels, their tiles and paths are
// described in group_norm_silu_kernels.cuh). group_norm_silu_cuda.cpp picks
// the path and, on the split path, combines the moments between launches.
#include <algorithm>
#include <cctype>
#include <climits>
#include <cstdlib>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <c10/util/Exception.h>

#include "cuda_utils.cuh"
#include "group_norm_silu_cluster_kernels.cuh"
#include "group_norm_silu_kernels.cuh"
#include "launch.h"

namespace ddpm_fast {
namespace cuda {
namespace {

// Runs launch(std::integral_constant<int, V>) with V = 16 bytes of T when
// packets fit every tile row and every pointer, else with V = 1.
template <typename T, typename Launch, typename... Ptrs>
void with_packet_width(const gn::Geometry& g, Launch&& launch, const Ptrs*... ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (gn::packets_fit(g, kVec) && all_aligned<16>(ptrs...)) {
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

int64_t grid_of(const NormLayout& l, const gn::Geometry& g) { return l.n * g.col_tiles * g.pos_tiles; }

// Shared memory of the fused and split paths' tiles (the backward's: x and dy).
int64_t tile_bytes(const gn::Geometry& g, int tiles) {
  return tiles * gn::tile_floats(g) * static_cast<int64_t>(sizeof(float));
}

// The cluster path (sm_90+, group_norm_silu_cluster_kernels.cuh).
#if CUDART_VERSION >= 12000
// Whether `device` runs thread-block clusters: compute capability 9.0 or
// later, with cluster launch.
bool has_clusters(int device) {
  static std::mutex mutex;
  static std::map<int, bool> by_device;
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = by_device.find(device); it != by_device.end()) return it->second;
  int major = 0, cluster_launch = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, device));
  const bool yes = major >= 9 && cluster_launch;
  by_device.emplace(device, yes);
  return yes;
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
    // An error an earlier call left pending is raised here, not cleared below
    // as if it were this query's (every launch of ours checks its own).
    C10_CUDA_CHECK(cudaPeekAtLastError());
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // this query's own error: not launchable, the split path instead
      clusters = 0;
    }
    ok = clusters > 0;
  }
  const std::lock_guard<std::mutex> lock(mutex);
  known.emplace(std::make_tuple(kernel, device, cluster, smem_bytes), ok);
  return ok;
}

// Whether DDPM_FAST_GN_CLUSTER leaves the cluster path on: unset, empty, 1,
// true, on or yes (any case) on; 0, false, off or no off; anything else is an
// error rather than a guess.
bool cluster_path_enabled() {
  const char* env = std::getenv("DDPM_FAST_GN_CLUSTER");
  if (env == nullptr) return true;
  std::string value(env);
  for (char& ch : value) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (value.empty() || value == "1" || value == "true" || value == "on" || value == "yes") return true;
  TORCH_CHECK(value == "0" || value == "false" || value == "off" || value == "no",
              "ddpm_fast: DDPM_FAST_GN_CLUSTER=", env, " is not one of 1, true, on, yes (the cluster path, the "
              "default) or 0, false, off, no (the split path)");
  return false;
}

// The cluster plan for x on the current device (tiles: 1 for the forward, 2
// for the backward), for `kernels` (the path's kernel at both packet widths,
// either of which may run it); cluster 0 where the path does not apply: the
// GPU has no clusters, the tile does not fit, or DDPM_FAST_GN_CLUSTER turns it
// off. A block's budget is the dynamic shared memory each kernel is allowed,
// as launch_in_clusters checks it: the opt-in limit less the kernel's static
// shared memory. The cluster kernels have no static arrays, but their sm_90
// code has 1 KB of it all the same (cuobjdump -res-usage: SHARED:1024, the
// .nv.shared.reserved section every sm_90 kernel gets). Planned against the
// whole opt-in limit, a block in that last 1 KB would fail cluster_launchable
// wherever the driver counts that 1 KB, and send the op down the split path
// where a larger cluster would have fit.
gn::ClusterPlan cluster_plan(const NormLayout& l, int64_t elem_bytes, int tiles,
                             std::initializer_list<const void*> kernels, int& device) {
  if (!cluster_path_enabled()) return {};
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (!has_clusters(device)) return {};
  gn::ClusterLimits lim;
  lim.max_block_bytes = INT64_MAX;
  for (const void* kernel : kernels) lim.max_block_bytes = std::min(lim.max_block_bytes, dynamic_smem_allowed(kernel));
  const gn::ClusterPlan plan = gn::plan_cluster(l.c, l.hw, l.groups, elem_bytes, l.channels_last, lim, tiles);
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

}  // namespace

gn::Geometry gn_plan(const NormLayout& l, int64_t elem_bytes, bool backward) {
  return gn::plan(l.c, l.hw, l.groups, elem_bytes, l.channels_last, backward);
}

template <typename T>
bool gn_forward_cluster(const T* x, const NormLayout& l, const gn::Params& p, float eps, T* y, float* mean,
                        float* rstd, cudaStream_t stream) {
#if CUDART_VERSION >= 12000
  int device = 0;
  constexpr int kVec = 16 / sizeof(T);
  const gn::ClusterPlan plan = cluster_plan(l, sizeof(T), /*tiles=*/1,
                                            {reinterpret_cast<const void*>(gn::forward_cluster_kernel<T, 1>),
                                             reinterpret_cast<const void*>(gn::forward_cluster_kernel<T, kVec>)},
                                            device);
  if (plan.cluster == 0) return false;
  bool ran = false;
  with_packet_width<T>(plan.g, [&](auto vec) {
    ran = launch_in_clusters(gn::forward_cluster_kernel<T, decltype(vec)::value>, l, plan, device, stream, x, plan.g,
                             p, eps, y, mean, rstd);
  }, x, y);
  return ran;
#else
  (void)x, (void)l, (void)p, (void)eps, (void)y, (void)mean, (void)rstd, (void)stream;
  return false;
#endif
}

template <typename T>
void gn_forward_fused(const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p, float eps, T* y,
                      float* mean, float* rstd, cudaStream_t stream) {
  with_packet_width<T>(g, [&](auto vec) {
    launch(gn::forward_fused_kernel<T, decltype(vec)::value>, grid_of(l, g), tile_bytes(g, 1), stream, x, g, p, eps,
           y, mean, rstd);
  }, x, y);
}

template <typename T>
void gn_moments(const T* x, const NormLayout& l, const gn::Geometry& g, float* m, float* d, float* q,
                cudaStream_t stream) {
  with_packet_width<T>(g, [&](auto vec) {
    launch(gn::moments_kernel<T, decltype(vec)::value>, grid_of(l, g), tile_bytes(g, 1), stream, x, g, m, d, q);
  }, x);
}

template <typename T>
void gn_normalize(const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p, const float* mean,
                  const float* rstd, T* y, cudaStream_t stream) {
  with_packet_width<T>(g, [&](auto vec) {
    launch(gn::normalize_kernel<T, decltype(vec)::value>, grid_of(l, g), 0, stream, x, g, p, mean, rstd, y);
  }, x, y);
}

template <typename T>
bool gn_backward_cluster(const T* dy, const T* x, const NormLayout& l, const gn::Params& p, const float* mean,
                         const float* rstd, T* dx, float* col_a, float* col_b, float* dadd, cudaStream_t stream) {
#if CUDART_VERSION >= 12000
  int device = 0;
  constexpr int kVec = 16 / sizeof(T);
  const gn::ClusterPlan plan = cluster_plan(l, sizeof(T), /*tiles=*/2,
                                            {reinterpret_cast<const void*>(gn::backward_cluster_kernel<T, 1>),
                                             reinterpret_cast<const void*>(gn::backward_cluster_kernel<T, kVec>)},
                                            device);
  if (plan.cluster == 0) return false;
  bool ran = false;
  with_packet_width<T>(plan.g, [&](auto vec) {
    ran = launch_in_clusters(gn::backward_cluster_kernel<T, decltype(vec)::value>, l, plan, device, stream, dy, x,
                             plan.g, p, mean, rstd, dx, col_a, col_b, dadd);
  }, x, dy, dx);
  return ran;
#else
  (void)dy, (void)x, (void)l, (void)p, (void)mean, (void)rstd, (void)dx, (void)col_a, (void)col_b, (void)dadd;
  (void)stream;
  return false;
#endif
}

template <typename T>
void gn_backward_fused(const T* dy, const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p,
                       const float* mean, const float* rstd, T* dx, float* col_a, float* col_b, float* dadd,
                       cudaStream_t stream) {
  with_packet_width<T>(g, [&](auto vec) {
    launch(gn::backward_fused_kernel<T, decltype(vec)::value>, grid_of(l, g), tile_bytes(g, 2), stream, dy, x, g, p,
           mean, rstd, dx, col_a, col_b, dadd);
  }, x, dy, dx);
}

template <typename T>
void gn_backward_sums(const T* dy, const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p,
                      const float* mean, const float* rstd, float* a, float* b, float* xs, cudaStream_t stream) {
  with_packet_width<T>(g, [&](auto vec) {
    launch(gn::backward_sums_kernel<T, decltype(vec)::value>, grid_of(l, g), tile_bytes(g, 2), stream, dy, x, g, p,
           mean, rstd, a, b, xs);
  }, x, dy);
}

template <typename T>
void gn_backward_dx(const T* dy, const T* x, const NormLayout& l, const gn::Geometry& g, const gn::Params& p,
                    const float* mean, const float* rstd, const float* m1, const float* m2, T* dx,
                    cudaStream_t stream) {
  with_packet_width<T>(g, [&](auto vec) {
    launch(gn::backward_dx_kernel<T, decltype(vec)::value>, grid_of(l, g), 0, stream, dy, x, g, p, mean, rstd, m1, m2,
           dx);
  }, x, dy, dx);
}

#define DDPM_INSTANTIATE(T)                                                                                          \
  template bool gn_forward_cluster<T>(const T*, const NormLayout&, const gn::Params&, float, T*, float*, float*,     \
                                      cudaStream_t);                                                               \
  template void gn_forward_fused<T>(const T*, const NormLayout&, const gn::Geometry&, const gn::Params&, float, T*, \
                                    float*, float*, cudaStream_t);                                                  \
  template void gn_moments<T>(const T*, const NormLayout&, const gn::Geometry&, float*, float*, float*,             \
                              cudaStream_t);                                                                        \
  template void gn_normalize<T>(const T*, const NormLayout&, const gn::Geometry&, const gn::Params&, const float*,  \
                                const float*, T*, cudaStream_t);                                                    \
  template bool gn_backward_cluster<T>(const T*, const T*, const NormLayout&, const gn::Params&, const float*,       \
                                       const float*, T*, float*, float*, float*, cudaStream_t);                     \
  template void gn_backward_fused<T>(const T*, const T*, const NormLayout&, const gn::Geometry&, const gn::Params&, \
                                     const float*, const float*, T*, float*, float*, float*, cudaStream_t);         \
  template void gn_backward_sums<T>(const T*, const T*, const NormLayout&, const gn::Geometry&, const gn::Params&,  \
                                    const float*, const float*, float*, float*, float*, cudaStream_t);              \
  template void gn_backward_dx<T>(const T*, const T*, const NormLayout&, const gn::Geometry&, const gn::Params&,    \
                                  const float*, const float*, const float*, const float*, T*, cudaStream_t);
DDPM_FOR_FLOAT_TYPES(DDPM_INSTANTIATE)
#undef DDPM_INSTANTIATE

}  // namespace cuda
}  // namespace ddpm_fast
