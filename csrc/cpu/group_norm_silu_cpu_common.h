// What the CPU GroupNorm+SiLU's forward and backward files
// (group_norm_silu_cpu.cpp, group_norm_silu_backward_cpu.cpp) share: the
// parameters read into doubles, the element indexing, the parallel passes.
// Internal to the file that includes it, as group_norm_silu_rows.h is.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "../group_norm_silu.h"
#include "group_norm_silu_rows.h"

namespace ddpm_fast {
namespace {

// Per-channel parameters and per-(n, c) adds as double vectors (C and N*C values).
struct Params {
  std::vector<double> w, b, add;  // add is empty without one
};

// A contiguous parameter (check_group_norm_args) read into doubles directly:
// through t.to(kDouble) each cost a tensor and a kernel launch, some
// microseconds of an op whose small shapes take tens.
std::vector<double> as_doubles(const at::Tensor& t) {
  std::vector<double> out(t.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "as_doubles", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<double>(p[i]);
  });
  return out;
}

Params read_params(const NormLayout& l, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& add) {
  Params p;
  p.w = weight.has_value() ? as_doubles(*weight) : std::vector<double>(l.c, 1.0);
  p.b = bias.has_value() ? as_doubles(*bias) : std::vector<double>(l.c, 0.0);
  if (add.has_value()) p.add = as_doubles(*add);
  return p;
}

// A parallel pass moving fewer values than this runs on the calling thread:
// waking the second thread cost 2-5 us on the 2-core VMs (2026-12-02), the
// time one thread takes for 8k-16k values, and one thread was as fast or
// faster up to 16k values (forward and backward, both layouts, 1 and 2
// threads alternated in one process).
constexpr int64_t kMinParallelValues = 16384;

// at::parallel_for over tasks [0, tasks) of about values_per_task values each,
// in parallel only where the pass moves more than kMinParallelValues.
template <typename F>
void parallel_tasks(int64_t tasks, int64_t values_per_task, const F& f) {
  at::parallel_for(0, tasks, std::max<int64_t>(1, kMinParallelValues / std::max<int64_t>(values_per_task, 1)), f);
}

// NCHW (sample, group) blocks go through the forward's and the backward's
// passes in batches of consecutive blocks (consecutive in memory too) of up
// to this many bytes of x, one block where a block is larger: a pass over the
// batch, its groups' statistics, then the next pass. One block at a time,
// each block's next pass waited on its statistics (divisions and a square
// root in double: group_affine took 18% of a 128x32x8x8 forward's samples),
// and a small block's passes were too short to hide the wait. Against one
// block at a time, alternated in one process on the AVX-512 VM (2026-12-02,
// fp32, 32 groups, act), same bits: forward 1.40x faster at 128x32x8x8, 1.21x
// at 128x256x4x4, 1.11x at 128x32x16x16, 1.08x at 128x256x8x8; backward
// 1.17-1.49x at 128x32x8x8, 1.42-1.72x at 128x64x2x2, 1.08x at 128x32x16x16.
// Batches of 4, 16 or 32 KiB timed within 5% of 8 KiB.
constexpr int64_t kBatchBytes = 8192;

// How many blocks of block_bytes bytes a batch holds (kBatchBytes; at least one).
inline int64_t blocks_per_batch(int64_t block_bytes) { return std::max<int64_t>(1, kBatchBytes / block_bytes); }

// f(first, blocks) over blocks [begin, end) (a task's), `batch` at a time.
template <typename F>
void for_each_batch(int64_t begin, int64_t end, int64_t batch, const F& f) {
  for (int64_t first = begin; first < end; first += batch) f(first, std::min(batch, end - first));
}

// Memory index of element (n, c, s) of x viewed as N x C x S.
inline int64_t at_index(const NormLayout& l, int64_t n, int64_t c, int64_t s) {
  return l.channels_last ? (n * l.hw + s) * l.c + c : (n * l.c + c) * l.hw + s;
}

inline double sigmoid(double u) { return 1.0 / (1.0 + std::exp(-u)); }

}  // namespace
}  // namespace ddpm_fast
