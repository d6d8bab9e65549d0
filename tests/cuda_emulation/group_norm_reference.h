// What the GroupNorm+SiLU emulators (group_norm_silu_emulated.cpp,
// cluster_emulated.cpp) share: the float64 reference, the non-finite poison,
// the error measure. Templates over each emulator's Case, which has n, c, s, g,
// channels_last and eps.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace gn_reference {

template <class Case>
int64_t at(const Case& k, int64_t n, int64_t c, int64_t s) {
  return k.channels_last ? (n * k.s + s) * k.c + c : (n * k.c + c) * k.s + s;
}

template <typename T>
double rounded(double v) {
  return static_cast<float>(static_cast<T>(static_cast<float>(v)));
}

// Float64 reference: y, mean, rstd; dx, A, B, dadd (indexed as the kernels write them).
struct Reference {
  std::vector<double> y, mean, rstd, dx, a, bsum, dadd;  // dadd, A and B by (n, c)
};

// x and dy already rounded to the element type; add, w, b absent when empty.
template <class Case>
Reference reference(const Case& k, const std::vector<double>& x, const std::vector<double>& dy,
                    const std::vector<double>& add, const std::vector<double>& w, const std::vector<double>& b,
                    bool act) {
  const int64_t cg = k.c / k.g, m = cg * k.s;
  Reference r;
  r.y.resize(x.size()), r.dx.resize(x.size()), r.mean.resize(k.n * k.g), r.rstd.resize(k.n * k.g);
  r.a.assign(k.n * k.c, 0), r.bsum.assign(k.n * k.c, 0), r.dadd.assign(k.n * k.c, 0);
  auto wc = [&](int64_t c) { return w.empty() ? 1.0 : w[c]; };
  auto h = [&](int64_t n, int64_t c, int64_t s) { return x[at(k, n, c, s)] + (add.empty() ? 0.0 : add[n * k.c + c]); };
  for (int64_t n = 0; n < k.n; ++n) {
    for (int64_t g = 0; g < k.g; ++g) {
      double sum = 0, sq = 0;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c)
        for (int64_t s = 0; s < k.s; ++s) sum += h(n, c, s);
      const double mean = sum / m;
      for (int64_t c = g * cg; c < (g + 1) * cg; ++c)
        for (int64_t s = 0; s < k.s; ++s) sq += (h(n, c, s) - mean) * (h(n, c, s) - mean);
      const double rstd = 1.0 / std::sqrt(sq / m + k.eps);
      r.mean[n * k.g + g] = mean, r.rstd[n * k.g + g] = rstd;
      double s1 = 0, s2 = 0;
      std::vector<double> xhat(m), du(m);
      for (int64_t c = g * cg, i = 0; c < (g + 1) * cg; ++c) {
        for (int64_t s = 0; s < k.s; ++s, ++i) {
          xhat[i] = (h(n, c, s) - mean) * rstd;
          const double u = xhat[i] * wc(c) + (b.empty() ? 0.0 : b[c]), sg = 1 / (1 + std::exp(-u));
          r.y[at(k, n, c, s)] = act ? u * sg : u;
          du[i] = dy[at(k, n, c, s)] * (act ? sg * (1 + u * (1 - sg)) : 1.0);
          r.a[n * k.c + c] += du[i] * xhat[i];
          r.bsum[n * k.c + c] += du[i];
        }
        s1 += wc(c) * r.bsum[n * k.c + c];
        s2 += wc(c) * r.a[n * k.c + c];
      }
      for (int64_t c = g * cg, i = 0; c < (g + 1) * cg; ++c) {
        for (int64_t s = 0; s < k.s; ++s, ++i) {
          const double d = rstd * (du[i] * wc(c) - s1 / m - xhat[i] * s2 / m);
          r.dx[at(k, n, c, s)] = d;
          r.dadd[n * k.c + c] += d;
        }
      }
    }
  }
  return r;
}

// Non-finite values in groups 0-5 of each sample: +Inf, -Inf, +Inf and -Inf,
// NaN, +Inf in the add of the group's first channel, two +Inf. A single value
// lies at the group's first element (channel 0, position 0: the first position
// tile, or the cluster's first block) in even samples and at its last (last
// channel, position S - 1: the last tile or block) in odd ones; pairs take
// both, NaN the middle.
template <class Case>
void poison(const Case& k, std::vector<double>& x, std::vector<double>& add) {
  const int64_t cg = k.c / k.g;
  for (int64_t n = 0; n < k.n; ++n) {
    auto at_g = [&](int64_t g, int64_t j, int64_t s) -> double& { return x[at(k, n, g * cg + j, s)]; };
    auto first = [&](int64_t g) -> double& { return at_g(g, 0, 0); };
    auto last = [&](int64_t g) -> double& { return at_g(g, cg - 1, k.s - 1); };
    auto one = [&](int64_t g) -> double& { return n % 2 ? last(g) : first(g); };
    one(0) = INFINITY;
    one(1) = -INFINITY;
    first(2) = INFINITY, last(2) = -INFINITY;
    at_g(3, cg / 2, k.s / 2) = NAN;
    add[n * k.c + 4 * cg] = INFINITY;
    first(5) = INFINITY, last(5) = INFINITY;
  }
}

// Worst |got - want| / (atol + rtol * |want|) where want is finite; where it
// is NaN, +Inf or -Inf, got must be the same (else INFINITY). A non-finite got
// where want is finite (NaN: an unwritten output) counts as failed.
template <typename G>
double worst(const std::vector<G>& got, const std::vector<double>& want, double atol, double rtol) {
  double w = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = static_cast<float>(got[i]);
    if (!std::isfinite(want[i])) {
      if (!(std::isnan(want[i]) ? std::isnan(g) : g == want[i])) return INFINITY;
      continue;
    }
    if (!std::isfinite(g)) return INFINITY;
    w = std::max(w, std::abs(g - want[i]) / (atol + rtol * std::abs(want[i])));
  }
  return w;
}

}  // namespace gn_reference
