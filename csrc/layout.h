// How a tensor's memory positions map to samples and to logical (NCHW) indices,
// and the argument checks every op shares.
//
// Noise is drawn per logical index, so a channels_last tensor gets the same
// noise at the same (n, c, h, w) as a contiguous one.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernel_args.h"

// The three element types every op accepts (double is not one of them).
#define DDPM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace ddpm_fast {

inline bool is_supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline bool is_channels_last_4d(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_float_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(is_supported_float(x.scalar_type()), "ddpm_fast: ", name,
              " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "ddpm_fast: ", name, " must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(x.is_contiguous() || is_channels_last_4d(x), "ddpm_fast: ", name,
              " must be contiguous or channels_last; call .contiguous() first (strides ",
              x.strides(), ")");
}

// t: int64, one timestep (0-d) or one per sample (shape [N]), on x's device.
inline void check_timesteps(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "ddpm_fast: ", name, " must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "ddpm_fast: ", name, " is on ", t.device(),
              " but the input is on ", x.device());
  TORCH_CHECK(t.dim() == 0 || (t.dim() == 1 && t.size(0) == x.size(0)), "ddpm_fast: ", name,
              " must be a scalar or have one entry per sample (", x.size(0), "), got shape ",
              t.sizes());
  TORCH_CHECK(t.dim() == 0 || t.stride(0) == 1 || t.size(0) <= 1, "ddpm_fast: ", name,
              " must be contiguous");
}

inline void check_coefficient_table(const at::Tensor& table, const at::Tensor& x,
                                    const char* name) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 1 && table.is_contiguous(),
              "ddpm_fast: ", name, " must be a contiguous 1-d float32 table");
  TORCH_CHECK(table.numel() > 0, "ddpm_fast: ", name, " is empty");
  TORCH_CHECK(table.device() == x.device(), "ddpm_fast: ", name, " is on ", table.device(),
              " but the input is on ", x.device());
}

inline void check_same_layout(const at::Tensor& a, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(a.device() == ref.device(), "ddpm_fast: ", name, " is on ", a.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(a.sizes() == ref.sizes(), "ddpm_fast: ", name, " has shape ", a.sizes(), " but ",
              ref_name, " has shape ", ref.sizes());
  TORCH_CHECK(a.scalar_type() == ref.scalar_type(), "ddpm_fast: ", name, " is ", a.scalar_type(),
              " but ", ref_name, " is ", ref.scalar_type());
  const bool same_order = ref.is_contiguous() ? a.is_contiguous() : is_channels_last_4d(a);
  TORCH_CHECK(same_order, "ddpm_fast: ", name, " must have the memory format of ", ref_name,
              " (strides ", a.strides(), " vs ", ref.strides(), ")");
}

inline ElementLayout element_layout(const at::Tensor& x) {
  ElementLayout l;
  l.numel = x.numel();
  l.per_sample = x.size(0) > 0 ? l.numel / x.size(0) : 0;
  l.channels_last = is_channels_last_4d(x);
  l.channels = l.channels_last ? x.size(1) : 1;
  l.spatial = l.channels_last ? x.size(2) * x.size(3) : 1;
  return l;
}

}  // namespace ddpm_fast
