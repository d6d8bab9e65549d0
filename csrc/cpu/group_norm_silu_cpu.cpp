// GroupNorm+SiLU forward on the CPU (math in csrc/group_norm_silu.h; the
// backward is in group_norm_silu_backward_cpu.cpp).
// float, half and bfloat16 input (16-bit values converted to float and back in
// the row loops' registers): statistics in double from float partial
// sums; NCHW tasks are (sample, group) blocks, in batches of consecutive
// blocks read a second time while in cache, the next batch prefetched
// meanwhile; channels_last samples are read
// twice, in one task where they fit in L2; SiLU in AVX-512 or AVX2 + FMA where
// the CPU has them (portable loops otherwise, or with DDPM_FAST_CPU_SIMD=none).
// double input (gradcheck) runs element by element in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf
#endif

#include "../group_norm_silu.h"
#include "group_norm_silu_cpu_common.h"
#include "group_norm_silu_rows.h"

namespace ddpm_fast {
namespace {

template <typename T, typename S>
void forward(const T* x, const NormLayout& l, const Params& p, double eps, bool act, T* y, S* mean_out,
             S* rstd_out) {
  const int64_t cg = l.c / l.groups;
  const double count = static_cast<double>(cg * l.hw);
  parallel_tasks(l.n * l.groups, cg * l.hw, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / l.groups, c0 = (ng % l.groups) * cg;
      double sum = 0.0, sumsq = 0.0;
      for (int64_t c = c0; c < c0 + cg; ++c) {
        const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
        for (int64_t s = 0; s < l.hw; ++s) {
          const double h = static_cast<double>(x[at_index(l, n, c, s)]) + a;
          sum += h;
          sumsq += h * h;
        }
      }
      const double mean = sum / count;
      const double var = std::max(sumsq / count - mean * mean, 0.0);
      const double rstd = 1.0 / std::sqrt(var + eps);
      mean_out[ng] = static_cast<S>(mean);
      rstd_out[ng] = static_cast<S>(rstd);
      for (int64_t c = c0; c < c0 + cg; ++c) {
        const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
        const double scale = rstd * p.w[c];
        const double shift = p.b[c] + (a - mean) * scale;
        for (int64_t s = 0; s < l.hw; ++s) {
          const int64_t i = at_index(l, n, c, s);
          const double u = static_cast<double>(x[i]) * scale + shift;
          y[i] = static_cast<T>(act ? u * sigmoid(u) : u);
        }
      }
    }
  });
}

// The shift of float moment sums: `about` (a value of the row: its first,
// or for channels_last the mean of a channel's first pixels), or 0 when that
// is not finite (the sums then carry the NaN or Inf as unshifted ones would).
inline float moment_shift(float about) { return std::isfinite(about) ? about : 0.0f; }

// Float sums s of x - shift and q of its squares over m values lose
// accuracy to cancellation in q - s^2/m (the variance) by the factor
// q / (q - s^2/m) = 1 + ((mean - shift) / spread)^2: harmless while the shift
// lies near the values, ruinous when it is an outlier (with each channel's
// first value 30 to 1e4 spreads off N(0, 1) data, rstd was off by up to 1e-3;
// now by at most 5e-7, tests/test_group_norm_silu_cpu.py). A row whose sums
// lost more than this factor is summed again about its mean (N(0, 1) data
// shifted by one of its values: 0.8% of rows); channels_last parts, shifted
// by a mean of 4 values, are held to half of it (see kShiftPixels).
constexpr double kMaxCancellation = 8.0;

// Whether sums s, q of m > 0 values cancelled past `limit` (false for NaN
// sums).
inline bool cancelled(double s, double q, double m, double limit) { return q * m > limit * (q * m - s * s); }

// A better shift for sums s, q of m values taken about `shift`, when they
// cancelled past `limit`: their mean in float. Nothing (false) for non-finite
// sums, which carry their NaN or Inf as they are.
inline bool better_shift(double s, double q, double m, float shift, float* next, double limit = kMaxCancellation) {
  if (!cancelled(s, q, m, limit)) return false;
  const float mean = static_cast<float>(static_cast<double>(shift) + s / m);
  if (!std::isfinite(mean) || mean == shift) return false;
  *next = mean;
  return true;
}

// Moments of a row (an (n, c) row, or a whole NCHW block) about `shift`: the
// sums of (x - shift) and of its squares, in float chunk by chunk (kChunk),
// added in double.
template <typename T>
void row_moments_about(const T* row, int64_t count, float shift, double* sum, double* sumsq) {
  *sum = *sumsq = 0.0;
  for (int64_t s0 = 0; s0 < count; s0 += kChunk)
    row_moments(row + s0, std::min(kChunk, count - s0), shift, sum, sumsq);
}

// Shifted moments of a row: about moment_shift of its first value, and again
// about their mean where those cancelled (better_shift). Writes the shift.
template <typename T>
void shifted_row_moments(const T* row, int64_t count, double* shift, double* sum, double* sumsq) {
  float o = moment_shift(static_cast<float>(row[0]));
  row_moments_about(row, count, o, sum, sumsq);
  if (better_shift(*sum, *sumsq, static_cast<double>(count), o, &o)) row_moments_about(row, count, o, sum, sumsq);
  *shift = o;
}

// The same over an NCHW block of `rows` short rows (lanes.count values each),
// of x + add[k] in row k (add padded by kChannelPad), in pieces of whole rows.
template <typename T>
void block_moments_add_about(const T* block, const float* add, int64_t rows, const RowLanes& lanes, float shift,
                             double* sum, double* sumsq) {
  *sum = *sumsq = 0.0;
  const int64_t per_piece = kChunk / lanes.count;
  for (int64_t k = 0; k < rows; k += per_piece) {
    const int64_t piece_rows = std::min(per_piece, rows - k);
    block_moments_add(block + k * lanes.count, add + k, piece_rows, lanes, shift, sum, sumsq);
  }
}

template <typename T>
void shifted_block_moments_add(const T* block, const float* add, int64_t rows, const RowLanes& lanes, double* shift,
                               double* sum, double* sumsq) {
  float o = moment_shift(static_cast<float>(block[0]) + add[0]);
  block_moments_add_about(block, add, rows, lanes, o, sum, sumsq);
  if (better_shift(*sum, *sumsq, static_cast<double>(rows * lanes.count), o, &o))
    block_moments_add_about(block, add, rows, lanes, o, sum, sumsq);
  *shift = o;
}

// y = act(x * scale + shift) over `rows` consecutive rows of `count` values
// (affine_act_row's arguments), prefetching as many values from `ahead`
// meanwhile (unless null).
template <typename T>
void affine_act(const T* x, int64_t count, int64_t rows, const float* scale, const float* shift, int64_t step,
                bool act, T* y, const T* ahead = nullptr) {
  affine_act_row(x, scale, shift, step, count, rows, act, y, Prefetch{reinterpret_cast<const char*>(ahead), sizeof(T)});
}

// Group statistics of h = x + add from the moments of x - o_k over `parts`
// equal parts of the group's values (its cg channels, or the whole group as
// one part), in double: with d = o_k (+ add of channel k, unless
// `add_in_sums`: the sums were of x + add - o_k), sum h = S1 + m d and
// sum h^2 = S2 + 2 d S1 + m d^2 over a part's m values. Writes mean and rstd,
// and each channel's float scale and shift (y = act(x scale + shift)).
void group_affine(const Params& p, int64_t n, int64_t c0, int64_t cg, int64_t c_total, int64_t hw, int64_t parts,
                  bool add_in_sums, const double* o, const double* s1, const double* s2, double eps, float* mean_out,
                  float* rstd_out, float* scale, float* shift) {
  const double m = static_cast<double>(cg * hw / parts);
  double s = 0.0, q = 0.0;
  for (int64_t k = 0; k < parts; ++k) {
    const double d = o[k] + (p.add.empty() || add_in_sums ? 0.0 : p.add[n * c_total + c0 + k]);
    s += s1[k] + m * d;
    q += s2[k] + 2.0 * d * s1[k] + m * d * d;
  }
  const double count = static_cast<double>(cg * hw);
  const double mean = s / count;
  const double rstd = 1.0 / std::sqrt(std::max(q / count - mean * mean, 0.0) + eps);
  *mean_out = static_cast<float>(mean);
  *rstd_out = static_cast<float>(rstd);
  for (int64_t k = 0; k < cg; ++k) {
    const double a = p.add.empty() ? 0.0 : p.add[n * c_total + c0 + k];
    scale[k] = static_cast<float>(rstd * p.w[c0 + k]);
    shift[k] = static_cast<float>(p.b[c0 + k] + (a - mean) * rstd * p.w[c0 + k]);
  }
}

// The L2 cache of a core, in bytes (sysconf; 256 KiB where it says nothing,
// the smallest of x86 CPUs since 2008).
int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return static_cast<int64_t>(reported);
#endif
    return int64_t{256} * 1024;
  }();
  return bytes;
}

// While computing one task's output (an NCHW batch of blocks) the loops
// prefetch the next one's input into L2, when that input is at most this share
// of L2 (the two inputs and outputs then fill it; channels_last samples, see
// forward_channels_last, prefetch up to L2's size). Without it each task's
// first pass (its moments) waits on memory: on the AVX-512 VM (2026-12-01,
// 32x128x32x32 fp32, 16 KiB NCHW blocks) that pass took 20% of the samples,
// and the op ran 1.15-1.25x longer (measured alternating the two in one
// process). Prefetching the next block's output lines as well gained 1%
// there, and is not done.
constexpr int64_t kPrefetchShare = 4;

// The float path (float, half, bfloat16 input), NCHW: tasks are (sample,
// group) blocks, whose channels are cg contiguous rows, in batches of
// consecutive blocks (kBatchBytes; consecutive blocks are consecutive in
// memory): their moments, the groups' statistics, then the output rows, read
// again while the batch is still in cache (and the next batch prefetched
// meanwhile); short rows (kShortRow) as one row of vectors over the whole
// batch.
template <typename T>
void forward_nchw(const T* x, const NormLayout& l, const Params& p, double eps, bool act, T* y, float* mean_out,
                  float* rstd_out) {
  const int64_t cg = l.c / l.groups, block_values = cg * l.hw;
  const int64_t block_bytes = block_values * static_cast<int64_t>(sizeof(T));
  const int64_t batch = blocks_per_batch(block_bytes);
  parallel_tasks(l.n * l.groups, block_values, [&](int64_t begin, int64_t end) {
    const bool short_rows = l.hw < kShortRow;
    const RowLanes lanes(short_rows ? l.hw : 0);
    const bool prefetch_next = batch * block_bytes <= l2_cache_bytes() / kPrefetchShare;
    // The moments of a whole block: one call, not cg (the U-Net's 8x8 and
    // 4x4 maps have blocks of 128-512 values, where each call's fixed costs
    // weigh). With add, only for short rows, where the add goes in per value;
    // else one row per channel, its add applied after (in group_affine).
    const bool block_add = !p.add.empty() && short_rows;
    const int64_t parts = p.add.empty() || short_rows ? 1 : cg;
    const int64_t part = block_values / parts;
    std::vector<double> o(batch * parts), s1(batch * parts), s2(batch * parts);
    std::vector<float> scale(batch * cg + kChannelPad), shift(batch * cg + kChannelPad);
    std::vector<float> row_add(block_add ? cg + kChannelPad : 0);
    for_each_batch(begin, end, batch, [&](int64_t ng0, int64_t blocks) {
      const T* in = x + ng0 * block_values;
      T* out = y + ng0 * block_values;
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t ng = ng0 + j, n = ng / l.groups, c0 = (ng % l.groups) * cg;
        const T* block = in + j * block_values;
        double *bo = &o[j * parts], *bs1 = &s1[j * parts], *bs2 = &s2[j * parts];
        if (block_add) {
          for (int64_t k = 0; k < cg; ++k) row_add[k] = static_cast<float>(p.add[n * l.c + c0 + k]);
          shifted_block_moments_add(block, row_add.data(), cg, lanes, bo, bs1, bs2);
        } else {
          for (int64_t k = 0; k < parts; ++k) shifted_row_moments(block + k * part, part, &bo[k], &bs1[k], &bs2[k]);
        }
      }
      for (int64_t j = 0; j < blocks; ++j) {
        const int64_t ng = ng0 + j;
        group_affine(p, ng / l.groups, (ng % l.groups) * cg, cg, l.c, l.hw, parts, block_add, &o[j * parts],
                     &s1[j * parts], &s2[j * parts], eps, mean_out + ng, rstd_out + ng, &scale[j * cg],
                     &shift[j * cg]);
      }
      if (short_rows) {
        affine_act_channels(in, scale.data(), shift.data(), blocks * cg, lanes, act, out);
      } else {
        // The next batch's row k while computing row k.
        const int64_t next_rows = prefetch_next ? std::min(blocks, end - ng0 - blocks) * cg : 0;
        for (int64_t k = 0; k < blocks * cg; ++k)
          affine_act(in + k * l.hw, l.hw, 1, &scale[k], &shift[k], 0, act, out + k * l.hw,
                     k < next_rows ? in + (blocks * cg + k) * l.hw : nullptr);
      }
    });
  });
}

// The float path, channels_last: per-channel moments of each sample (float
// sums of x - o_c, o_c the mean of the channel's values at the sample's first
// kShiftPixels pixels, or 0 where that is not finite, flushed to double every
// kPixelChunk pixels), its groups' statistics, then the affine+SiLU pass over
// pixel rows of C values.
template <typename T>
void forward_channels_last(const T* x, const NormLayout& l, const Params& p, double eps, bool act, T* y,
                           float* mean_out, float* rstd_out) {
  constexpr int64_t kPixelChunk = 256;
  // A channel is summed again where its sums cancelled past
  // kPartCancellation (see part_moments). Shifted by one value, N(0, 1) data
  // would set that off in 8% of channels; shifted by the mean of 4, in 0.05%.
  // (The limit is half the rows': an outlier among the 4 moves their mean
  // only part of the way.)
  constexpr int64_t kShiftPixels = 4;
  constexpr double kPartCancellation = kMaxCancellation / 2;
  // The moments pass runs in parts of this many pixels (their double sums
  // added in part order, so that the result does not depend on the thread
  // count), so that a batch of fewer samples than threads keeps them all busy.
  constexpr int64_t kPartPixels = 4096;
  const int64_t cg = l.c / l.groups, sample = l.hw * l.c, c = l.c;
  const int64_t parts = (l.hw + kPartPixels - 1) / kPartPixels;
  std::vector<float> offset(l.n * c), scale(l.n * c), shift(l.n * c);
  struct Scratch {  // per task
    std::vector<float> s1, s2;
    std::vector<double> o, sums;
  };
  auto scratch = [&] {
    return Scratch{std::vector<float>(c), std::vector<float>(c), std::vector<double>(c), std::vector<double>(2 * c)};
  };
  auto sample_offsets = [&](int64_t n) {
    float* o = offset.data() + n * c;
    const int64_t pixels = std::min(kShiftPixels, l.hw);
    const float share = 1.0f / static_cast<float>(pixels);  // any shift near the values will do
    std::fill(o, o + c, 0.0f);
    for (int64_t q = 0; q < pixels; ++q)
      for (int64_t k = 0; k < c; ++k) o[k] += static_cast<float>(x[n * sample + q * c + k]) * share;
    for (int64_t k = 0; k < c; ++k) o[k] = moment_shift(o[k]);
  };
  // Sum and sum of squares of x - o_c over part `part` of sample n, into
  // sums[0, c) and sums[c, 2c): float sums over chunks of kPixelChunk pixels,
  // added in double. A channel whose sums cancelled (better_shift) is summed
  // again about its mean `at` and moved to be about o (in double: with
  // d = at - o, sum (x - o) = S1 + m d, sum (x - o)^2 = S2 + 2 d S1 + m d^2).
  auto part_moments = [&](int64_t n, int64_t part, Scratch& t, double* sums) {
    const float* o = offset.data() + n * c;
    const int64_t begin = part * kPartPixels, end = std::min(l.hw, begin + kPartPixels);
    std::fill(sums, sums + 2 * c, 0.0);
    for (int64_t s0 = begin; s0 < end; s0 += kPixelChunk) {
      std::fill(t.s1.begin(), t.s1.end(), 0.0f);
      std::fill(t.s2.begin(), t.s2.end(), 0.0f);
      pixel_moments(x + n * sample + s0 * c, o, c, std::min(kPixelChunk, end - s0), t.s1.data(), t.s2.data());
      for (int64_t k = 0; k < c; ++k) {
        sums[k] += t.s1[k];
        sums[c + k] += t.s2[k];
      }
    }
    const double m = static_cast<double>(end - begin);
    bool any = false;  // a branch-free test first: it is rarely true
    for (int64_t k = 0; k < c; ++k) any |= cancelled(sums[k], sums[c + k], m, kPartCancellation);
    if (!any) return;
    // The channels whose sums cancelled, alone, again (a whole second pass for
    // one channel cost trained U-Net activations 3-10%), in double over their
    // strided values: few enough that their speed does not matter.
    for (int64_t k = 0; k < c; ++k) {
      float at;
      if (!better_shift(sums[k], sums[c + k], m, o[k], &at, kPartCancellation)) continue;
      const T* column = x + n * sample + begin * c + k;
      double a1[4] = {}, a2[4] = {};  // four chains: one add's latency per value would bound the loop
      for (int64_t q = 0; q < end - begin; ++q) {
        const double v = static_cast<double>(static_cast<float>(column[q * c])) - at;
        a1[q & 3] += v;
        a2[q & 3] += v * v;
      }
      const double s1 = (a1[0] + a1[1]) + (a1[2] + a1[3]), s2 = (a2[0] + a2[1]) + (a2[2] + a2[3]);
      const double d = static_cast<double>(at) - o[k];
      sums[k] = s1 + m * d;
      sums[c + k] = s2 + 2.0 * d * s1 + m * d * d;
    }
  };
  // Sample n's statistics and coefficients from its parts' sums.
  auto sample_coefficients = [&](int64_t n, const double* part_sums, Scratch& t) {
    std::fill(t.sums.begin(), t.sums.end(), 0.0);
    for (int64_t part = 0; part < parts; ++part)
      for (int64_t k = 0; k < 2 * c; ++k) t.sums[k] += part_sums[part * 2 * c + k];
    for (int64_t k = 0; k < c; ++k) t.o[k] = offset[n * c + k];
    for (int64_t g = 0; g < l.groups; ++g) {
      const int64_t c0 = g * cg;
      group_affine(p, n, c0, cg, c, l.hw, cg, false, t.o.data() + c0, t.sums.data() + c0, t.sums.data() + c + c0, eps,
                   mean_out + n * l.groups + g, rstd_out + n * l.groups + g, scale.data() + n * c + c0,
                   shift.data() + n * c + c0);
    }
  };
  // Pixel rows [begin, end) (rows n * hw + s), those of one sample to a call.
  auto output_rows = [&](int64_t begin, int64_t end, const T* ahead) {
    for (int64_t r = begin; r < end;) {
      const int64_t n = r / l.hw, rows = std::min(end, (n + 1) * l.hw) - r;
      affine_act(x + r * c, c, rows, scale.data() + n * c, shift.data() + n * c, 1, act, y + r * c, ahead);
      r += rows;
    }
  };
  // Samples that fit in L2 are written in the task that read them, from L2
  // (most of it), while the next sample is prefetched, when there are samples
  // enough to share among the threads; otherwise each step is a parallel pass
  // of its own. On the AVX-512 VM (2 MiB L2, 32x128x32x32 fp32, 512 KiB
  // samples) the first ran 1.10-1.13x faster (alternated in one process:
  // 1.04-1.05 from writing in the same task, 1.06-1.08 more from the
  // prefetch). On the AMD AVX2 VM (512 KiB L2, the same shape; 2026-12-03),
  // where that sample is L2's size, not a quarter of it as there:
  // 2.19-2.41 ms in the task against 2.51-3.00 in passes, and 2.40-2.51 in the
  // task without the prefetch.
  const bool in_task = sample * static_cast<int64_t>(sizeof(T)) <= l2_cache_bytes() &&
                       l.n >= 2 * static_cast<int64_t>(at::get_num_threads());
  if (in_task) {
    parallel_tasks(l.n, sample, [&](int64_t begin, int64_t end) {
      Scratch t = scratch();
      std::vector<double> part_sums(parts * 2 * c);
      for (int64_t n = begin; n < end; ++n) {
        sample_offsets(n);
        for (int64_t part = 0; part < parts; ++part) part_moments(n, part, t, part_sums.data() + part * 2 * c);
        sample_coefficients(n, part_sums.data(), t);
        output_rows(n * l.hw, (n + 1) * l.hw, n + 1 < end ? x + (n + 1) * sample : nullptr);
      }
    });
    return;
  }
  std::vector<double> part_sums(l.n * parts * 2 * c);
  parallel_tasks(l.n, c, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) sample_offsets(n);
  });
  parallel_tasks(l.n * parts, sample / parts, [&](int64_t begin, int64_t end) {
    Scratch t = scratch();
    for (int64_t i = begin; i < end; ++i) part_moments(i / parts, i % parts, t, part_sums.data() + i * 2 * c);
  });
  parallel_tasks(l.n, c, [&](int64_t begin, int64_t end) {
    Scratch t = scratch();
    for (int64_t n = begin; n < end; ++n) sample_coefficients(n, part_sums.data() + n * parts * 2 * c, t);
  });
  parallel_tasks(l.n * l.hw, c, [&](int64_t begin, int64_t end) { output_rows(begin, end, nullptr); });
}

// The float path (float, half, bfloat16 input).
template <typename T>
void forward_float(const T* x, const NormLayout& l, const Params& p, double eps, bool act, T* y, float* mean_out,
                   float* rstd_out) {
  (l.channels_last ? forward_channels_last<T> : forward_nchw<T>)(x, l, p, eps, act, y, mean_out, rstd_out);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  const std::optional<at::Tensor>& add,
                                                                  int64_t num_groups, double eps, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = group_norm_outputs(x, l);
  if (x.numel() == 0) return {y, mean, rstd};
  const Params p = read_params(l, weight, bias, add);
  if (x.scalar_type() == at::kDouble) {  // gradcheck precision: all in double
    forward(x.const_data_ptr<double>(), l, p, eps, act, y.mutable_data_ptr<double>(), mean.mutable_data_ptr<double>(),
            rstd.mutable_data_ptr<double>());
  } else {
    DDPM_DISPATCH_FLOAT_TYPES(x.scalar_type(), "group_norm_silu_cpu", [&] {
      forward_float(x.const_data_ptr<scalar_t>(), l, p, eps, act, y.mutable_data_ptr<scalar_t>(),
                    mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>());
    });
  }
  return {y, mean, rstd};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
}

}  // namespace ddpm_fast
