// GroupNorm+SiLU backward on the CPU (math in csrc/group_norm_silu.h).
// float, half and bfloat16 input run in float by rows (NCHW) or pixel rows
// (channels_last), 16-bit values converted to float and back in the row loops,
// SiLU's gradient in AVX-512 or AVX2 + FMA where the CPU has them; double input
// (gradcheck) runs element by element in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "../group_norm_silu.h"
#include "group_norm_silu_cpu_common.h"
#include "group_norm_silu_rows.h"

namespace ddpm_fast {
namespace {

// dL/du from dL/dy at pre-activation u.
inline double grad_u(double dy, double u, bool act) {
  if (!act) return dy;
  const double s = sigmoid(u);
  return dy * s * (1.0 + u * (1.0 - s));
}

// The group means m1 = sum_k w_k B_k / count and m2 = sum_k w_k A_k / count
// over the channels k of one group of one sample (row offset nc0).
inline std::pair<double, double> group_means(const Params& p, const std::vector<double>& A,
                                             const std::vector<double>& B, int64_t nc0, int64_t c0, int64_t cg,
                                             double count) {
  double s1 = 0.0, s2 = 0.0;
  for (int64_t k = c0; k < c0 + cg; ++k) {
    s1 += p.w[k] * B[nc0 + k];
    s2 += p.w[k] * A[nc0 + k];
  }
  return {s1 / count, s2 / count};
}

// Row nc's shift in float: its add (if any) minus its group's mean, so that
// xhat = (x + shift) * rstd. Every float path computes it this one way.
inline float row_shift(const Params& p, int64_t nc, float group_mean) {
  return static_cast<float>((p.add.empty() ? 0.0 : p.add[nc]) - static_cast<double>(group_mean));
}

// Row nc's add gradient r (w_c B - hw m1 - X m2), from its pass-1 sums B
// and X (channel c, its group's rstd r and means m1, m2).
inline double add_gradient(const Params& p, int64_t c, float r, double b_sum, double x_sum, int64_t hw, double m1,
                           double m2) {
  return static_cast<double>(r) * (p.w[c] * b_sum - static_cast<double>(hw) * m1 - x_sum * m2);
}

// f(du) with pass 2's du, of the row or rows that `stored` and `dy` point to:
// pass 1's stored du (float) with act, else dy itself.
template <typename T, typename F>
void with_du(bool act, const float* stored, const T* dy, F f) {
  if (act) {
    f(stored);
  } else {
    f(dy);
  }
}

// v as floats.
std::vector<float> floats_of(const std::vector<double>& v) {
  std::vector<float> out(v.size());
  std::copy(v.begin(), v.end(), out.begin());
  return out;
}

// NCHW rows of at most this many values go through the backward's passes a
// (sample, group) block at a time (silu_grad_block, backward_block_dx), as
// the forward's short rows do (kShortRow). On the AVX-512 VM (2026-12-01,
// alternated in one process, 32 groups): 1.2-1.6x faster at 4x4 and 2x2 maps
// (bfloat16 1.5-1.7x, when 16-bit rows still went through float buffers),
// 1.1-1.2x at 5x5 to 7x7, 1.0-1.1x at 8x8, 0.9-1.0x at 9x9 to 11x11 (whose
// rows stay rows); same bits.
constexpr int64_t kBlockRowsBackward = 64;

// The backward of float, half and bfloat16 NCHW input, row by row in
// vectorized float (double input takes backward_double below), tasks of
// (sample, group) blocks in batches (kBatchBytes): pass 1 over the batch's
// rows, its groups' means, then pass 2 over the same rows while they are
// still in cache. Each pass over the whole tensor, as before, read x, dy and
// the stored du back from memory:
// 1.16-1.44x longer (32x128x32x32, 32x256x16x16, 128x256x8x8, 2x128x128x128
// on the AVX-512 VM, alternated in one process; prefetching the next block's
// x and dy rows during pass 2 made it slower). With fewer blocks than
// threads the passes still run over the whole tensor, one row to a task.
// Short rows (see kBlockRowsBackward) run each pass a block at a time, the
// SiLU gradient over the whole batch.
template <typename T>
void backward_rows_nchw(const T* dy, const T* x, const NormLayout& l, const Params& p, const float* mean,
                        const float* rstd, bool act, T* dx, std::vector<double>& A, std::vector<double>& B,
                        std::vector<double>& dadd) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t cg = l.c / l.groups;
  const double count = static_cast<double>(cg * l.hw);
  std::vector<double> X(l.n * l.c);
  // Pass 1's du, read by pass 2 with act: in dx for float, else in floats of
  // its own (not zeroed first: a std::vector's memset of them took 5%).
  const std::unique_ptr<float[]> du_store(!kFloat && act ? new float[l.n * l.c * l.hw] : nullptr);
  auto du_row = [&](int64_t nc) {
    if constexpr (kFloat) {
      return dx + nc * l.hw;
    } else {
      return du_store ? du_store.get() + nc * l.hw : nullptr;  // (none without act)
    }
  };
  auto shift_of = [&](int64_t nc) { return row_shift(p, nc, mean[nc / cg]); };
  auto add_grad = [&](int64_t nc, int64_t c, float r, double m1, double m2) {
    dadd[nc] = add_gradient(p, c, r, B[nc], X[nc], l.hw, m1, m2);
  };
  // Row nc = n C + c: pass 1 (its sums A, B, X, and du with act) and pass 2
  // (dx, from du with act, else from dy, and the add's gradient) given its
  // group's means. For float, du is dx's row: pass 2 writes dx over it.
  auto pass1 = [&](int64_t nc) {
    const int64_t c = nc % l.c;
    double sums[3];
    backward_row_sums(dy + nc * l.hw, x + nc * l.hw, l.hw, shift_of(nc), rstd[nc / cg], static_cast<float>(p.w[c]),
                      static_cast<float>(p.b[c]), act, sums, du_row(nc));
    A[nc] = sums[0];
    B[nc] = sums[1];
    X[nc] = sums[2];
  };
  auto pass2 = [&](int64_t nc, std::pair<double, double> means) {
    const int64_t c = nc % l.c;
    const auto [m1, m2] = means;
    const float r = rstd[nc / cg];
    with_du(act, du_row(nc), dy + nc * l.hw, [&](const auto* du) {
      backward_row_dx(du, x + nc * l.hw, l.hw, shift_of(nc), r, static_cast<float>(p.w[c]), static_cast<float>(m1),
                      static_cast<float>(m2), dx + nc * l.hw);
    });
    add_grad(nc, c, r, m1, m2);
  };
  auto means_of = [&](int64_t ng) {  // group ng = n G + g: rows ng cg to (ng + 1) cg
    return group_means(p, A, B, (ng / l.groups) * l.c, (ng % l.groups) * cg, cg, count);
  };
  // Blocks go in batches (kBatchBytes of x; consecutive blocks are
  // consecutive in memory): pass 1 over the batch, its groups' means, then
  // pass 2, so that one block's pass 2 does not wait on its means' divisions.
  const int64_t batch = blocks_per_batch(cg * l.hw * static_cast<int64_t>(sizeof(T)));
  // Short rows take this route whatever the thread count (also with fewer blocks than
  // threads): its row sums round differently from pass1's, and the gradients must not
  // depend on the number of threads (1 and 2 threads differed at 1 x 32 x 8 x 8, G = 1).
  if (l.hw <= kBlockRowsBackward) {
    // Short rows: pass 1 over the whole batch in one call
    // (backward_rows_sums: du with act, and each row's sums), or where rows are
    // shorter than a vector du over the whole batch (silu_grad_block), then
    // each block's sums row by row in one call (backward_block_sums); pass 2
    // a whole block at once (see kBlockRowsBackward).
    parallel_tasks(l.n * l.groups, cg * l.hw, [&](int64_t begin, int64_t end) {
      const RowLanes lanes(l.hw);
      // Per row of the batch: its shift, rstd, w and b (padded).
      std::vector<float> shift(batch * cg + kChannelPad), rs(shift.size()), wr(shift.size()), br(shift.size());
      std::vector<std::pair<double, double>> means(batch);
      for_each_batch(begin, end, batch, [&](int64_t ng0, int64_t blocks) {
        const int64_t rows = blocks * cg, first = ng0 * cg * l.hw;
        // Block by block: no divisions per row (an idiv was 3% of a 4x4 backward).
        for (int64_t j = 0; j < blocks; ++j) {
          const int64_t ng = ng0 + j, c0 = (ng % l.groups) * cg;
          for (int64_t i = 0; i < cg; ++i) {
            const int64_t k = j * cg + i;
            shift[k] = row_shift(p, ng * cg + i, mean[ng]);  // the block's one mean
            rs[k] = rstd[ng];
            wr[k] = static_cast<float>(p.w[c0 + i]);
            br[k] = static_cast<float>(p.b[c0 + i]);
          }
        }
        // Pass 1: du (with act) and the rows' sums in one pass over the batch
        // (backward_rows_sums), or for rows shorter than a vector du over the
        // whole batch, then each block's sums.
        const int64_t nc_first = ng0 * cg;
        if (!backward_rows_sums(dy + first, x + first, rows, l.hw, shift.data(), rs.data(), wr.data(), br.data(), act,
                                du_row(nc_first), A.data() + nc_first, B.data() + nc_first, X.data() + nc_first)) {
          if (act) {
            silu_grad_block(dy + first, x + first, rows, lanes, shift.data(), rs.data(), wr.data(), br.data(),
                            du_row(nc_first));
          }
          for (int64_t j = 0; j < blocks; ++j) {
            const int64_t nc0 = (ng0 + j) * cg, offset = nc0 * l.hw;
            with_du(act, du_row(nc0), dy + offset, [&](const auto* du) {
              backward_block_sums(du, x + offset, cg, l.hw, &shift[j * cg], rstd[ng0 + j], &wr[j * cg], &br[j * cg],
                                  A.data() + nc0, B.data() + nc0, X.data() + nc0);
            });
          }
        }
        for (int64_t j = 0; j < blocks; ++j) means[j] = means_of(ng0 + j);
        for (int64_t j = 0; j < blocks; ++j) {  // pass 2, from du (with act) or dy
          const int64_t ng = ng0 + j, nc0 = ng * cg, c0 = nc0 % l.c, offset = nc0 * l.hw;
          const auto [m1, m2] = means[j];
          with_du(act, du_row(nc0), dy + offset, [&](const auto* du) {
            backward_block_dx(du, x + offset, cg, lanes, &shift[j * cg], rstd[ng], &wr[j * cg],
                              static_cast<float>(m1), static_cast<float>(m2), dx + offset);
          });
          for (int64_t k = 0; k < cg; ++k) add_grad(nc0 + k, c0 + k, rstd[ng], m1, m2);
        }
      });
    });
    return;
  }
  if (l.n * l.groups >= static_cast<int64_t>(at::get_num_threads())) {
    parallel_tasks(l.n * l.groups, cg * l.hw, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<double, double>> means(batch);
      for_each_batch(begin, end, batch, [&](int64_t ng0, int64_t blocks) {
        for (int64_t nc = ng0 * cg; nc < (ng0 + blocks) * cg; ++nc) pass1(nc);
        for (int64_t j = 0; j < blocks; ++j) means[j] = means_of(ng0 + j);
        for (int64_t nc = ng0 * cg; nc < (ng0 + blocks) * cg; ++nc) pass2(nc, means[nc / cg - ng0]);
      });
    });
    return;
  }
  parallel_tasks(l.n * l.c, l.hw, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) pass1(nc);
  });
  parallel_tasks(l.n * l.c, l.hw, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) pass2(nc, means_of(nc / cg));
  });
}

// channels_last pixel rows per call of the row loops (pixel_row_sums,
// pixel_row_dx), which load each channel's coefficients once per call and
// keep pass 1's sums in registers over its rows (same bits as a row at a
// time). Against one row per call, alternated in one process on the AVX-512
// VM (2026-12-02, fp32 unless said, with add and act): 32x128x32x32 1.22x
// (bf16 1.16x), 128x256x8x8 1.15x, 32x256x16x16 1.14x, 128x256x4x4 1.10x,
// 4x512x8x8 1.29x, 16x96x16x16 1.33x, 8x40x32x32 1.86x; 8 or 32 rows timed
// about the same.
constexpr int64_t kPixelRowsPerCall = 16;

// The backward of float, half and bfloat16 channels_last input: per sample,
// pass 1 over its pixels (float sums flushed to double every kPixelChunk
// pixels), then pass 2 over its pixel rows.
template <typename T>
void backward_rows_channels_last(const T* dy, const T* x, const NormLayout& l, const Params& p, const float* mean,
                                 const float* rstd, bool act, T* dx, std::vector<double>& A, std::vector<double>& B,
                                 std::vector<double>& dadd) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  constexpr int64_t kPixelChunk = 256;
  const int64_t cg = l.c / l.groups;
  const double count = static_cast<double>(cg * l.hw);
  std::vector<double> X(l.n * l.c, 0.0);
  const std::unique_ptr<float[]> du_store(!kFloat && act ? new float[l.n * l.hw * l.c] : nullptr);  // as in NCHW
  auto du_row = [&](int64_t r) {  // pixel row r = n HW + s
    if constexpr (kFloat) {
      return dx + r * l.c;
    } else {
      return du_store ? du_store.get() + r * l.c : nullptr;
    }
  };
  // Per (n, c) coefficients, as float arrays of N*C.
  std::vector<float> shift(l.n * l.c), rs(l.n * l.c), m1(l.n * l.c), m2(l.n * l.c);
  const std::vector<float> w = floats_of(p.w), b = floats_of(p.b);
  // Group by group: per channel, two integer divisions found its group. With
  // that and sample_means' group means once per group (they were once per
  // channel), the 128x256x4x4 backward ran 1.27-1.47x faster.
  for (int64_t ng = 0; ng < l.n * l.groups; ++ng) {  // group ng's channels: nc = ng cg .. (ng + 1) cg - 1
    for (int64_t nc = ng * cg; nc < (ng + 1) * cg; ++nc) {
      shift[nc] = row_shift(p, nc, mean[ng]);
      rs[nc] = rstd[ng];
    }
  }
  // Pass 1 over sample n's pixels (acc: 3 C floats of scratch).
  auto sample_pass1 = [&](int64_t n, std::vector<float>& acc) {
    const PixelCoefs k{shift.data() + n * l.c, rs.data() + n * l.c, w.data(), b.data(), nullptr, nullptr};
    for (int64_t s0 = 0; s0 < l.hw; s0 += kPixelChunk) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t rows = std::min(kPixelChunk, l.hw - s0), i0 = (n * l.hw + s0) * l.c;
      for (int64_t s = 0; s < rows; s += kPixelRowsPerCall)
        pixel_row_sums(dy + i0 + s * l.c, x + i0 + s * l.c, l.c, std::min(kPixelRowsPerCall, rows - s), k, act,
                       acc.data(), acc.data() + l.c, acc.data() + 2 * l.c, du_row(n * l.hw + s0 + s));
      for (int64_t c = 0; c < l.c; ++c) {
        A[n * l.c + c] += acc[c];
        B[n * l.c + c] += acc[l.c + c];
        X[n * l.c + c] += acc[2 * l.c + c];
      }
    }
  };
  // Sample n's group means (m1, m2) and add gradients from its pass 1 sums.
  auto sample_means = [&](int64_t n) {
    for (int64_t c0 = 0; c0 < l.c; c0 += cg) {  // each group's means once, not once per channel
      const auto [g1, g2] = group_means(p, A, B, n * l.c, c0, cg, count);
      for (int64_t c = c0; c < c0 + cg; ++c) {
        const int64_t nc = n * l.c + c;
        m1[nc] = static_cast<float>(g1);
        m2[nc] = static_cast<float>(g2);
        dadd[nc] = add_gradient(p, c, rs[nc], B[nc], X[nc], l.hw, g1, g2);
      }
    }
  };
  // Pass 2 over pixel rows [begin, end), from du (with act) or dy (for
  // float, du is dx's row: written over), in calls that stay within one
  // sample (the coefficients k are per sample).
  auto rows_pass2 = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end;) {
      const int64_t n = r / l.hw, rows = std::min({kPixelRowsPerCall, end - r, (n + 1) * l.hw - r});
      const PixelCoefs k{shift.data() + n * l.c, rs.data() + n * l.c, w.data(),
                         b.data(),               m1.data() + n * l.c, m2.data() + n * l.c};
      with_du(act, du_row(r), dy + r * l.c,
              [&](const auto* du) { pixel_row_dx(du, x + r * l.c, l.c, rows, k, dx + r * l.c); });
      r += rows;
    }
  };
  // Each sample's pass 2 right after its pass 1, in the same task, while its
  // x and du are still in cache, where the samples share out evenly among the
  // threads; otherwise each pass runs over the whole tensor. Alternated in one
  // process on the AVX-512 VM (2 MiB L2), the first took 1.11-1.27x less time
  // (32x128x32x32, 128x256x8x8, 32x256x16x16, 8x128x64x64).
  const int64_t threads = at::get_num_threads();
  if (l.n >= 2 * threads || l.n % threads == 0) {
    parallel_tasks(l.n, l.c * l.hw, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(3 * l.c);
      for (int64_t n = begin; n < end; ++n) {
        sample_pass1(n, acc);
        sample_means(n);
        rows_pass2(n * l.hw, (n + 1) * l.hw);
      }
    });
    return;
  }
  parallel_tasks(l.n, l.c * l.hw, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(3 * l.c);
    for (int64_t n = begin; n < end; ++n) sample_pass1(n, acc);
  });
  for (int64_t n = 0; n < l.n; ++n) sample_means(n);
  parallel_tasks(l.n * l.hw, l.c, [&](int64_t begin, int64_t end) { rows_pass2(begin, end); });
}

// The general path, element by element in double: float64 input (gradcheck).
void backward_double(const double* dy, const double* x, const NormLayout& l, const Params& p, const double* mean,
                     const double* rstd, bool act, double* dx, std::vector<double>& A, std::vector<double>& B,
                     std::vector<double>& dadd) {
  const int64_t cg = l.c / l.groups;
  const double count = static_cast<double>(cg * l.hw);
  auto xhat_of = [&](int64_t n, int64_t c, int64_t i) {
    const double a = p.add.empty() ? 0.0 : p.add[n * l.c + c];
    const int64_t ng = n * l.groups + c / cg;
    return (x[i] + a - mean[ng]) * rstd[ng];
  };
  std::vector<double> X(l.n * l.c);
  // Pass 1, per (n, c): A = sum du * xhat, B = sum du, X = sum xhat.
  parallel_tasks(l.n * l.c, l.hw, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / l.c, c = nc % l.c;
      double a_sum = 0.0, b_sum = 0.0, x_sum = 0.0;
      for (int64_t s = 0; s < l.hw; ++s) {
        const int64_t i = at_index(l, n, c, s);
        const double xhat = xhat_of(n, c, i);
        const double du = grad_u(dy[i], xhat * p.w[c] + p.b[c], act);
        a_sum += du * xhat;
        b_sum += du;
        x_sum += xhat;
      }
      A[nc] = a_sum;
      B[nc] = b_sum;
      X[nc] = x_sum;
    }
  });
  // Pass 2, per (n, c): dh from the group means of w B and w A.
  parallel_tasks(l.n * l.c, l.hw, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / l.c, c = nc % l.c, c0 = (c / cg) * cg;
      const auto [m1, m2] = group_means(p, A, B, n * l.c, c0, cg, count);
      const double r = rstd[n * l.groups + c / cg];
      for (int64_t s = 0; s < l.hw; ++s) {
        const int64_t i = at_index(l, n, c, s);
        const double xhat = xhat_of(n, c, i);
        const double du = grad_u(dy[i], xhat * p.w[c] + p.b[c], act);
        dx[i] = r * (du * p.w[c] - m1 - xhat * m2);
      }
      dadd[nc] = r * (p.w[c] * B[nc] - static_cast<double>(l.hw) * m1 - X[nc] * m2);
    }
  });
}

// v as a new tensor of `shape` in the dtype of `like` (the parameter the
// gradient is for), or of x without one. Converted here: a double tensor
// then .to() cost two more tensors and a dispatched copy per gradient, 3-5 us
// of a 4x4 map's 14 us backward.
at::Tensor from_doubles(const std::vector<double>& v, at::IntArrayRef shape, const std::optional<at::Tensor>& like,
                        const at::Tensor& x) {
  const at::ScalarType dtype = like.has_value() ? like->scalar_type() : x.scalar_type();
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "from_doubles", [&] {
    scalar_t* out = t.mutable_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<scalar_t>(v[i]);
  });
  return t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& add, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t num_groups, bool act) {
  const NormLayout l = check_group_norm_args(x, weight, bias, add, num_groups);
  check_group_norm_backward_args(dy_in, x, mean, rstd, l);
  const at::Tensor dy = x.is_contiguous() ? dy_in.contiguous() : dy_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty_like(x);
  std::vector<double> A(l.n * l.c, 0.0), B(l.n * l.c, 0.0), dadd(l.n * l.c, 0.0);
  if (x.numel() > 0) {
    const Params p = read_params(l, weight, bias, add);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_silu_backward_cpu", [&] {
      if constexpr (std::is_same_v<scalar_t, double>) {  // gradcheck precision: all in double
        backward_double(dy.const_data_ptr<double>(), x.const_data_ptr<double>(), l, p, mean.const_data_ptr<double>(),
                        rstd.const_data_ptr<double>(), act, dx.mutable_data_ptr<double>(), A, B, dadd);
      } else {
        (l.channels_last ? backward_rows_channels_last<scalar_t> : backward_rows_nchw<scalar_t>)(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), l, p, mean.const_data_ptr<float>(),
            rstd.const_data_ptr<float>(), act, dx.mutable_data_ptr<scalar_t>(), A, B, dadd);
      }
    });
  }
  std::vector<double> dw(l.c, 0.0), db(l.c, 0.0);
  for (int64_t n = 0; n < l.n; ++n) {
    for (int64_t c = 0; c < l.c; ++c) {
      dw[c] += A[n * l.c + c];
      db[c] += B[n * l.c + c];
    }
  }
  return {dx, from_doubles(dw, {l.c}, weight, x), from_doubles(db, {l.c}, bias, x),
          from_doubles(dadd, {l.n, l.c}, add, x)};
}

TORCH_LIBRARY_IMPL(ddpm_fast, CPU, m) {
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace ddpm_fast
