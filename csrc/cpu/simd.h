// Whether this build holds the CPU kernels' AVX2 loops.
//
// They need x86 and GCC/Clang (<immintrin.h>, target attributes, run-time CPU
// detection); elsewhere (aarch64, ...) only the portable loops are compiled and
// the kernels run those. Defining DDPM_FAST_PORTABLE_CPU leaves the AVX2 loops
// out on x86 too, so that the portable-only build can be checked here
// (tests/test_portable_build.py).
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(DDPM_FAST_PORTABLE_CPU)
#define DDPM_FAST_X86_SIMD 1
#include <immintrin.h>
#else
#define DDPM_FAST_X86_SIMD 0
#endif
