#include "quant/dense_linalg.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/base/thread_pool.h"

#define QSHARD_QUANT_AVX2 __attribute__((target("avx2,fma")))

namespace qshard::quant_internal {
namespace {

// Set while a thread runs a part of a Parallel* call: nested calls then run serially
// (ThreadPool::ParallelFor is not re-entrant).
thread_local bool t_in_parallel = false;

struct ParallelScope {
  bool saved = t_in_parallel;
  ParallelScope() { t_in_parallel = true; }
  ~ParallelScope() { t_in_parallel = saved; }
};

bool HasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// ---------------------------------------------------------------------------------------
// Portable fallbacks: i-p-j order so the inner loop is a contiguous axpy the compiler can
// vectorize with the baseline ISA.
template <typename T>
void GemmAccScalar(int64_t M, int64_t N, int64_t Kd, T alpha, const T* A, int64_t lda, const T* B,
                   int64_t ldb, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    for (int64_t p = 0; p < Kd; ++p) {
      const T a = alpha * A[i * lda + p];
      const T* b = B + p * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// ---------------------------------------------------------------------------------------
// AVX2 register-blocked kernels: R rows x 16 floats (or 8 doubles) of C held in 2R ymm
// accumulators; per step of the inner dimension two loads of B and R broadcasts of A.
template <int R>
QSHARD_QUANT_AVX2 inline void KernelF32(int64_t Kd, float alpha, const float* A, int64_t lda,
                                        const float* B, int64_t ldb, float* C, int64_t ldc) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < Kd; ++p) {
    const __m256 b0 = _mm256_loadu_ps(B + p * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + p * ldb + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * lda + p);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    _mm256_storeu_ps(c, _mm256_fmadd_ps(va, acc[r][0], _mm256_loadu_ps(c)));
    _mm256_storeu_ps(c + 8, _mm256_fmadd_ps(va, acc[r][1], _mm256_loadu_ps(c + 8)));
  }
}

template <int R>
QSHARD_QUANT_AVX2 inline void KernelF64(int64_t Kd, double alpha, const double* A, int64_t lda,
                                        const double* B, int64_t ldb, double* C, int64_t ldc) {
  __m256d acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
  for (int64_t p = 0; p < Kd; ++p) {
    const __m256d b0 = _mm256_loadu_pd(B + p * ldb);
    const __m256d b1 = _mm256_loadu_pd(B + p * ldb + 4);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256d a = _mm256_broadcast_sd(A + r * lda + p);
      acc[r][0] = _mm256_fmadd_pd(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_pd(a, b1, acc[r][1]);
    }
  }
  const __m256d va = _mm256_set1_pd(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    double* c = C + r * ldc;
    _mm256_storeu_pd(c, _mm256_fmadd_pd(va, acc[r][0], _mm256_loadu_pd(c)));
    _mm256_storeu_pd(c + 4, _mm256_fmadd_pd(va, acc[r][1], _mm256_loadu_pd(c + 4)));
  }
}

// Column panels of NR outputs; each B panel [Kd, NR] is first copied to a contiguous
// buffer (B rows are often far apart: one page per row for K in the thousands) and then
// stays in L1 while the rows of A stream past it. Leftover columns (< NR) use the portable
// loop.
template <typename T, int kNr, typename Kernel6, typename Kernel1>
QSHARD_QUANT_AVX2 inline void GemmPanels(int64_t M, int64_t N, int64_t Kd, T alpha, const T* A,
                                         int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                                         Kernel6 k6, Kernel1 k1) {
  thread_local std::vector<T> pack;
  const bool packed = M >= 6;
  if (packed) pack.resize(static_cast<size_t>(Kd * kNr));
  int64_t j = 0;
  for (; j + kNr <= N; j += kNr) {
    const T* b = B + j;
    int64_t bld = ldb;
    if (packed) {
      for (int64_t p = 0; p < Kd; ++p) {
        std::copy(B + p * ldb + j, B + p * ldb + j + kNr, pack.data() + p * kNr);
      }
      b = pack.data();
      bld = kNr;
    }
    int64_t i = 0;
    for (; i + 6 <= M; i += 6) k6(Kd, alpha, A + i * lda, lda, b, bld, C + i * ldc + j, ldc);
    for (; i < M; ++i) k1(Kd, alpha, A + i * lda, lda, b, bld, C + i * ldc + j, ldc);
  }
  if (j < N) GemmAccScalar<T>(M, N - j, Kd, alpha, A, lda, B + j, ldb, C + j, ldc);
}

QSHARD_QUANT_AVX2 void GemmAccF32Avx2(int64_t M, int64_t N, int64_t Kd, float alpha, const float* A,
                                      int64_t lda, const float* B, int64_t ldb, float* C,
                                      int64_t ldc) {
  GemmPanels<float, 16>(M, N, Kd, alpha, A, lda, B, ldb, C, ldc, KernelF32<6>, KernelF32<1>);
}

QSHARD_QUANT_AVX2 void GemmAccF64Avx2(int64_t M, int64_t N, int64_t Kd, double alpha,
                                      const double* A, int64_t lda, const double* B, int64_t ldb,
                                      double* C, int64_t ldc) {
  GemmPanels<double, 8>(M, N, Kd, alpha, A, lda, B, ldb, C, ldc, KernelF64<6>, KernelF64<1>);
}

// Unblocked in-place inverse of the lower-triangular t [b, b] (leading dimension ld) into
// out [b, b] (dense, upper part zero). Column j of the inverse solves L x = e_j.
void InvertSmallLower(const double* l, int64_t ld, int64_t b, double* out) {
  std::fill(out, out + b * b, 0.0);
  for (int64_t j = 0; j < b; ++j) {
    out[j * b + j] = 1.0 / l[j * ld + j];
    for (int64_t i = j + 1; i < b; ++i) {
      double s = 0.0;
      for (int64_t p = j; p < i; ++p) s += l[i * ld + p] * out[p * b + j];
      out[i * b + j] = -s / l[i * ld + i];
    }
  }
}

}  // namespace

void GemmAcc(int64_t M, int64_t N, int64_t Kd, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || Kd <= 0) return;
  if (HasAvx2Fma()) {
    GemmAccF32Avx2(M, N, Kd, alpha, A, lda, B, ldb, C, ldc);
  } else {
    GemmAccScalar<float>(M, N, Kd, alpha, A, lda, B, ldb, C, ldc);
  }
}

void GemmAcc(int64_t M, int64_t N, int64_t Kd, double alpha, const double* A, int64_t lda,
             const double* B, int64_t ldb, double* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || Kd <= 0) return;
  if (HasAvx2Fma()) {
    GemmAccF64Avx2(M, N, Kd, alpha, A, lda, B, ldb, C, ldc);
  } else {
    GemmAccScalar<double>(M, N, Kd, alpha, A, lda, B, ldb, C, ldc);
  }
}

void ParallelTiles(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  ThreadPool& pool = ThreadPool::Global();
  const int64_t parts = std::min<int64_t>(pool.num_threads(), n);
  if (t_in_parallel || parts <= 1) {
    for (int64_t t = 0; t < n; ++t) fn(t);
    return;
  }
  pool.ParallelFor(
      parts,
      [&](int64_t b, int64_t e) {
        ParallelScope scope;
        for (int64_t p = b; p < e; ++p) {
          for (int64_t t = p; t < n; t += parts) fn(t);
        }
      },
      1);
}

void ParallelRange(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (t_in_parallel) {
    fn(0, n);
    return;
  }
  ThreadPool::Global().ParallelFor(
      n,
      [&](int64_t b, int64_t e) {
        ParallelScope scope;
        fn(b, e);
      },
      min_chunk);
}

bool CholeskyLower(double* a, int64_t n) {
  // Right-looking blocked factorization with panels of kNb columns: factor the diagonal
  // block, solve the panel below it row by row, then the rank-kNb update of the trailing
  // lower triangle (the O(n^3) part) as GEMM tiles spread over the threads.
  constexpr int64_t kNb = 96;
  constexpr int64_t kTile = 96;  // rows per trailing-update tile
  std::vector<double> lt;        // L21^T [kb, m]
  for (int64_t k0 = 0; k0 < n; k0 += kNb) {
    const int64_t k1 = std::min(n, k0 + kNb), kb = k1 - k0;
    // Diagonal block (earlier panels' updates are already applied).
    for (int64_t j = k0; j < k1; ++j) {
      double d = a[j * n + j];
      for (int64_t p = k0; p < j; ++p) d -= a[j * n + p] * a[j * n + p];
      if (!(d > 0.0) || !std::isfinite(d)) return false;
      const double ljj = std::sqrt(d);
      a[j * n + j] = ljj;
      for (int64_t i = j + 1; i < k1; ++i) {
        double s = a[i * n + j];
        for (int64_t p = k0; p < j; ++p) s -= a[i * n + p] * a[j * n + p];
        a[i * n + j] = s / ljj;
      }
    }
    const int64_t m = n - k1;
    if (m == 0) break;
    // Panel: row i of L21 solves L11 x = a[i, k0:k1]^T.
    ParallelRange(m, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = k1 + b; i < k1 + e; ++i) {
        double* row = a + i * n;
        for (int64_t j = k0; j < k1; ++j) {
          double s = row[j];
          const double* lj = a + j * n;
          for (int64_t p = k0; p < j; ++p) s -= row[p] * lj[p];
          row[j] = s / lj[j];
        }
      }
    });
    lt.resize(static_cast<size_t>(kb * m));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t p = 0; p < kb; ++p) lt[p * m + i] = a[(k1 + i) * n + k0 + p];
    }
    // Trailing update A22 -= L21 L21^T, lower triangle only: the tile of rows [r0, r1)
    // covers columns [k1, r1) (a few upper entries of the diagonal tile are computed too;
    // they are cleared below).
    const int64_t tiles = (m + kTile - 1) / kTile;
    ParallelTiles(tiles, [&](int64_t t) {
      const int64_t r0 = k1 + t * kTile, r1 = std::min(n, r0 + kTile);
      GemmAcc(r1 - r0, r1 - k1, kb, -1.0, a + r0 * n + k0, n, lt.data(), m, a + r0 * n + k1, n);
    });
  }
  for (int64_t i = 0; i < n; ++i) std::fill(a + i * n + i + 1, a + (i + 1) * n, 0.0);
  return true;
}

void InvertLowerTriangular(double* l, int64_t n) {
  // Block row I of X = L^-1 (lower): X_II = L_II^-1 and
  //   X[I, :I] = -X_II * (L[I, :I] * X[:I, :I]).
  // Block rows are done top-down in place: the product reads block row I of L (not yet
  // overwritten) and the rows above it, which already hold X.
  constexpr int64_t kNb = 96;
  constexpr int64_t kCols = 96;  // columns per parallel tile
  std::vector<double> s, xii;
  for (int64_t i0 = 0; i0 < n; i0 += kNb) {
    const int64_t i1 = std::min(n, i0 + kNb), b = i1 - i0;
    xii.resize(static_cast<size_t>(b * b));
    InvertSmallLower(l + i0 * n + i0, n, b, xii.data());
    if (i0 > 0) {
      // S [b, i0] = L[i0:i1, :i0] * X[:i0, :i0]. X is lower, so column tile [c0, c1) only
      // needs the inner range [c0, i0) (the zeros above the diagonal inside the tile are
      // real zeros of the upper triangle).
      s.assign(static_cast<size_t>(b * i0), 0.0);
      const int64_t tiles = (i0 + kCols - 1) / kCols;
      ParallelTiles(tiles, [&](int64_t t) {
        const int64_t c0 = t * kCols, c1 = std::min(i0, c0 + kCols);
        GemmAcc(b, c1 - c0, i0 - c0, 1.0, l + i0 * n + c0, n, l + c0 * n + c0, n, s.data() + c0,
                i0);
      });
      // X[i0:i1, :i0] = -X_II * S.
      ParallelTiles(tiles, [&](int64_t t) {
        const int64_t c0 = t * kCols, c1 = std::min(i0, c0 + kCols);
        for (int64_t r = i0; r < i1; ++r) std::fill(l + r * n + c0, l + r * n + c1, 0.0);
        GemmAcc(b, c1 - c0, b, -1.0, xii.data(), b, s.data() + c0, i0, l + i0 * n + c0, n);
      });
    }
    for (int64_t r = 0; r < b; ++r) {
      std::copy(xii.data() + r * b, xii.data() + (r + 1) * b, l + (i0 + r) * n + i0);
    }
  }
}

}  // namespace qshard::quant_internal
