// Runs the CUDA kernels of fill_randn_, q_sample and ddpm_step_ under
// emulate.h against references written from their definitions (the noise
// from csrc/philox.h in double precision). Each case prints its worst error;
// the exit status is 0 when all hold. Used by tests/test_cuda_kernels_emulated.py.
//
//   elementwise_emulated randn|q_sample|ddpm_step
#include "emulate.h"
// clang-format off: the kernels need the emulation first
#include "../../csrc/cuda/ddpm_step_kernels.cuh"
#include "../../csrc/cuda/q_sample_kernels.cuh"
#include "../../csrc/cuda/randn_kernels.cuh"
// clang-format on

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>

using namespace ddpm_fast;

namespace {

constexpr uint64_t kSeed = 0x1234567887654321ull;
constexpr unsigned kGrid = 3, kThreadsPerBlock = 64;  // few threads: every kernel loops over its elements

double normal(uint64_t counter) {
  const PhiloxPair r = philox_pair(kSeed, counter);
  const double u1 = std::max<double>(kMinUniform, uint_to_uniform(r.x)), u2 = uint_to_uniform(r.y);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

// A tensor of N x C x H x W in memory order; `logical(p)` is the NCHW index of position p.
struct Shape {
  int64_t n, c, h, w;
  bool channels_last;
  int64_t numel() const { return n * c * h * w; }
  int64_t per_sample() const { return c * h * w; }
  int64_t logical(int64_t p) const {
    if (!channels_last) return p;
    const int64_t sample = p / per_sample(), q = p % per_sample(), hw = q / c, ch = q % c;
    return (sample * c + ch) * h * w + hw;
  }
  int64_t other(int64_t p) const {  // position of the same element in the other memory format
    const int64_t sample = p / per_sample(), q = p % per_sample();
    const int64_t inner = channels_last ? c : h * w, outer = channels_last ? h * w : c;
    return sample * per_sample() + (q % inner) * outer + q / inner;
  }
};

std::mt19937 gen(3);
std::vector<double> randoms(int64_t count) {
  std::normal_distribution<double> d;
  std::vector<double> v(count);
  for (auto& x : v) x = d(gen);
  return v;
}

template <typename T>
std::vector<T> as(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<T>(static_cast<float>(v[i]));
  return out;
}

template <typename T>
double value(T v) {
  return static_cast<float>(v);
}

// |got - want| / (tol * max(1, |want|)); NaN (+-Inf) where NaN (the same Inf) is wanted counts as 0, elsewhere as a failure.
template <typename T>
double error(T got, double want, double tol) {
  const double g = value(got);
  if (std::isnan(want)) return std::isnan(g) ? 0.0 : INFINITY;
  if (std::isinf(want)) return g == want ? 0.0 : INFINITY;
  if (!std::isfinite(g)) return INFINITY;
  return std::abs(g - want) / (tol * std::max(1.0, std::abs(want)));
}

template <typename T>
double tolerance() {
  return sizeof(T) == 4 ? 1e-5 : 1e-2;  // 16-bit outputs are rounded to 8 or 11 bits
}

bool report(const std::string& name, double worst) {
  std::printf("%-48s %.3g%s\n", name.c_str(), worst, worst <= 1 ? "" : "  FAILED");
  return worst <= 1;
}

template <typename T, int V>
bool randn_case(int64_t numel, int64_t per_sample, uint64_t sample_stride, uint64_t offset) {
  std::vector<T> out(numel, static_cast<T>(NAN));
  const RandnCounters c{offset, sample_stride, per_sample};
  emu::launch(cuda::fill_randn_kernel<T, V>, kGrid, kThreadsPerBlock, 0, out.data(), numel, kSeed, c);
  double worst = 0;
  for (int64_t i = 0; i < numel; ++i) {
    worst = std::max(worst, error(out[i], normal(offset + (i / per_sample) * sample_stride + i % per_sample),
                                  tolerance<T>()));
  }
  return report("randn " + std::to_string(sizeof(T) * 8) + "-bit V=" + std::to_string(V) + " numel " +
                    std::to_string(numel) + " stride " + std::to_string(sample_stride),
                worst);
}

bool randn_cases() {
  bool ok = true;
  ok &= randn_case<float, 4>(1001, 1001, 1001, 0);
  ok &= randn_case<float, 1>(3 * 77, 77, 100, 5);
  ok &= randn_case<emu::bf16, 8>(3 * 77, 77, 77, (1ull << 32) - 100);  // counters cross 2^32
  ok &= randn_case<emu::half, 8>(2 * 50, 50, 64, 7);
  ok &= randn_case<float, 4>(2 * 39, 39, 40, (5ull << 32) + 3);  // an offset past 2^32: its high word counts
  // The sampler's sample_stride, 2^32 (one 32-bit range a sample): sample n's
  // counters differ from sample 0's in the high word only. Counter 25045017
  // (sample 0, element 20) has u1 = 6.6e-8 < 1e-7: its normal is the clamp's,
  // sqrt(-2 log 1e-7) cos(2 pi u2), not sqrt(-2 log u1) cos(2 pi u2).
  ok &= randn_case<float, 4>(3 * 40, 40, 1ull << 32, 25045017 - 20);
  return ok;
}

// Timesteps per sample: one out of range (its sample must come out NaN) unless `valid`.
std::vector<int64_t> timesteps(int64_t n, int64_t steps, bool valid) {
  std::vector<int64_t> t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = (i * 7 + 3) % steps;
  if (!valid && n > 1) t[1] = steps;
  return t;
}

template <typename T, int V, bool kDraw>
bool q_sample_case(const Shape& s, bool per_sample_t) {
  const int64_t steps = 10, numel = s.numel();
  std::vector<float> sqrt_ab(steps), sqrt_1m_ab(steps);
  for (int64_t k = 0; k < steps; ++k) sqrt_ab[k] = std::sqrt(1.0f - 0.09f * k), sqrt_1m_ab[k] = std::sqrt(0.09f * k);
  const std::vector<int64_t> t = per_sample_t ? timesteps(s.n, steps, false) : std::vector<int64_t>{4};
  const std::vector<double> x0d = randoms(numel), noised = randoms(numel);
  const std::vector<T> x0 = as<T>(x0d), noise = as<T>(noised);
  std::vector<T> xt(numel, static_cast<T>(NAN)), eps(numel, static_cast<T>(NAN));
  const ElementLayout l{numel, s.per_sample(), s.channels_last ? s.c : 1, s.channels_last ? s.h * s.w : 1,
                        s.channels_last};
  emu::launch(cuda::q_sample_kernel<T, V, kDraw>, kGrid, kThreadsPerBlock, 0, static_cast<const T*>(x0.data()),
              static_cast<const T*>(kDraw ? nullptr : noise.data()), static_cast<const int64_t*>(t.data()),
              per_sample_t, static_cast<const float*>(sqrt_ab.data()), static_cast<const float*>(sqrt_1m_ab.data()),
              steps, xt.data(), kDraw ? eps.data() : nullptr, l, kSeed, uint64_t{11});
  double worst = 0;
  for (int64_t p = 0; p < numel; ++p) {
    const int64_t step = t[per_sample_t ? p / s.per_sample() : 0];
    const double z = kDraw ? normal(11 + s.logical(p)) : value(noise[p]);
    const double want =
        step >= steps ? NAN : sqrt_ab[step] * value(x0[p]) + static_cast<double>(sqrt_1m_ab[step]) * z;
    worst = std::max(worst, error(xt[p], want, tolerance<T>()));
    if (kDraw) worst = std::max(worst, error(eps[p], z, tolerance<T>()));
    // x_t is made from eps as returned (rounded to T), as the reference makes it:
    // exactly (the test builds this file with -ffp-contract=off).
    if (kDraw && step < steps) {
      const float from_eps = sqrt_ab[step] * static_cast<float>(x0[p]) + sqrt_1m_ab[step] * static_cast<float>(eps[p]);
      if (value(static_cast<T>(from_eps)) != value(xt[p])) worst = INFINITY;
    }
  }
  return report(std::string("q_sample ") + (kDraw ? "drawn" : "given") + (s.channels_last ? " NHWC " : " NCHW ") +
                    std::to_string(sizeof(T) * 8) + "-bit V=" + std::to_string(V) +
                    (per_sample_t ? " t per sample" : " one t"),
                worst);
}

bool q_sample_cases() {
  bool ok = true;
  for (bool cl : {false, true}) {
    const Shape odd{3, 5, 3, 7, cl}, even{2, 8, 4, 6, cl};
    ok &= q_sample_case<float, 4, true>(odd, true);
    ok &= q_sample_case<float, 1, true>(odd, false);
    ok &= q_sample_case<float, 4, false>(even, true);
    ok &= q_sample_case<emu::bf16, 8, true>(odd, true);
    ok &= q_sample_case<emu::half, 8, false>(odd, false);
  }
  return ok;
}

// model input: none, or float / bf16 / half in x's memory format or the other one.
// one_t >= 0: one timestep for all samples (per_sample_t false; t's later entries
// differ, so that a kernel reading t[n] is caught). poison: NaN in some eps
// (the clip keeps NaN) and +Inf in some given noise (ignored where sigma is 0).
template <typename X, typename E, bool kVectorized>
bool step_case(const Shape& s, bool clip, bool drawn, bool in_place, cuda::InputType mi_type, bool mi_other,
               int64_t one_t = -1, bool poison = false) {
  const int64_t steps = 6, numel = s.numel();
  std::vector<float> table(steps * kStepColumns);
  for (int64_t k = 0; k < steps; ++k) {
    float* row = table.data() + k * kStepColumns;
    row[kA] = 1.1f + 0.01f * k, row[kB] = -0.2f - 0.01f * k, row[kSqrtRecipAc] = 1.3f, row[kSqrtRecipm1Ac] = 0.5f;
    row[kC1] = 0.3f, row[kC2] = 0.8f;
    // No noise at t = 0; at t = 2 a sigma as small as a real schedule's first ones.
    row[kSigma] = k == 0 ? 0.0f : k == 2 ? 1e-3f : 0.1f * k;
  }
  const bool per_sample_t = one_t < 0;
  std::vector<int64_t> t = timesteps(s.n, steps, false);
  if (!per_sample_t) {
    for (auto& v : t) v = (one_t + 1) % steps;
    t[0] = one_t;
  }
  std::vector<double> xd = randoms(numel), ed = randoms(numel), nd = randoms(numel);
  if (poison) {
    for (int64_t p = 0; p < numel; p += 7) ed[p] = NAN;
    for (int64_t p = 3; p < numel; p += 11) nd[p] = INFINITY;
  }
  std::vector<X> x = as<X>(xd), noise = as<X>(nd), out(numel, static_cast<X>(NAN));
  const std::vector<E> eps = as<E>(ed);
  const std::vector<X> x_in = x;
  std::vector<float> mi_f(numel, NAN);
  std::vector<emu::bf16> mi_b(numel, emu::bf16(NAN));
  std::vector<emu::half> mi_h(numel, emu::half(NAN));
  void* mi = mi_type == cuda::InputType::kFloat ? static_cast<void*>(mi_f.data())
             : mi_type == cuda::InputType::kBFloat16 ? static_cast<void*>(mi_b.data())
             : mi_type == cuda::InputType::kHalf ? static_cast<void*>(mi_h.data()) : nullptr;
  StepLayout l{numel, s.per_sample(), s.channels_last ? s.c : s.h * s.w, s.channels_last ? s.h * s.w : s.c,
               s.channels_last, mi_other};
  // sample_stride 2^32 + 1000: the sampler's 2^32 (sample n's counters differ in
  // their high word) and a low part.
  const uint64_t offset = 5, sample_stride = (1ull << 32) + 1000, step_stride = 100000;
  X* dst = in_place ? x.data() : out.data();
  emu::launch(cuda::ddpm_step_kernel<X, E, kVectorized, emu::half, emu::bf16>, kGrid, kThreadsPerBlock, 0,
              static_cast<const X*>(x.data()), static_cast<const E*>(eps.data()), static_cast<const int64_t*>(t.data()),
              per_sample_t, static_cast<const float*>(table.data()), steps, static_cast<const X*>(drawn ? nullptr : noise.data()),
              kSeed, offset, sample_stride, step_stride, clip, l, dst, mi, mi_type);
  double worst = 0;
  for (int64_t p = 0; p < numel; ++p) {
    const int64_t n = p / s.per_sample(), step = t[per_sample_t ? n : 0];
    double want = NAN;
    if (step < steps) {
      const float* row = table.data() + step * kStepColumns;
      const double xv = value(x_in[p]), ev = value(eps[p]);
      want = clip ? row[kC1] * std::clamp(row[kSqrtRecipAc] * xv - row[kSqrtRecipm1Ac] * ev, -1.0, 1.0) + row[kC2] * xv
                  : row[kA] * xv + row[kB] * ev;
      const double z = drawn ? normal(offset + n * sample_stride + step * step_stride + (s.logical(p) - n * s.per_sample()))
                             : value(noise[p]);
      if (row[kSigma] != 0.0f) want += row[kSigma] * z;  // no noise at sigma 0, whatever z is
    }
    worst = std::max(worst, error(dst[p], want, tolerance<X>()));
    const int64_t at = mi_other ? s.other(p) : p;
    if (mi_type == cuda::InputType::kFloat) worst = std::max(worst, error(mi_f[at], want, 1e-5));
    if (mi_type == cuda::InputType::kBFloat16) worst = std::max(worst, error(mi_b[at], want, 1e-2));
    if (mi_type == cuda::InputType::kHalf) worst = std::max(worst, error(mi_h[at], want, 1e-3));
  }
  return report(std::string("ddpm_step") + (s.channels_last ? " NHWC" : " NCHW") + (clip ? " clip" : "") +
                    (drawn ? " drawn" : " given") + (in_place ? " in place" : "") + " mi " +
                    std::to_string(static_cast<int>(mi_type)) + (mi_other ? " other" : "") +
                    (kVectorized ? " packets" : "") + (per_sample_t ? "" : " one t " + std::to_string(one_t)) +
                    (poison ? " poison" : ""),
                worst);
}

bool ddpm_step_cases() {
  bool ok = true;
  using cuda::InputType;
  for (bool cl : {false, true}) {
    const Shape odd{3, 5, 3, 7, cl}, even{2, 4, 4, 6, cl};
    ok &= step_case<float, float, true>(even, false, true, false, InputType::kNone, false);
    ok &= step_case<float, float, false>(odd, true, true, true, InputType::kFloat, false);
    ok &= step_case<float, emu::bf16, true>(odd, false, false, false, InputType::kBFloat16, true);
    ok &= step_case<emu::bf16, float, true>(even, true, true, true, InputType::kFloat, true);
    ok &= step_case<emu::half, emu::half, false>(odd, false, true, false, InputType::kNone, false);
    // One timestep for all samples: t = 0 (sigma 0: the given noise, +Inf in places,
    // is not added), and t = 2 drawn; NaN in eps kept by the clip; a half model input.
    ok &= step_case<float, float, true>(odd, true, false, false, InputType::kHalf, true, 0, true);
    ok &= step_case<float, float, false>(odd, true, false, false, InputType::kHalf, false, 2, true);
    ok &= step_case<float, float, true>(even, false, true, false, InputType::kFloat, false, 2, false);
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string op = argc == 2 ? argv[1] : "";
  if (op == "randn") return randn_cases() ? 0 : 1;
  if (op == "q_sample") return q_sample_cases() ? 0 : 1;
  if (op == "ddpm_step") return ddpm_step_cases() ? 0 : 1;
  std::fprintf(stderr, "usage: %s randn|q_sample|ddpm_step\n", argv[0]);
  return 2;
}
