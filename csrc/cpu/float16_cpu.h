// Rows of 16-bit floats (IEEE half, bfloat16) to float and back on the CPU,
// in AVX-512 or AVX2 + F16C vectors where the CPU has them (float16_cpu.cpp):
// the kernels compute in float, and one value at a time these conversions
// cost more than the arithmetic (c10::Half's is a software routine in code
// compiled for plain SSE2).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ddpm_fast {
namespace cpu {

// count values from in to out, each rounded as c10 rounds it: to nearest
// even, and NaN to bfloat16's quiet 0x7FC0. The 16-bit values as their bits.
void half_to_float(const uint16_t* in, int64_t count, float* out);
void bf16_to_float(const uint16_t* in, int64_t count, float* out);
void float_to_half(const float* in, int64_t count, uint16_t* out);
void float_to_bf16(const float* in, int64_t count, uint16_t* out);

// A float view of count values of T: the values themselves for float,
// else `buffer` (count floats) filled with them.
template <typename T>
const float* as_float_row(const T* row, int64_t count, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, "a 16-bit float type");
    const auto* bits = reinterpret_cast<const uint16_t*>(row);
    (std::is_same_v<T, c10::Half> ? half_to_float : bf16_to_float)(bits, count, buffer);
    return buffer;
  }
}

// count floats to T (copied for float).
template <typename T>
void from_float_row(const float* in, int64_t count, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    std::copy_n(in, count, out);
  } else {
    static_assert(std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>, "a 16-bit float type");
    (std::is_same_v<T, c10::Half> ? float_to_half : float_to_bf16)(in, count, reinterpret_cast<uint16_t*>(out));
  }
}

}  // namespace cpu
}  // namespace ddpm_fast
