// File: simd_avx512.h
// AVX-512 building blocks shared by the CPU kernels. Compiled for the avx512f/bw/vl/dq
// target only (plus avx2/fma/f16c, which every such CPU has); callers must check
// ActiveIsa() == Isa::kAvx512 first.
#ifndef QSHARD_RUNTIME_BACKEND_CPU_SIMD_AVX512_H_
#define QSHARD_RUNTIME_BACKEND_CPU_SIMD_AVX512_H_

#include <immintrin.h>

#include <cstdint>

// GCC 12's AVX-512 intrinsics start from self-initialized "undefined" vectors
// (_mm512_undefined_*), which -Wmaybe-uninitialized reports wherever they are inlined
// (a known false positive). Silenced for the translation units that use AVX-512.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define QSHARD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
// The same plus VNNI (vpdpbusd / vpdpwssd); check CpuHasAvx512Vnni() too.
#define QSHARD_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

namespace qshard::cpu::simd {

// 16 bf16 -> 16 fp32 (a bf16 is the top half of an fp32).
QSHARD_AVX512 inline __m512 LoadBf16x16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 f16 -> 16 fp32.
QSHARD_AVX512 inline __m512 LoadF16x16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

}  // namespace qshard::cpu::simd

#endif  // QSHARD_RUNTIME_BACKEND_CPU_SIMD_AVX512_H_
