#include "runtime/backend/cpu/ops.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/backend/cpu/simd_avx2.h"
#include "runtime/base/half.h"
#include "runtime/base/thread_pool.h"

namespace qshard::cpu {
namespace {

std::atomic<bool> g_simd_enabled{true};

bool CpuHasAvx2Fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return has;
}

inline bool UseAvx2() { return g_simd_enabled.load(std::memory_order_relaxed) && CpuHasAvx2Fma(); }

// Converts n elements of a bf16/f16/f32 row to fp32 (portable path).
void RowToFloatScalar(DType dt, const void* src, int64_t n, float* dst) {
  switch (dt) {
    case DType::kF32:
      std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToF32(s[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = F16ToF32(s[i]);
      return;
    }
    default:
      assert(false && "RowToFloat: unsupported dtype");
  }
}

// ---------------------------------------------------------------------------
// AVX2 / FMA kernels (compiled for that target, called only when the CPU has it).
// ---------------------------------------------------------------------------
using simd::HSum;
using simd::LoadBf16x8;
using simd::LoadF16x8;

template <DType kDt>
QSHARD_AVX2 inline __m256 LoadW8(const void* base, int64_t i) {
  if constexpr (kDt == DType::kBF16) {
    return LoadBf16x8(static_cast<const uint16_t*>(base) + i);
  } else if constexpr (kDt == DType::kF16) {
    return LoadF16x8(static_cast<const uint16_t*>(base) + i);
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  }
}

template <DType kDt>
inline float LoadW1(const void* base, int64_t i) {
  if constexpr (kDt == DType::kBF16) {
    return Bf16ToF32(static_cast<const uint16_t*>(base)[i]);
  } else if constexpr (kDt == DType::kF16) {
    return F16ToF32(static_cast<const uint16_t*>(base)[i]);
  } else {
    return static_cast<const float*>(base)[i];
  }
}

QSHARD_AVX2 void RowToFloatAvx2(DType dt, const void* src, int64_t n, float* dst) {
  int64_t i = 0;
  if (dt == DType::kBF16) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LoadW8<DType::kBF16>(src, i));
  } else if (dt == DType::kF16) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LoadW8<DType::kF16>(src, i));
  }
  if (i < n) {
    size_t esz = DTypeSize(dt);
    RowToFloatScalar(dt, static_cast<const uint8_t*>(src) + i * esz, n - i, dst + i);
  }
}

QSHARD_AVX2 float DotAvx2(const float* a, const float* b, int64_t n) { return simd::Dot(a, b, n); }

QSHARD_AVX2 void AxpyAvx2(float alpha, const float* x, float* y, int64_t n) {
  __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Decode-sized GEMV: y[m, j] for j in [n0, n1) with m <= 4, reading weights in their
// stored dtype (no conversion buffer: each weight byte is touched once, from memory).
template <DType kDt, int kM>
QSHARD_AVX2 void GemvRowsAvx2(const float* x, int64_t k, const uint8_t* w, int64_t n0, int64_t n1,
                              const float* bias, float* y, int64_t ldy) {
  const size_t esz = DTypeSize(kDt);
  int64_t j = n0;
  // Two weight rows at a time share every x load.
  for (; j + 2 <= n1; j += 2) {
    const void* w0 = w + j * k * esz;
    const void* w1 = w + (j + 1) * k * esz;
    __m256 acc[kM][2];
    for (int r = 0; r < kM; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      __m256 a = LoadW8<kDt>(w0, i);
      __m256 b = LoadW8<kDt>(w1, i);
      for (int r = 0; r < kM; ++r) {
        __m256 xv = _mm256_loadu_ps(x + r * k + i);
        acc[r][0] = _mm256_fmadd_ps(xv, a, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, b, acc[r][1]);
      }
    }
    for (int r = 0; r < kM; ++r) {
      float s0 = HSum(acc[r][0]), s1 = HSum(acc[r][1]);
      for (int64_t t = i; t < k; ++t) {
        s0 += x[r * k + t] * LoadW1<kDt>(w0, t);
        s1 += x[r * k + t] * LoadW1<kDt>(w1, t);
      }
      if (bias) {
        s0 += bias[j];
        s1 += bias[j + 1];
      }
      y[r * ldy + j] = s0;
      y[r * ldy + j + 1] = s1;
    }
  }
  for (; j < n1; ++j) {
    const void* w0 = w + j * k * esz;
    for (int r = 0; r < kM; ++r) {
      __m256 acc = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 8 <= k; i += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), LoadW8<kDt>(w0, i), acc);
      }
      float s = HSum(acc);
      for (; i < k; ++i) s += x[r * k + i] * LoadW1<kDt>(w0, i);
      y[r * ldy + j] = s + (bias ? bias[j] : 0.0f);
    }
  }
}

// Prefill-sized GEMM microkernel: 4 rows of x against 2 fp32 weight rows (already
// converted into a cache-resident panel). 8 accumulators + 3 live loads fit in 16 ymm.
QSHARD_AVX2 void Micro4x2(const float* x, int64_t k, const float* w0, const float* w1,
                          float out[4][2]) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  const float* x0 = x;
  const float* x1 = x + k;
  const float* x2 = x + 2 * k;
  const float* x3 = x + 3 * k;
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 a = _mm256_loadu_ps(w0 + i);
    __m256 b = _mm256_loadu_ps(w1 + i);
    __m256 v = _mm256_loadu_ps(x0 + i);
    c00 = _mm256_fmadd_ps(v, a, c00);
    c01 = _mm256_fmadd_ps(v, b, c01);
    v = _mm256_loadu_ps(x1 + i);
    c10 = _mm256_fmadd_ps(v, a, c10);
    c11 = _mm256_fmadd_ps(v, b, c11);
    v = _mm256_loadu_ps(x2 + i);
    c20 = _mm256_fmadd_ps(v, a, c20);
    c21 = _mm256_fmadd_ps(v, b, c21);
    v = _mm256_loadu_ps(x3 + i);
    c30 = _mm256_fmadd_ps(v, a, c30);
    c31 = _mm256_fmadd_ps(v, b, c31);
  }
  out[0][0] = HSum(c00);
  out[0][1] = HSum(c01);
  out[1][0] = HSum(c10);
  out[1][1] = HSum(c11);
  out[2][0] = HSum(c20);
  out[2][1] = HSum(c21);
  out[3][0] = HSum(c30);
  out[3][1] = HSum(c31);
  for (; i < k; ++i) {
    for (int r = 0; r < 4; ++r) {
      out[r][0] += x[r * k + i] * w0[i];
      out[r][1] += x[r * k + i] * w1[i];
    }
  }
}

// y[m, n0:n1] for large m: converts kPanel weight rows to fp32 once, then sweeps x in
// blocks of 4 rows. The panel (kPanel x k floats) stays in L1/L2 across the m sweep.
QSHARD_AVX2 void GemmPanelAvx2(const float* x, int64_t m, int64_t k, DType wdt, const uint8_t* w,
                               int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
  constexpr int64_t kPanel = 8;
  const size_t esz = DTypeSize(wdt);
  thread_local std::vector<float> panel;
  panel.resize(kPanel * k);
  for (int64_t j0 = n0; j0 < n1; j0 += kPanel) {
    const int64_t jn = std::min(kPanel, n1 - j0);
    for (int64_t jj = 0; jj < jn; ++jj) {
      RowToFloatAvx2(wdt, w + (j0 + jj) * k * esz, k, panel.data() + jj * k);
    }
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
      int64_t jj = 0;
      for (; jj + 2 <= jn; jj += 2) {
        float out[4][2];
        Micro4x2(x + r * k, k, panel.data() + jj * k, panel.data() + (jj + 1) * k, out);
        for (int rr = 0; rr < 4; ++rr) {
          y[(r + rr) * ldy + j0 + jj] = out[rr][0] + (bias ? bias[j0 + jj] : 0.0f);
          y[(r + rr) * ldy + j0 + jj + 1] = out[rr][1] + (bias ? bias[j0 + jj + 1] : 0.0f);
        }
      }
      for (; jj < jn; ++jj) {
        for (int rr = 0; rr < 4; ++rr) {
          y[(r + rr) * ldy + j0 + jj] =
              DotAvx2(x + (r + rr) * k, panel.data() + jj * k, k) + (bias ? bias[j0 + jj] : 0.0f);
        }
      }
    }
    for (; r < m; ++r) {
      for (int64_t jj = 0; jj < jn; ++jj) {
        y[r * ldy + j0 + jj] =
            DotAvx2(x + r * k, panel.data() + jj * k, k) + (bias ? bias[j0 + jj] : 0.0f);
      }
    }
  }
}

template <DType kDt>
QSHARD_AVX2 void GemvDispatch(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n0,
                              int64_t n1, const float* bias, float* y, int64_t ldy) {
  switch (m) {
    case 1:
      GemvRowsAvx2<kDt, 1>(x, k, w, n0, n1, bias, y, ldy);
      break;
    case 2:
      GemvRowsAvx2<kDt, 2>(x, k, w, n0, n1, bias, y, ldy);
      break;
    case 3:
      GemvRowsAvx2<kDt, 3>(x, k, w, n0, n1, bias, y, ldy);
      break;
    default:
      GemvRowsAvx2<kDt, 4>(x, k, w, n0, n1, bias, y, ldy);
      break;
  }
}

// Portable linear: y[r, j] = sum_i x[r, i] * w[j, i].
void LinearRangeScalar(const float* x, int64_t m, int64_t k, DType wdt, const uint8_t* w,
                       int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
  std::vector<float> row(k);
  const size_t esz = DTypeSize(wdt);
  for (int64_t j = n0; j < n1; ++j) {
    RowToFloatScalar(wdt, w + j * k * esz, k, row.data());
    for (int64_t r = 0; r < m; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < k; ++i) s += x[r * k + i] * row[i];
      y[r * ldy + j] = s + (bias ? bias[j] : 0.0f);
    }
  }
}

void LinearRange(const float* x, int64_t m, int64_t k, DType wdt, const uint8_t* w, int64_t n0,
                 int64_t n1, const float* bias, float* y, int64_t ldy) {
  if (!UseAvx2()) {
    LinearRangeScalar(x, m, k, wdt, w, n0, n1, bias, y, ldy);
    return;
  }
  if (m <= 4) {
    switch (wdt) {
      case DType::kBF16:
        GemvDispatch<DType::kBF16>(x, m, k, w, n0, n1, bias, y, ldy);
        return;
      case DType::kF16:
        GemvDispatch<DType::kF16>(x, m, k, w, n0, n1, bias, y, ldy);
        return;
      default:
        GemvDispatch<DType::kF32>(x, m, k, w, n0, n1, bias, y, ldy);
        return;
    }
  }
  GemmPanelAvx2(x, m, k, wdt, w, n0, n1, bias, y, ldy);
}

}  // namespace

bool HasAvx2() { return UseAvx2(); }
void SetSimdEnabled(bool enabled) { g_simd_enabled = enabled; }

float Dot(const float* a, const float* b, int64_t n) {
  if (UseAvx2()) return DotAvx2(a, b, n);
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void Axpy(float alpha, const float* x, float* y, int64_t n) {
  if (UseAvx2()) return AxpyAvx2(alpha, x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void ToFloat(const Tensor& t, float* out) {
  if (UseAvx2()) {
    RowToFloatAvx2(t.dtype(), t.raw(), t.numel(), out);
  } else {
    RowToFloatScalar(t.dtype(), t.raw(), t.numel(), out);
  }
}

void Embedding(const Tensor& table, const int32_t* ids, int64_t n, float* out) {
  const int64_t hidden = table.dim(1);
  const size_t row_bytes = hidden * DTypeSize(table.dtype());
  const uint8_t* base = static_cast<const uint8_t*>(table.raw());
  for (int64_t t = 0; t < n; ++t) {
    assert(ids[t] >= 0 && ids[t] < table.dim(0));
    const void* row = base + static_cast<size_t>(ids[t]) * row_bytes;
    if (UseAvx2()) {
      RowToFloatAvx2(table.dtype(), row, hidden, out + t * hidden);
    } else {
      RowToFloatScalar(table.dtype(), row, hidden, out + t * hidden);
    }
  }
}

void RmsNorm(const float* x, const Tensor& weight, float eps, int64_t n, int64_t d, float* out) {
  std::vector<float> w(d);
  ToFloat(weight, w.data());
  for (int64_t t = 0; t < n; ++t) {
    const float* xr = x + t * d;
    float* o = out + t * d;
    // Sum of squares in double: the reference computes in fp32 but a wider sum only
    // brings us closer to the exact value (error << the 1e-3 logit tolerance).
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    float inv = 1.0f / std::sqrt(static_cast<float>(ss / d) + eps);
    for (int64_t i = 0; i < d; ++i) o[i] = (xr[i] * inv) * w[i];
  }
}

void AddRmsNorm(float* residual, const float* x, const Tensor& weight, float eps, int64_t n,
                int64_t d, float* out) {
  for (int64_t i = 0; i < n * d; ++i) residual[i] += x[i];
  RmsNorm(residual, weight, eps, n, d, out);
}

void Linear(const float* x, int64_t m, const Tensor& w, const Tensor* bias, float* y) {
  const int64_t n = w.dim(0);
  const int64_t k = w.dim(1);
  std::vector<float> b;
  if (bias != nullptr && !bias->empty()) {
    b.resize(n);
    ToFloat(*bias, b.data());
  }
  const float* bp = b.empty() ? nullptr : b.data();
  const uint8_t* wp = static_cast<const uint8_t*>(w.raw());
  const DType wdt = w.dtype();
  auto run_rows = [&](int64_t r0, int64_t r1) {
    // Each thread owns a slice of output features, so the weights are streamed once
    // in total; decode (m <= 4) is bound by that stream.
    ThreadPool::Global().ParallelFor(
        n,
        [&](int64_t n0, int64_t n1) {
          LinearRange(x + r0 * k, r1 - r0, k, wdt, wp, n0, n1, bp, y + r0 * n, n);
        },
        /*min_chunk=*/16);
  };
  if (m <= 4) {
    run_rows(0, m);
    return;
  }
  // Large m: bound the x block so it stays cache resident while the panel sweeps it.
  const int64_t kRowBlock = std::max<int64_t>(4, (256 * 1024 / 4) / std::max<int64_t>(k, 1) / 4 * 4);
  for (int64_t r0 = 0; r0 < m; r0 += kRowBlock) run_rows(r0, std::min(m, r0 + kRowBlock));
}

void SiluMul(const float* gate, const float* up, int64_t n, int64_t d, float* out) {
  for (int64_t i = 0; i < n * d; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace qshard::cpu
