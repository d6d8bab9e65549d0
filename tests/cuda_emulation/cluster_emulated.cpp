// Runs the GroupNorm+SiLU cluster kernels (csrc/cuda/group_norm_silu_cluster_kernels.cuh)
// under emulate.h, a cluster's blocks at once, against a float64 reference, and
// prints the worst error of each output: the forward's y, mean and rstd, the
// backward's dx, A, B and dadd (from the reference statistics). Used by
// tests/test_cuda_kernels_emulated.py.
//
//   cluster_emulated N C S G LAYOUT DTYPE PACKETS THREADS BLOCK_BYTES K [far|nonfinite|eps|offset]
//     LAYOUT nchw|nhwc, DTYPE f32|f16|bf16, PACKETS wide|scalar: what the plan must
//     allow. BLOCK_BYTES: the shared memory a block may take (the GPU's opt-in
//     limit, shrunk so that small inputs need a cluster; twice that for the
//     backward, whose blocks hold x and dy); K: the cluster size the forward's plan
//     must choose (the backward's must choose one). far: N(0, 1) data whose every group starts with 1e3 (its
//     first value far from its mean), mean, rstd and float32 y held to float32
//     rounding. nonfinite (G >= 6): groups 0-5 of each sample hold +Inf, -Inf, both,
//     NaN, an add of +Inf, two +Inf, as group_norm_silu_emulated.cpp's (see poison);
//     every output must be NaN, +Inf or -Inf exactly where the float64 reference has
//     it: the mean of a group is its sum over its count (+-Inf, or NaN), its rstd
//     NaN. A single value lies in the first block of its cluster in even samples and
//     in the last in odd ones; the finite values of its group in the others.
//     eps: eps 0.25 (see group_norm_silu_emulated.cpp). offset (f32 only): N(0, 1)
//     data about 3e4, mean and rstd held to 5e-7, y to 2e-2, the backward not held
//     (see group_norm_silu_emulated.cpp): a column's D / ns corrects its float mean m
//     by the rounding of 3e4-sized sums: without it rstd was off by 8e-6 or more.
//   cluster_emulated plan C S G LAYOUT ELEM_BYTES TILES BLOCK_BYTES: prints the plan
//     (TILES 1: the forward's, 2: the backward's).
// Each case runs with and without add, affine parameters and SiLU. Exit status 0
// when every output is within tolerance, 1 otherwise.
#include "emulate.h"
// clang-format off: the kernels need the emulation first
#include "../../csrc/cuda/group_norm_silu_cluster_kernels.cuh"
// clang-format on

#include "group_norm_reference.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

using namespace ddpm_fast;
using namespace gn_reference;

namespace {

struct Case {
  int64_t n, c, s, g;
  bool channels_last;
  std::string dtype;
  bool wide;
  unsigned threads;
  int64_t block_bytes;
  int cluster;
  bool far;
  bool nonfinite;  // groups 0-5 poisoned (poison)
  double eps;  // 0.25 with the eps mode (see group_norm_silu_emulated.cpp), else 1e-5
  bool offset;  // N(0, 1) data about kOffset
};

constexpr double kOffset = 3e4;

template <typename T, int V>
bool run(const Case& k) {
  gn::ClusterLimits lim;
  lim.max_block_bytes = lim.target_block_bytes = k.block_bytes;
  const gn::ClusterPlan plan = gn::plan_cluster(k.c, k.s, k.g, sizeof(T), k.channels_last, lim);
  std::printf("plan: cluster %d, cols %lld, block_s %lld, col tiles %lld, smem %lld bytes, packets %d\n", plan.cluster,
              static_cast<long long>(plan.g.cols), static_cast<long long>(plan.g.block_s),
              static_cast<long long>(plan.g.col_tiles), static_cast<long long>(plan.smem_bytes), V);
  gn::ClusterLimits blim;
  blim.max_block_bytes = blim.target_block_bytes = 2 * k.block_bytes;
  const gn::ClusterPlan bplan = gn::plan_cluster(k.c, k.s, k.g, sizeof(T), k.channels_last, blim, /*tiles=*/2);
  std::printf("backward plan: cluster %d, cols %lld, block_s %lld, smem %lld bytes\n", bplan.cluster,
              static_cast<long long>(bplan.g.cols), static_cast<long long>(bplan.g.block_s),
              static_cast<long long>(bplan.smem_bytes));
  if (plan.cluster != k.cluster || (V > 1 && !gn::packets_fit(plan.g, V)) || plan.smem_bytes > k.block_bytes ||
      bplan.cluster == 0 || (V > 1 && !gn::packets_fit(bplan.g, V)) || bplan.smem_bytes > 2 * k.block_bytes) {
    std::printf("plan: not the case asked for (cluster %d, packets fit %d)  FAILED\n", k.cluster,
                plan.cluster ? gn::packets_fit(plan.g, V) : 0);
    return false;
  }
  std::mt19937 gen(7);
  std::normal_distribution<double> normal;
  const int64_t numel = k.n * k.c * k.s;
  std::vector<double> x, dy;
  for (int64_t i = 0; i < numel; ++i) {
    // mean 3: the statistics must not cancel
    x.push_back(rounded<T>(k.far ? normal(gen) : k.offset ? kOffset + normal(gen) : 2 * normal(gen) + 3));
    dy.push_back(rounded<T>(normal(gen)));
  }
  if (k.far) {
    for (int64_t n = 0; n < k.n; ++n)
      for (int64_t g = 0; g < k.g; ++g) x[at(k, n, g * (k.c / k.g), 0)] = 1e3;
  }
  std::vector<double> w, b, add;
  for (int64_t c = 0; c < k.c; ++c) {
    w.push_back(rounded<float>(1 + normal(gen)));
    b.push_back(rounded<float>(normal(gen)));
  }
  for (int64_t i = 0; i < k.n * k.c; ++i) add.push_back(rounded<float>(normal(gen)));
  if (k.nonfinite) poison(k, x, add);
  std::vector<T> xt(numel), dyt(numel);
  for (int64_t i = 0; i < numel; ++i) xt[i] = T(static_cast<float>(x[i])), dyt[i] = T(static_cast<float>(dy[i]));
  const std::vector<float> wf(w.begin(), w.end()), bf(b.begin(), b.end()), af(add.begin(), add.end());

  const double tol = k.dtype == "f32" ? 2e-4 : k.dtype == "f16" ? 4e-3 : 2e-2;  // 16-bit y is rounded
  const double stat_tol = k.far || k.offset ? 5e-7 : 1e-4;
  const double y_tol = k.offset ? 2e-2 : k.far && k.dtype == "f32" ? 2e-6 : tol;
  const std::vector<double> none;
  bool ok = true;
  // (add, affine, act): every option on and off.
  for (const auto& [with_add, affine, act] : {std::tuple{true, true, true}, {false, false, true}, {true, false, false},
                                             {false, true, false}}) {
    const Reference ref = reference(k, x, dy, with_add ? add : none, affine ? w : none, affine ? b : none, act);
    const gn::Params prm{affine ? wf.data() : nullptr, affine ? bf.data() : nullptr, with_add ? af.data() : nullptr,
                         act};
    std::vector<T> y(numel, T(NAN));
    std::vector<float> mean(k.n * k.g, NAN), rstd(k.n * k.g, NAN);
    const unsigned grid = static_cast<unsigned>(k.n * plan.g.col_tiles * plan.g.pos_tiles);
    emu::launch_cluster(gn::forward_cluster_kernel<T, V>, grid, static_cast<unsigned>(plan.cluster), k.threads,
                        static_cast<size_t>(plan.smem_bytes), static_cast<const T*>(xt.data()), plan.g, prm, static_cast<float>(k.eps),
                        y.data(), mean.data(), rstd.data());
    // The backward, from the reference statistics.
    const std::vector<float> rmean(ref.mean.begin(), ref.mean.end()), rrstd(ref.rstd.begin(), ref.rstd.end());
    std::vector<T> dx(numel, T(NAN));
    std::vector<float> col_a(k.n * k.c, NAN), col_b(k.n * k.c, NAN), dadd(k.n * k.c, NAN);
    const unsigned bgrid = static_cast<unsigned>(k.n * bplan.g.col_tiles * bplan.g.pos_tiles);
    emu::launch_cluster(gn::backward_cluster_kernel<T, V>, bgrid, static_cast<unsigned>(bplan.cluster), k.threads,
                        static_cast<size_t>(bplan.smem_bytes), static_cast<const T*>(dyt.data()),
                        static_cast<const T*>(xt.data()), bplan.g, prm, static_cast<const float*>(rmean.data()),
                        static_cast<const float*>(rrstd.data()), dx.data(), col_a.data(), col_b.data(), dadd.data());
    const double errs[] = {worst(y, ref.y, y_tol, y_tol),         worst(mean, ref.mean, stat_tol, stat_tol),
                           worst(rstd, ref.rstd, stat_tol, stat_tol), worst(dx, ref.dx, tol, tol),
                           worst(col_a, ref.a, 1e-3, 1e-3),        worst(col_b, ref.bsum, 1e-3, 1e-3),
                           worst(dadd, ref.dadd, 1e-3, 1e-3)};
    std::printf("add=%d affine=%d act=%d:", with_add, affine, act);
    const char* names[] = {"y", "mean", "rstd", "dx", "A", "B", "dadd"};
    for (int i = 0; i < 7; ++i) {
      const bool held = !k.offset || i < 3;  // offset: the forward's outputs only
      std::printf(" %s %.3g%s", names[i], errs[i], !held ? " (not held)" : errs[i] <= 1 ? "" : " FAILED");
      ok = ok && (!held || errs[i] <= 1);
    }
    if (k.far || k.offset) {
      std::printf(" (%s: rstd rel %.3g, mean rel %.3g, y rel %.3g)", k.far ? "far" : "offset", worst(rstd, ref.rstd, 0, 1),
                  worst(mean, ref.mean, 0, 1), worst(y, ref.y, 1, 1));
    }
    std::printf("\n");
    if (k.nonfinite) {  // the poisoned groups' statistics, got (want)
      for (int64_t n = 0; n < k.n; ++n) {
        std::printf("  n=%lld:", static_cast<long long>(n));
        for (int64_t g = 0; g < 6; ++g) {
          const int64_t i = n * k.g + g;
          std::printf(" g%lld mean %g (%g) rstd %g (%g);", static_cast<long long>(g), mean[i], ref.mean[i], rstd[i],
                      ref.rstd[i]);
        }
        std::printf("\n");
      }
    }
  }
  return ok;
}

template <typename T>
bool dispatch(const Case& k) {
  constexpr int kWide = 16 / sizeof(T);
  return k.wide ? run<T, kWide>(k) : run<T, 1>(k);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 9 && std::string(argv[1]) == "plan") {  // plan C S G nchw|nhwc ELEM_BYTES TILES BLOCK_BYTES
    gn::ClusterLimits lim;
    lim.max_block_bytes = std::atoll(argv[8]);
    const gn::ClusterPlan plan = gn::plan_cluster(std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]),
                                                  std::atoll(argv[6]), std::string(argv[5]) == "nhwc", lim,
                                                  std::atoi(argv[7]));
    std::printf("cluster %d cols %lld block_s %lld smem %lld\n", plan.cluster, static_cast<long long>(plan.g.cols),
                static_cast<long long>(plan.g.block_s), static_cast<long long>(plan.smem_bytes));
    return 0;
  }
  const std::string mode = argc == 12 ? argv[11] : "";
  if (argc != 11 && !(argc == 12 && (mode == "far" || mode == "nonfinite" || mode == "eps" || mode == "offset"))) {
    std::fprintf(stderr, "usage: %s N C S G nchw|nhwc f32|f16|bf16 wide|scalar THREADS BLOCK_BYTES K [far|nonfinite|eps|offset]\n",
                 argv[0]);
    return 2;
  }
  const Case k{std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]),
               std::string(argv[5]) == "nhwc", argv[6], std::string(argv[7]) == "wide",
               static_cast<unsigned>(std::atoi(argv[8])), std::atoll(argv[9]), std::atoi(argv[10]), mode == "far",
               mode == "nonfinite", mode == "eps" ? 0.25 : 1e-5, mode == "offset"};
  if (k.nonfinite && k.g < 6) {
    std::fprintf(stderr, "nonfinite needs G >= 6\n");
    return 2;
  }
  if (k.offset && k.dtype != "f32") {
    std::fprintf(stderr, "offset needs f32 (16-bit types hold 3e4 to 16 or 128)\n");
    return 2;
  }
  bool ok;
  if (k.dtype == "f32") {
    ok = dispatch<float>(k);
  } else if (k.dtype == "f16") {
    ok = dispatch<emu::half>(k);
  } else {
    ok = dispatch<emu::bf16>(k);
  }
  return ok ? 0 : 1;
}
