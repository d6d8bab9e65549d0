// What the CPU GroupNorm+SiLU's forward and backward files
// (group_norm_silu_cpu.cpp, group_norm_silu_backward_cpu.cpp) share: the
// parameters read into doubles and the element indexing. Internal to the file
// that includes it, as group_norm_silu_rows.h is.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
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

// Memory index of element (n, c, s) of x viewed as N x C x S.
inline int64_t at_index(const NormLayout& l, int64_t n, int64_t c, int64_t s) {
  return l.channels_last ? (n * l.hw + s) * l.c + c : (n * l.c + c) * l.hw + s;
}

// A row of `count` values of T as floats: the row itself for float, else
// converted into `buffer` (vector loops where the CPU has them).
template <typename T>
const float* as_float_row(const T* row, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, "a 16-bit float type");
    const auto* bits = reinterpret_cast<const uint16_t*>(row);
    int64_t i = std::is_same_v<T, c10::Half> ? half_to_float(bits, count, buffer) : bf16_to_float(bits, count, buffer);
    for (; i < count; ++i) buffer[i] = static_cast<float>(row[i]);
    return buffer;
  }
}

// `count` floats rounded to T (to nearest even) into out.
template <typename T>
void from_float_row(const float* in, int64_t count, T* out) {
  static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, "a 16-bit float type");
  auto* bits = reinterpret_cast<uint16_t*>(out);
  int64_t i = std::is_same_v<T, c10::Half> ? float_to_half(in, count, bits) : float_to_bf16(in, count, bits);
  for (; i < count; ++i) out[i] = static_cast<T>(in[i]);
}

inline double sigmoid(double u) { return 1.0 / (1.0 + std::exp(-u)); }

}  // namespace
}  // namespace ddpm_fast
