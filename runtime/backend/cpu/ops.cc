#include "runtime/backend/cpu/ops.h"

#include <immintrin.h>

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/backend/cpu/gemm.h"
#include "runtime/backend/cpu/isa.h"
#include "runtime/backend/cpu/simd_avx2.h"
#include "runtime/backend/cpu/simd_avx512.h"
#include "runtime/base/half.h"
#include "runtime/base/thread_pool.h"

namespace qshard::cpu {
namespace {

inline bool UseAvx2() { return ActiveIsa() != Isa::kScalar; }
inline bool UseAvx512() { return ActiveIsa() == Isa::kAvx512; }

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

// 8 rows at a time: one accumulator per row, and the 8 horizontal sums done together
// (two rounds of hadd, one 128-bit swap) instead of one HSum per row.
QSHARD_AVX2 void DotRowsAvx2(const float* q, int64_t rows, const float* k, int64_t d, float scale,
                             float* out) {
  int64_t r = 0;
  if (d % 8 == 0) {
    for (; r + 8 <= rows; r += 8) {
      __m256 acc[8];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 kv = _mm256_loadu_ps(k + i);
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          acc[t] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (r + t) * d + i), kv, acc[t]);
        }
      }
      // h01 = [a0 01, a0 23, a1 01, a1 23 | a0 45, a0 67, a1 45, a1 67] (pair sums), ...
      const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
      const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
      // q0 = [a0 0-3, a1 0-3, a2 0-3, a3 0-3 | the same over lanes 4-7].
      const __m256 q0 = _mm256_hadd_ps(h01, h23), q1 = _mm256_hadd_ps(h45, h67);
      const __m256 sum =
          _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
      _mm256_storeu_ps(out + r, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
  }
  for (; r < rows; ++r) out[r] = simd::Dot(q + r * d, k, d) * scale;
}

QSHARD_AVX2 void AxpyRowsAvx2(const float* p, int64_t p_stride, const float* v, int64_t rows,
                              int64_t d, float* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const float alpha = p[r * p_stride];
    const __m256 va = _mm256_set1_ps(alpha);
    float* y = acc + r * d;
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(v + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < d; ++i) y[i] += alpha * v[i];
  }
}

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
// One weight row at a time, so each thread reads one sequential weight stream: interleaving
// the rows of several output features (4 streams) measured ~1.5x slower on the dev machine,
// the hardware prefetchers follow one stream much better. kChains accumulators per row of x
// along K cover the FMA latency (kChains * kM accumulators + 1 weight + 1 x vector <= 16).
template <DType kDt, int kM>
QSHARD_AVX2 void GemvRowsAvx2(const float* x, int64_t k, const uint8_t* w, int64_t n0, int64_t n1,
                              const float* bias, float* y, int64_t ldy) {
  constexpr int kChains = kM <= 2 ? 4 : 2;
  const size_t esz = DTypeSize(kDt);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* wr = w + j * k * esz;
    __m256 acc[kChains][kM];
#pragma GCC unroll 4
    for (int h = 0; h < kChains; ++h) {
#pragma GCC unroll 4
      for (int r = 0; r < kM; ++r) acc[h][r] = _mm256_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 8 * kChains <= k; i += 8 * kChains) {
#pragma GCC unroll 4
      for (int h = 0; h < kChains; ++h) {
        const __m256 wv = LoadW8<kDt>(wr, i + 8 * h);
#pragma GCC unroll 4
        for (int r = 0; r < kM; ++r) {
          acc[h][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 8 * h), wv, acc[h][r]);
        }
      }
    }
    for (; i + 8 <= k; i += 8) {
      const __m256 wv = LoadW8<kDt>(wr, i);
#pragma GCC unroll 4
      for (int r = 0; r < kM; ++r) {
        acc[0][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i), wv, acc[0][r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kM; ++r) {
      __m256 sum = acc[0][r];
#pragma GCC unroll 4
      for (int h = 1; h < kChains; ++h) sum = _mm256_add_ps(sum, acc[h][r]);
      float s = HSum(sum);
      for (int64_t u = i; u < k; ++u) s += x[r * k + u] * LoadW1<kDt>(wr, u);
      y[r * ldy + j] = s + (bias ? bias[j] : 0.0f);
    }
  }
}

// 16 weights from element i of a row, lanes >= valid (< 16) read as zero.
template <DType kDt>
QSHARD_AVX512 inline __m512 LoadW16(const void* base, int64_t i, __mmask16 valid) {
  if constexpr (kDt == DType::kF32) {
    return _mm512_maskz_loadu_ps(valid, static_cast<const float*>(base) + i);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(valid, static_cast<const uint16_t*>(base) + i);
    if constexpr (kDt == DType::kBF16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// AVX-512 GEMV: GemvRowsAvx2 with 16 lanes (32 registers: 4 chains for every m) and a
// masked tail instead of a scalar one.
template <DType kDt, int kM>
QSHARD_AVX512 void GemvRowsAvx512(const float* x, int64_t k, const uint8_t* w, int64_t n0,
                                  int64_t n1, const float* bias, float* y, int64_t ldy) {
  constexpr int kChains = 4;
  const size_t esz = DTypeSize(kDt);
  const int64_t tail = k % 16;
  const __mmask16 tail_mask = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t j = n0; j < n1; ++j) {
    const uint8_t* wr = w + j * k * esz;
    __m512 acc[kChains][kM];
#pragma GCC unroll 4
    for (int h = 0; h < kChains; ++h) {
#pragma GCC unroll 4
      for (int r = 0; r < kM; ++r) acc[h][r] = _mm512_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 16 * kChains <= k; i += 16 * kChains) {
#pragma GCC unroll 4
      for (int h = 0; h < kChains; ++h) {
        const __m512 wv = LoadW16<kDt>(wr, i + 16 * h, 0xFFFF);
#pragma GCC unroll 4
        for (int r = 0; r < kM; ++r) {
          acc[h][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i + 16 * h), wv, acc[h][r]);
        }
      }
    }
    for (; i + 16 <= k; i += 16) {
      const __m512 wv = LoadW16<kDt>(wr, i, 0xFFFF);
#pragma GCC unroll 4
      for (int r = 0; r < kM; ++r) {
        acc[0][r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * k + i), wv, acc[0][r]);
      }
    }
    if (tail != 0) {
      const __m512 wv = LoadW16<kDt>(wr, i, tail_mask);
#pragma GCC unroll 4
      for (int r = 0; r < kM; ++r) {
        acc[0][r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail_mask, x + r * k + i), wv, acc[0][r]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kM; ++r) {
      __m512 sum = acc[0][r];
#pragma GCC unroll 4
      for (int h = 1; h < kChains; ++h) sum = _mm512_add_ps(sum, acc[h][r]);
      y[r * ldy + j] = _mm512_reduce_add_ps(sum) + (bias ? bias[j] : 0.0f);
    }
  }
}

template <DType kDt>
void GemvDispatch(const float* x, int64_t m, int64_t k, const uint8_t* w, int64_t n0, int64_t n1,
                  const float* bias, float* y, int64_t ldy) {
  if (UseAvx512()) {
    switch (m) {
      case 1:
        return GemvRowsAvx512<kDt, 1>(x, k, w, n0, n1, bias, y, ldy);
      case 2:
        return GemvRowsAvx512<kDt, 2>(x, k, w, n0, n1, bias, y, ldy);
      case 3:
        return GemvRowsAvx512<kDt, 3>(x, k, w, n0, n1, bias, y, ldy);
      default:
        return GemvRowsAvx512<kDt, 4>(x, k, w, n0, n1, bias, y, ldy);
    }
  }
  switch (m) {
    case 1:
      return GemvRowsAvx2<kDt, 1>(x, k, w, n0, n1, bias, y, ldy);
    case 2:
      return GemvRowsAvx2<kDt, 2>(x, k, w, n0, n1, bias, y, ldy);
    case 3:
      return GemvRowsAvx2<kDt, 3>(x, k, w, n0, n1, bias, y, ldy);
    default:
      return GemvRowsAvx2<kDt, 4>(x, k, w, n0, n1, bias, y, ldy);
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

// m <= 4 rows (SIMD) or any m (scalar), output features [n0, n1).
void LinearRange(const float* x, int64_t m, int64_t k, DType wdt, const uint8_t* w, int64_t n0,
                 int64_t n1, const float* bias, float* y, int64_t ldy) {
  if (!UseAvx2()) {
    LinearRangeScalar(x, m, k, wdt, w, n0, n1, bias, y, ldy);
    return;
  }
  switch (wdt) {
    case DType::kBF16:
      return GemvDispatch<DType::kBF16>(x, m, k, w, n0, n1, bias, y, ldy);
    case DType::kF16:
      return GemvDispatch<DType::kF16>(x, m, k, w, n0, n1, bias, y, ldy);
    default:
      return GemvDispatch<DType::kF32>(x, m, k, w, n0, n1, bias, y, ldy);
  }
}

// A dense [N, K] bf16/f16/f32 weight as a GEMM panel source (rows converted to fp32).
class DenseSource : public WeightPanelSource {
 public:
  DenseSource(DType dt, const uint8_t* w, int64_t k) : dt_(dt), w_(w), k_(k) {}
  void Dequant(int64_t n0, int64_t count, int64_t k0, int64_t k1, float* out,
               int64_t ldo) const override {
    const size_t esz = DTypeSize(dt_);
    for (int64_t j = 0; j < count; ++j) {
      RowToFloatAvx2(dt_, w_ + ((n0 + j) * k_ + k0) * esz, k1 - k0, out + j * ldo);
    }
  }

 private:
  DType dt_;
  const uint8_t* w_;
  int64_t k_;
};

}  // namespace

bool HasAvx2() { return UseAvx2(); }
void SetSimdEnabled(bool enabled) { SetIsa(enabled ? DefaultIsa() : Isa::kScalar); }

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

void DotRows(const float* q, int64_t rows, const float* k, int64_t d, float scale, float* out) {
  if (UseAvx2()) return DotRowsAvx2(q, rows, k, d, scale, out);
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; ++i) s += q[r * d + i] * k[i];
    out[r] = s * scale;
  }
}

void AxpyRows(const float* p, int64_t p_stride, const float* v, int64_t rows, int64_t d,
              float* acc) {
  if (UseAvx2()) return AxpyRowsAvx2(p, p_stride, v, rows, d, acc);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < d; ++i) acc[r * d + i] += p[r * p_stride] * v[i];
  }
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
  thread_local std::vector<float> w;  // reused: no allocation per call
  w.resize(d);
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
  if (m > 4 && UseAvx2()) {
    // Prefill: packed GEMM (threads inside), each weight converted to fp32 once per call.
    PackedGemm(DenseSource(wdt, wp, k), x, k, m, k, n, bp, y, n);
    return;
  }
  // Decode (or the scalar path): each thread owns a slice of output features, so the
  // weights are streamed once in total; decode is bound by that stream.
  ThreadPool::Global().ParallelFor(
      n, [&](int64_t n0, int64_t n1) { LinearRange(x, m, k, wdt, wp, n0, n1, bp, y, n); },
      /*min_chunk=*/16);
}

void SiluMul(const float* gate, const float* up, int64_t n, int64_t d, float* out) {
  for (int64_t i = 0; i < n * d; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void SiluMulPacked(const float* gate_up, int64_t n, int64_t d, float* out) {
  for (int64_t r = 0; r < n; ++r) {
    SiluMul(gate_up + r * 2 * d, gate_up + r * 2 * d + d, 1, d, out + r * d);
  }
}

void SplitColumns(const float* x, int64_t n, const int64_t* cols, float* const* outs,
                  int64_t num_outs) {
  int64_t width = 0;
  for (int64_t i = 0; i < num_outs; ++i) width += cols[i];
  for (int64_t r = 0; r < n; ++r) {
    const float* src = x + r * width;
    for (int64_t i = 0; i < num_outs; ++i) {
      std::memcpy(outs[i] + r * cols[i], src, static_cast<size_t>(cols[i]) * sizeof(float));
      src += cols[i];
    }
  }
}

}  // namespace qshard::cpu
