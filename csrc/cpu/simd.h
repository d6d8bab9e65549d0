// Which vector instruction sets the CPU kernels' hand-written loops use.
//
// The loops need x86 and GCC (<immintrin.h>, GCC's target pragmas, run-time
// CPU detection); elsewhere (aarch64, ..., and builds by Clang, whose
// handling of GCC's target pragmas no machine of the project can check) only
// the portable loops are compiled and the kernels run those. Defining DDPM_FAST_PORTABLE_CPU leaves
// the x86 loops out on x86 too, so that the portable-only build can be checked
// here (tests/test_portable_build.py).
//
// On x86 each vector loop is compiled twice, for AVX2 + FMA + F16C (8
// floats; CPUs with AVX2 have the other two) and for AVX-512 (16 floats),
// from one width-generic source (simd_vec.h), and simd_level() picks one at
// run time: the widest the CPU has, capped by the environment variable
// DDPM_FAST_CPU_SIMD (`avx2` or `none`), with which the tests run the
// narrower paths on a machine that has AVX-512.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(DDPM_FAST_PORTABLE_CPU)
#define DDPM_FAST_X86_SIMD 1
#include <immintrin.h>
#else
#define DDPM_FAST_X86_SIMD 0
#endif

#include <cstdlib>
#include <cstring>

namespace ddpm_fast {
namespace cpu {

enum SimdLevel : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest level this CPU runs, capped by DDPM_FAST_CPU_SIMD; decided once.
inline SimdLevel simd_level() {
  static const SimdLevel level = [] {
#if DDPM_FAST_X86_SIMD
    __builtin_cpu_init();
    int cpu = kPortable;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) cpu = kAvx2;
    if (cpu == kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      cpu = kAvx512;
    const char* cap = std::getenv("DDPM_FAST_CPU_SIMD");
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0 && cpu > kAvx2) cpu = kAvx2;
    if (cap != nullptr && std::strcmp(cap, "none") == 0) cpu = kPortable;
    return static_cast<SimdLevel>(cpu);
#else
    return kPortable;
#endif
  }();
  return level;
}

}  // namespace cpu
}  // namespace ddpm_fast

#if DDPM_FAST_X86_SIMD
// fn's AVX-512, AVX2 or portable version (namespaces avx512, avx2 and the
// function fn_portable), as simd_level() says.
#define DDPM_SIMD_PICK(fn)                                                                          \
  (::ddpm_fast::cpu::simd_level() == ::ddpm_fast::cpu::kAvx512 ? avx512::fn                         \
   : ::ddpm_fast::cpu::simd_level() == ::ddpm_fast::cpu::kAvx2 ? avx2::fn                           \
                                                                : fn##_portable)
// The call fn(...) to fn's AVX-512, AVX2 or portable version, as simd_level()
// says: for function templates, whose names DDPM_SIMD_PICK cannot choose
// between (a void call is fine: the conditional operator takes void operands).
#define DDPM_SIMD_CALL(fn, ...)                                                                       \
  (::ddpm_fast::cpu::simd_level() == ::ddpm_fast::cpu::kAvx512 ? avx512::fn(__VA_ARGS__)              \
   : ::ddpm_fast::cpu::simd_level() == ::ddpm_fast::cpu::kAvx2 ? avx2::fn(__VA_ARGS__)                \
                                                                : fn##_portable(__VA_ARGS__))
// Pragmas around code compiled once per instruction set; functions defined
// between them (templates included) get that target. The target strings are
// the ones simd_level() checks for.
#define DDPM_TARGET_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
//
// GCC 12 warns that AVX-512 intrinsics that start from an undefined vector
// (_mm512_undefined_*) use it uninitialized, once inlined (GCC bug 105593,
// fixed in GCC 13): a false alarm, silenced in these regions only (the AVX2
// copy of the same code is still checked).
#define DDPM_TARGET_AVX512_BEGIN                                                                           \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl\")") \
      _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")       \
          _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define DDPM_TARGET_AVX512_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#define DDPM_TARGET_END _Pragma("GCC pop_options")
#else
#define DDPM_SIMD_PICK(fn) (fn##_portable)
#define DDPM_SIMD_CALL(fn, ...) (fn##_portable(__VA_ARGS__))
#endif
