// File: simd_avx2.h
// AVX2/FMA building blocks shared by the CPU kernels. Everything here is compiled for the
// avx2+fma+f16c target only; callers must check the CPU first (cpu::HasAvx2()).
#ifndef QSHARD_RUNTIME_BACKEND_CPU_SIMD_AVX2_H_
#define QSHARD_RUNTIME_BACKEND_CPU_SIMD_AVX2_H_

#include <immintrin.h>

#include <cstdint>

#define QSHARD_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qshard::cpu::simd {

// Sum of the 8 lanes.
QSHARD_AVX2 inline float HSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// 8 bf16 -> 8 fp32 (a bf16 is the top half of an fp32).
QSHARD_AVX2 inline __m256 LoadBf16x8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 f16 -> 8 fp32 (F16C).
QSHARD_AVX2 inline __m256 LoadF16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Dot product of two fp32 vectors, two accumulators to hide FMA latency.
QSHARD_AVX2 inline float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  float s = HSum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace qshard::cpu::simd

#endif  // QSHARD_RUNTIME_BACKEND_CPU_SIMD_AVX2_H_
