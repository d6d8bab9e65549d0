// Runs the CUDA GroupNorm+SiLU kernels (csrc/cuda/group_norm_silu_kernels.cuh)
// under emulate.h against a float64 reference, forward and backward, and
// prints the worst error of each output. Used by tests/test_cuda_kernels_emulated.py.
//
//   group_norm_silu_emulated N C S G LAYOUT DTYPE PATH PACKETS THREADS [far|nonfinite|eps|offset]
//     LAYOUT nchw|nhwc, DTYPE f32|bf16, PACKETS wide|scalar, PATH fused|split|large:
//     split shrinks the tiles so that small inputs take the split path; large
//     keeps the real tile sizes and expects an input too large to fuse.
//     far: N(0, 1) data whose every group starts with 1e3 (its first value far
//     from its mean), the forward's mean, rstd and y held to float32 rounding.
//     nonfinite (G >= 6): groups 0-5 of each sample hold +Inf, -Inf, both, NaN,
//     an add of +Inf, two +Inf (see poison); every output must be NaN, +Inf
//     or -Inf exactly where the float64 reference has it: the mean of a group
//     is its sum over its count (+-Inf, or NaN), its rstd NaN.
//     eps: eps 0.25 instead of 1e-5, a sixteenth of the data's variance (4), so
//     that a fused kernel that drops or replaces it is off by 3% in rstd.
//     offset (f32 only): N(0, 1) data about 3e4 (kOffset). A tile column's float
//     mean m is then off its true mean by float32 rounding of 3e4-sized sums
//     (~1e-3); D = sum (x - m) corrects it. Without D the columns' spread about
//     the group's mean, and so rstd, is off by 6e-6 to 1.4e-4 (relative), with
//     it by under 4e-8: mean and rstd are held to 5e-7, as far's. y, computed
//     from x * scale at |x| 3e4, is float32 to about 3e4 * 2^-24 = 2e-3
//     (5e-3 measured): held to 2e-2, as bfloat16's. The backward is not held:
//     it takes the reference statistics (D cannot touch it), and its float32
//     xhat at |x| 3e4 is off by the same 2e-3 (A by up to 0.035 (1 + |A|)).
// Exit status 0 when every output is within tolerance, 1 otherwise.
#include "emulate.h"
// clang-format off: the kernels need the emulation first
#include "../../csrc/cuda/group_norm_silu_kernels.cuh"
// clang-format on

#include "group_norm_reference.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <tuple>

using namespace ddpm_fast;
using namespace gn_reference;

namespace {

struct Case {
  int64_t n, c, s, g;
  bool channels_last, bf16, split, wide;
  unsigned threads;
  bool shrink;  // small tiles, to force the split path
  bool far;     // each group's first value 1e3 in N(0, 1) data
  bool nonfinite;  // groups 0-5 poisoned (poison)
  double eps;
  bool offset;  // N(0, 1) data about kOffset
};

constexpr double kOffset = 3e4;

struct Problem {
  std::vector<double> x, w, b, add, dy;  // x and dy already rounded to the element type
};

// with_add, affine: add, w and b given, or null (the kernels' defaults: add 0, w 1, b 0).
template <typename T, int V>
bool run(const Case& k, const Problem& p, const Reference& ref, bool with_add, bool affine, bool act) {
  gn::Limits lim;
  if (k.shrink) lim.max_tile = lim.max_tile_backward = 8, lim.split_tile = 16;
  const int64_t cg = k.c / k.g, numel = k.n * k.c * k.s;
  const unsigned threads = k.threads;
  std::vector<T> x(numel), dy(numel), y(numel, T(NAN)), dx(numel, T(NAN));
  for (int64_t i = 0; i < numel; ++i) x[i] = T(static_cast<float>(p.x[i])), dy[i] = T(static_cast<float>(p.dy[i]));
  std::vector<float> w(p.w.begin(), p.w.end()), b(p.b.begin(), p.b.end()), add(p.add.begin(), p.add.end());
  const gn::Params prm{affine ? w.data() : nullptr, affine ? b.data() : nullptr, with_add ? add.data() : nullptr, act};
  auto add_at = [&](int64_t i) { return with_add ? add[i] : 0.0f; };
  auto w_at = [&](int64_t c) { return affine ? w[c] : 1.0f; };
  std::vector<float> mean(k.n * k.g, NAN), rstd(k.n * k.g, NAN);

  // Forward.
  const gn::Geometry fg = gn::plan(k.c, k.s, k.g, sizeof(T), k.channels_last, false, lim);
  if (fg.fused == k.split || (V > 1 && !gn::packets_fit(fg, V))) {
    std::printf("plan: fused=%d, packets fit=%d: not the case asked for\n", fg.fused, gn::packets_fit(fg, V));
    return false;
  }
  const unsigned fgrid = static_cast<unsigned>(k.n * fg.col_tiles * fg.pos_tiles);
  const size_t fsmem = gn::tile_floats(fg) * sizeof(float);
  if (fg.fused) {
    emu::launch(gn::forward_fused_kernel<T, V>, fgrid, threads, fsmem, x.data(), fg, prm, static_cast<float>(k.eps),
                y.data(), mean.data(), rstd.data());
  } else {
    // The host's combination (csrc/group_norm_silu_combine.cpp, which has no
    // torch-free form: tested itself in test_group_norm_silu_combine.py), here
    // in double: Chan's parallel formula over the tile columns' moments.
    const int64_t per = k.n * k.c * fg.pos_tiles;
    std::vector<float> parts(3 * per, NAN);
    emu::launch(gn::moments_kernel<T, V>, fgrid, threads, fsmem, static_cast<const T*>(x.data()), fg, parts.data(),
                parts.data() + per, parts.data() + 2 * per);
    for (int64_t n = 0; n < k.n; ++n) {
      for (int64_t g = 0; g < k.g; ++g) {
        std::vector<double> col_mean, col_n;
        double sum = 0, m2 = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          for (int64_t t = 0; t < fg.pos_tiles; ++t) {
            const int64_t i = (n * k.c + c) * fg.pos_tiles + t;
            const double nt = static_cast<double>(std::min(fg.block_s, k.s - t * fg.block_s));
            const double d = parts[per + i];
            col_mean.push_back(parts[i] + d / nt + add_at(n * k.c + c));
            col_n.push_back(nt);
            sum += nt * col_mean.back();
            m2 += parts[2 * per + i] - d * d / nt;
          }
        }
        const double mu = sum / (cg * k.s);
        for (size_t j = 0; j < col_mean.size(); ++j) m2 += col_n[j] * (col_mean[j] - mu) * (col_mean[j] - mu);
        mean[n * k.g + g] = static_cast<float>(mu);
        // clamp_min(0) as torch has it: NaN stays NaN (std::max(0.0, NaN) is 0).
        rstd[n * k.g + g] = static_cast<float>(1 / std::sqrt(std::max(m2 / (cg * k.s), 0.0) + k.eps));
      }
    }
    emu::launch(gn::normalize_kernel<T, V>, fgrid, threads, 0, x.data(), fg, prm, static_cast<const float*>(mean.data()),
                static_cast<const float*>(rstd.data()), y.data());
  }

  // Backward, from the reference statistics.
  std::vector<float> rmean(ref.mean.begin(), ref.mean.end()), rrstd(ref.rstd.begin(), ref.rstd.end());
  std::vector<float> col_a(k.n * k.c, NAN), col_b(k.n * k.c, NAN), dadd(k.n * k.c, NAN);
  const gn::Geometry bg = gn::plan(k.c, k.s, k.g, sizeof(T), k.channels_last, true, lim);
  const unsigned bgrid = static_cast<unsigned>(k.n * bg.col_tiles * bg.pos_tiles);
  const size_t bsmem = 2 * gn::tile_floats(bg) * sizeof(float);
  const float* mp = rmean.data();
  const float* rp = rrstd.data();
  if (bg.fused) {
    emu::launch(gn::backward_fused_kernel<T, V>, bgrid, threads, bsmem, static_cast<const T*>(dy.data()),
                static_cast<const T*>(x.data()), bg, prm, mp, rp, dx.data(), col_a.data(), col_b.data(), dadd.data());
  } else {
    const int64_t per = k.n * k.c * bg.pos_tiles;
    std::vector<float> sums(3 * per, NAN), m1(k.n * k.g), m2(k.n * k.g);
    emu::launch(gn::backward_sums_kernel<T, V>, bgrid, threads, bsmem, static_cast<const T*>(dy.data()),
                static_cast<const T*>(x.data()), bg, prm, mp, rp, sums.data(), sums.data() + per,
                sums.data() + 2 * per);
    // The host's combination (csrc/group_norm_silu_combine.cpp; see the forward)
    // in float32, as torch does it there: the tiles' sums, then the groups' means of w*B and w*A.
    std::vector<float> xs(k.n * k.c, 0);
    for (int64_t nc = 0; nc < k.n * k.c; ++nc) {
      float sa = 0, sb = 0, sx = 0;
      for (int64_t t = 0; t < bg.pos_tiles; ++t)
        sa += sums[nc * bg.pos_tiles + t], sb += sums[per + nc * bg.pos_tiles + t], sx += sums[2 * per + nc * bg.pos_tiles + t];
      col_a[nc] = sa, col_b[nc] = sb, xs[nc] = sx;
    }
    for (int64_t n = 0; n < k.n; ++n) {
      for (int64_t g = 0; g < k.g; ++g) {
        float s1 = 0, s2 = 0;
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s1 += w_at(c) * col_b[n * k.c + c], s2 += w_at(c) * col_a[n * k.c + c];
        m1[n * k.g + g] = static_cast<float>(s1 / (cg * k.s)), m2[n * k.g + g] = static_cast<float>(s2 / (cg * k.s));
        for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
          dadd[n * k.c + c] = static_cast<float>(rrstd[n * k.g + g] * (w_at(c) * col_b[n * k.c + c] - k.s * m1[n * k.g + g] -
                                                                         xs[n * k.c + c] * m2[n * k.g + g]));
        }
      }
    }
    emu::launch(gn::backward_dx_kernel<T, V>, bgrid, threads, 0, static_cast<const T*>(dy.data()),
                static_cast<const T*>(x.data()), bg, prm, mp, rp, static_cast<const float*>(m1.data()),
                static_cast<const float*>(m2.data()), dx.data());
  }

  const double tol = k.bf16 ? 2e-2 : 2e-4;  // bf16 outputs are rounded to 8 bits
  // Far from the mean: the statistics and a float32 y within a few float32
  // roundings of float64 (float32's half ulp is 6e-8 of a value).
  const double stat_tol = k.far || k.offset ? 5e-7 : 1e-4, y_tol = k.offset ? 2e-2 : k.far && !k.bf16 ? 2e-6 : tol;
  if (k.far || k.offset) {
    std::printf("%s: rstd rel %.3g, mean rel %.3g, y rel %.3g\n", k.far ? "far" : "offset", worst(rstd, ref.rstd, 0, 1),
                worst(mean, ref.mean, 0, 1), worst(y, ref.y, 1, 1));
  }
  const double errs[] = {worst(y, ref.y, y_tol, y_tol),                 worst(mean, ref.mean, stat_tol, stat_tol),
                         worst(rstd, ref.rstd, stat_tol, stat_tol),     worst(dx, ref.dx, tol, tol),
                         worst(col_a, ref.a, 1e-3, 1e-3),   worst(col_b, ref.bsum, 1e-3, 1e-3),
                         worst(dadd, ref.dadd, 1e-3, 1e-3)};
  const char* names[] = {"y", "mean", "rstd", "dx", "A", "B", "dadd"};
  bool ok = true;
  for (int i = 0; i < 7; ++i) {
    const bool held = !k.offset || i < 3;  // offset: the forward's outputs only
    std::printf("%s %.3g%s\n", names[i], errs[i], !held ? "  (not held)" : errs[i] <= 1 ? "" : "  FAILED");
    ok = ok && (!held || errs[i] <= 1);
  }
  std::printf("plan: fused %d/%d, cols %lld, block_s %lld, tiles %lld x %lld, packets %d\n", fg.fused, bg.fused,
              static_cast<long long>(fg.cols), static_cast<long long>(fg.block_s), static_cast<long long>(fg.col_tiles),
              static_cast<long long>(fg.pos_tiles), V);
  return ok;
}

template <typename T>
bool dispatch(const Case& k, const Problem& p, const Reference& ref, bool with_add, bool affine, bool act) {
  constexpr int kWide = 16 / sizeof(T);
  return k.wide ? run<T, kWide>(k, p, ref, with_add, affine, act) : run<T, 1>(k, p, ref, with_add, affine, act);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc == 11 ? argv[10] : "";
  if (argc != 10 && !(argc == 11 && (mode == "far" || mode == "nonfinite" || mode == "eps" || mode == "offset"))) {
    std::fprintf(stderr, "usage: %s N C S G nchw|nhwc f32|bf16 fused|split|large wide|scalar THREADS [far|nonfinite|eps|offset]\n",
                 argv[0]);
    return 2;
  }
  const Case k{std::atoll(argv[1]), std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4]),
               std::string(argv[5]) == "nhwc", std::string(argv[6]) == "bf16", std::string(argv[7]) != "fused",
               std::string(argv[8]) == "wide", static_cast<unsigned>(std::atoi(argv[9])), std::string(argv[7]) == "split",
               mode == "far", mode == "nonfinite", mode == "eps" ? 0.25 : 1e-5, mode == "offset"};
  if (k.nonfinite && k.g < 6) {
    std::fprintf(stderr, "nonfinite needs G >= 6\n");
    return 2;
  }
  if (k.offset && k.bf16) {
    std::fprintf(stderr, "offset needs f32 (bfloat16 holds 3e4 to 128)\n");
    return 2;
  }
  std::mt19937 gen(7);
  std::normal_distribution<double> normal;
  const int64_t numel = k.n * k.c * k.s;
  Problem p;
  for (int64_t i = 0; i < numel; ++i) {
    // mean 3: the statistics must not cancel
    const double x = k.far ? normal(gen) : k.offset ? kOffset + normal(gen) : 2 * normal(gen) + 3, dy = normal(gen);
    p.x.push_back(k.bf16 ? rounded<emu::bf16>(x) : rounded<float>(x));
    p.dy.push_back(k.bf16 ? rounded<emu::bf16>(dy) : rounded<float>(dy));
  }
  if (k.far) {
    for (int64_t n = 0; n < k.n; ++n)
      for (int64_t g = 0; g < k.g; ++g) p.x[at(k, n, g * (k.c / k.g), 0)] = 1e3;
  }
  for (int64_t c = 0; c < k.c; ++c) p.w.push_back(rounded<float>(1 + normal(gen))), p.b.push_back(rounded<float>(normal(gen)));
  for (int64_t i = 0; i < k.n * k.c; ++i) p.add.push_back(rounded<float>(normal(gen)));
  if (k.nonfinite) poison(k, p.x, p.add);
  bool ok = true;
  // (add, affine, act): with both, then with neither (null pointers: the kernels'
  // defaults), as the cluster emulator's cases.
  const std::vector<double> none;
  for (const auto& [with_add, affine, act] : {std::tuple{true, true, true}, {true, true, false}, {false, false, true}}) {
    const Reference ref = reference(k, p.x, p.dy, with_add ? p.add : none, affine ? p.w : none, affine ? p.b : none, act);
    std::printf("add=%d affine=%d act=%d\n", with_add, affine, act);
    ok = (k.bf16 ? dispatch<emu::bf16>(k, p, ref, with_add, affine, act)
                 : dispatch<float>(k, p, ref, with_add, affine, act)) && ok;
  }
  return ok ? 0 : 1;
}
