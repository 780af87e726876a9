#include "runtime/backend/cpu/gemm.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>

#include "runtime/backend/cpu/isa.h"
#include "runtime/backend/cpu/simd_avx2.h"
#include "runtime/backend/cpu/simd_avx512.h"
#include "runtime/base/thread_pool.h"

namespace qshard::cpu {
namespace {

// Output features packed per block before the row sweep: the packed block (kNcFeatures x
// kGemmKBlock fp32 = 128 KiB) stays in L2 while every row tile of x runs against it; one
// kNr-wide panel of it (16-32 KiB) is what a microkernel call streams from L1/L2.
constexpr int64_t kNcFeatures = 128;

// Signature of a microkernel: c[r, 0:ncols] (+)= a[r, 0:kc] . panel for its row count,
// where panel is [kc][kNr] fp32 (columns >= ncols are zero padding). first: the tile is
// written (plus bias[0:ncols] when bias is not null) instead of accumulated into.
using MicroFn = void (*)(const float* a, int64_t lda, const float* b, int64_t kc, float* c,
                         int64_t ldc, int64_t ncols, bool first, const float* bias);

// Per-thread scratch, 64-byte aligned, grown on demand and kept across calls (no allocation
// per linear).
class Scratch {
 public:
  float* Get(size_t floats) {
    if (floats > cap_) {
      const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
      buf_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      cap_ = floats;
    }
    return buf_.get();
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> buf_;
  size_t cap_ = 0;
};

// ---------------------------------------------------------------------------
// Packing: rows [nr][kc] (row stride lds) -> panel [kc][nr].
// ---------------------------------------------------------------------------

QSHARD_AVX2 inline void Transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// dst[i * nr + j] = src[j * lds + i] for j < nr (a multiple of 8), i < kc.
QSHARD_AVX2 void InterleaveAvx2(const float* src, int64_t lds, int64_t kc, int nr, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= kc; i += 8) {
    for (int j = 0; j < nr; j += 8) {
      __m256 r[8];
      for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(src + (j + t) * lds + i);
      Transpose8x8(r);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(dst + (i + t) * nr + j, r[t]);
    }
  }
  for (; i < kc; ++i) {
    for (int j = 0; j < nr; ++j) dst[i * nr + j] = src[j * lds + i];
  }
}

// ---------------------------------------------------------------------------
// Microkernels.
// ---------------------------------------------------------------------------

// AVX2: kRows (<= 6) rows x 16 features; 12 accumulators + 2 panel loads + 1 broadcast.
template <int kRows>
QSHARD_AVX2 void MicroAvx2(const float* a, int64_t lda, const float* b, int64_t kc, float* c,
                           int64_t ldc, int64_t ncols, bool first, const float* bias) {
  // Every loop over the accumulators is fully unrolled (pragmas) so that GCC keeps them in
  // registers; an accumulator array indexed in a rolled loop is spilled to the stack on
  // every k step, which halves the throughput.
  __m256 acc[kRows][2];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 2
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_load_ps(b + kk * 16);
    const __m256 b1 = _mm256_load_ps(b + kk * 16 + 8);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + kk);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  alignas(32) float tile[kRows][16];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    _mm256_store_ps(tile[r], acc[r][0]);
    _mm256_store_ps(tile[r] + 8, acc[r][1]);
  }
  if (ncols == 16) {
    for (int r = 0; r < kRows; ++r) {
      float* cr = c + r * ldc;
      for (int h = 0; h < 16; h += 8) {
        __m256 v = _mm256_load_ps(tile[r] + h);
        if (!first) {
          v = _mm256_add_ps(_mm256_loadu_ps(cr + h), v);
        } else if (bias != nullptr) {
          v = _mm256_add_ps(_mm256_loadu_ps(bias + h), v);
        }
        _mm256_storeu_ps(cr + h, v);
      }
    }
    return;
  }
  for (int r = 0; r < kRows; ++r) {
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < ncols; ++j) {
      cr[j] = first ? tile[r][j] + (bias != nullptr ? bias[j] : 0.0f) : cr[j] + tile[r][j];
    }
  }
}

// AVX-512: kRows (<= 12) rows x 32 features; 24 accumulators + 2 panel loads, the row
// value is a broadcast memory operand of the FMA.
template <int kRows>
QSHARD_AVX512 void MicroAvx512(const float* a, int64_t lda, const float* b, int64_t kc, float* c,
                               int64_t ldc, int64_t ncols, bool first, const float* bias) {
  __m512 acc[kRows][2];
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m512 b0 = _mm512_load_ps(b + kk * 32);
    const __m512 b1 = _mm512_load_ps(b + kk * 32 + 16);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
      acc[r][0] = _mm512_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32   ? 0xFFFF
                       : ncols <= 16 ? 0
                                     : static_cast<__mmask16>((1u << (ncols - 16)) - 1);
#pragma GCC unroll 16
  for (int r = 0; r < kRows; ++r) {
    float* cr = c + r * ldc;
    __m512 v0 = acc[r][0], v1 = acc[r][1];
    if (!first) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, cr), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, cr + 16), v1);
    } else if (bias != nullptr) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, bias), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, bias + 16), v1);
    }
    _mm512_mask_storeu_ps(cr, m0, v0);
    _mm512_mask_storeu_ps(cr + 16, m1, v1);
  }
}

template <size_t... I>
constexpr std::array<MicroFn, sizeof...(I)> Avx2Table(std::index_sequence<I...>) {
  return {&MicroAvx2<static_cast<int>(I) + 1>...};
}
template <size_t... I>
constexpr std::array<MicroFn, sizeof...(I)> Avx512Table(std::index_sequence<I...>) {
  return {&MicroAvx512<static_cast<int>(I) + 1>...};
}

constexpr int kMrAvx2 = 6, kNrAvx2 = 16;
constexpr int kMrAvx512 = 12, kNrAvx512 = 32;
constexpr auto kMicroAvx2 = Avx2Table(std::make_index_sequence<kMrAvx2>());
constexpr auto kMicroAvx512 = Avx512Table(std::make_index_sequence<kMrAvx512>());

struct KernelSet {
  int mr, nr;
  const MicroFn* micro;  // [mr]: micro[rows - 1]
};

// Output-feature panels [p0, p1) of width ks.nr: pack each (block of features, block of K)
// once, then sweep all m rows against it.
void GemmPanels(const KernelSet& ks, const WeightPanelSource& w, const float* x, int64_t ldx,
                int64_t m, int64_t k, int64_t n, const float* bias, float* y, int64_t ldy,
                int64_t p0, int64_t p1) {
  thread_local Scratch rows_buf, packed_buf;
  const int nr = ks.nr;
  const int64_t panels_per_block = std::max<int64_t>(1, kNcFeatures / nr);
  float* rows = rows_buf.Get(static_cast<size_t>(nr * kGemmKBlock));
  float* packed = packed_buf.Get(static_cast<size_t>(panels_per_block * nr * kGemmKBlock));
  for (int64_t pb = p0; pb < p1; pb += panels_per_block) {
    const int64_t np = std::min(panels_per_block, p1 - pb);
    for (int64_t k0 = 0; k0 < k; k0 += kGemmKBlock) {
      const int64_t kc = std::min(kGemmKBlock, k - k0);
      for (int64_t q = 0; q < np; ++q) {
        const int64_t col0 = (pb + q) * nr;
        const int64_t count = std::min<int64_t>(nr, n - col0);
        w.Dequant(col0, count, k0, k0 + kc, rows, kGemmKBlock);
        for (int64_t j = count; j < nr; ++j) {
          std::memset(rows + j * kGemmKBlock, 0, sizeof(float) * kc);
        }
        InterleaveAvx2(rows, kGemmKBlock, kc, nr, packed + q * nr * kGemmKBlock);
      }
      const bool first = k0 == 0;
      for (int64_t r0 = 0; r0 < m; r0 += ks.mr) {
        const MicroFn micro = ks.micro[std::min<int64_t>(ks.mr, m - r0) - 1];
        for (int64_t q = 0; q < np; ++q) {
          const int64_t col0 = (pb + q) * nr;
          micro(x + r0 * ldx + k0, ldx, packed + q * nr * kGemmKBlock, kc, y + r0 * ldy + col0, ldy,
                std::min<int64_t>(nr, n - col0), first, bias != nullptr ? bias + col0 : nullptr);
        }
      }
    }
  }
}

}  // namespace

void PackedGemm(const WeightPanelSource& w, const float* x, int64_t ldx, int64_t m, int64_t k,
                int64_t n, const float* bias, float* y, int64_t ldy) {
  assert(ActiveIsa() != Isa::kScalar);
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {  // empty sum: y = bias
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < n; ++j) y[r * ldy + j] = bias != nullptr ? bias[j] : 0.0f;
    }
    return;
  }
  const KernelSet ks = ActiveIsa() == Isa::kAvx512
                           ? KernelSet{kMrAvx512, kNrAvx512, kMicroAvx512.data()}
                           : KernelSet{kMrAvx2, kNrAvx2, kMicroAvx2.data()};
  const int64_t panels = (n + ks.nr - 1) / ks.nr;
  ThreadPool::Global().ParallelFor(
      panels,
      [&](int64_t p0, int64_t p1) { GemmPanels(ks, w, x, ldx, m, k, n, bias, y, ldy, p0, p1); },
      /*min_chunk=*/1);
}

}  // namespace qshard::cpu
