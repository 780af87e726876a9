#include "runtime/backend/cpu/quant_linear.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "quant/awq_format.h"
#include "quant/compressed_tensors.h"
#include "quant/fp8.h"
#include "quant/gptq_format.h"
#include "quant/int_quant_matrix.h"
#include "runtime/backend/cpu/gemm.h"
#include "runtime/backend/cpu/isa.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/backend/cpu/simd_avx2.h"
#include "runtime/backend/cpu/simd_avx512.h"
#include "runtime/base/mapped_file.h"
#include "runtime/base/status_macros.h"
#include "runtime/base/thread_pool.h"

namespace qshard::cpu {
namespace {

using simd::HSum;

constexpr int64_t kBlock = 32;       // inputs per code block (one 16-byte 4-bit load)
constexpr int64_t kMaxChunk = 128;   // inputs per int32 accumulation / activation scale
constexpr int64_t kMaxGemvRows = 4;  // rows handled by the decode kernels

// ---------------------------------------------------------------------------
// Prefill (m > kMaxGemvRows): the shared packed fp32 GEMM (gemm.h) with the op as its
// WeightPanelSource, which dequantizes blocks of W into fp32 once per call.
// ---------------------------------------------------------------------------

// Portable path (also the exact reference in tests): one dequantized row at a time.
void PanelGemmScalar(const WeightPanelSource& src, const float* x, int64_t m, int64_t k, int64_t n0,
                     int64_t n1, const float* bias, float* y, int64_t ldy) {
  std::vector<float> row(static_cast<size_t>(k));
  for (int64_t n = n0; n < n1; ++n) {
    src.Dequant(n, 1, 0, k, row.data(), k);
    for (int64_t r = 0; r < m; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < k; ++i) s += x[r * k + i] * row[i];
      y[r * ldy + n] = s + (bias ? bias[n] : 0.0f);
    }
  }
}

// y[m, n] = x[m, k] . W^T + bias; threads over output features.
void PanelGemm(const WeightPanelSource& src, const float* x, int64_t m, int64_t k, int64_t n,
               const float* bias, float* y) {
  if (HasAvx2()) {
    PackedGemm(src, x, k, m, k, n, bias, y, n);
    return;
  }
  ThreadPool::Global().ParallelFor(
      n, [&](int64_t n0, int64_t n1) { PanelGemmScalar(src, x, m, k, n0, n1, bias, y, n); },
      /*min_chunk=*/8);
}

std::vector<float> BiasToFloat(const LinearWeights& w) {
  std::vector<float> b;
  if (w.bias.empty()) return b;
  b.resize(static_cast<size_t>(w.out_features));
  for (int64_t i = 0; i < w.out_features; ++i) b[i] = quant_internal::FloatAt(w.bias, i);
  return b;
}

// ===========================================================================
// Integer formats.
// ===========================================================================

struct Chunk {
  int32_t start = 0;  // in the padded, permuted input order
  int32_t len = 0;    // multiple of kBlock, <= kMaxChunk
};

class IntLinear : public CpuQuantLinear, public WeightPanelSource {
 public:
  static absl::StatusOr<std::unique_ptr<IntLinear>> Create(const LinearWeights& w,
                                                           const IntQuantMatrix& q,
                                                           std::string label, bool int8_act);

  int64_t in_features() const override { return k_; }
  int64_t out_features() const override { return n_; }
  std::string kernel_name() const override {
    return absl::StrCat("cpu-", label_, "-", IsaName(ActiveIsa()));
  }
  int64_t weight_bytes() const override {
    return static_cast<int64_t>(codes_.size() +
                                (scale_.size() + szero_.size() + bias_.size()) * sizeof(float) +
                                perm_.size() * sizeof(int32_t));
  }
  void Run(const float* x, int64_t m, float* y) const override;
  void Dequant(int64_t n0, int64_t count, int64_t k0, int64_t k1, float* out,
               int64_t ldo) const override;

 private:
  int64_t row_bytes() const { return kp_ * bits_ / 8; }
  uint8_t Code(int64_t n, int64_t p) const {
    const uint8_t* row = codes_.data() + n * row_bytes();
    if (bits_ == 8) return row[p];
    const int64_t b = p / kBlock, j = p % kBlock;
    const uint8_t byte = row[b * (kBlock / 2) + (j % 16)];
    return j < 16 ? (byte & 0xF) : (byte >> 4);
  }
  // xp[r, 0:kp] = x[r, perm[p]] (0 for padding); W8A8 first rounds x to int8 per row.
  void GatherActivations(const float* x, int64_t m, std::vector<float>& xp) const;
  void RunGemv(const float* x, int64_t m, float* y) const;

  std::string label_;
  int64_t k_ = 0, n_ = 0, kp_ = 0;  // kp_: padded input count, multiple of kBlock
  int bits_ = 4;
  bool int8_act_ = false;             // W8A8: activations rounded to int8 per token
  bool identity_ = true;              // perm_ is the identity and kp_ == k_
  std::vector<int32_t> perm_;         // [kp] source input of each position, -1 = padding
  std::vector<Chunk> chunks_;         // [C]
  std::vector<int32_t> block_chunk_;  // [kp / kBlock] chunk of each block of kBlock inputs
  std::vector<uint8_t> codes_;        // [N, kp * bits / 8]
  std::vector<float> scale_;          // [N, C]
  std::vector<float> szero_;          // [N, C] scale * zero (subtracted times sum(x) of the chunk)
  std::vector<float> bias_;           // [N] or empty
};

absl::StatusOr<std::unique_ptr<IntLinear>> IntLinear::Create(const LinearWeights& w,
                                                             const IntQuantMatrix& q,
                                                             std::string label, bool int8_act) {
  auto op = std::make_unique<IntLinear>();
  op->label_ = std::move(label);
  op->k_ = q.in_features;
  op->n_ = q.out_features;
  op->bits_ = q.bits;
  op->int8_act_ = int8_act;
  const int64_t K = q.in_features, N = q.out_features;
  // Input order: sorted by group (stable), so act-order groups become contiguous runs.
  std::vector<int32_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return q.g_idx[a] < q.g_idx[b]; });
  // Runs of one group, cut into chunks of <= kMaxChunk, each padded to whole blocks.
  std::vector<int32_t> chunk_group;
  for (int64_t i = 0; i < K;) {
    const int32_t g = q.g_idx[order[i]];
    int64_t end = i;
    while (end < K && q.g_idx[order[end]] == g) ++end;
    for (int64_t s = i; s < end; s += kMaxChunk) {
      const int64_t len = std::min(kMaxChunk, end - s);
      const int64_t padded = (len + kBlock - 1) / kBlock * kBlock;
      Chunk c;
      c.start = static_cast<int32_t>(op->perm_.size());
      c.len = static_cast<int32_t>(padded);
      for (int64_t t = 0; t < padded; ++t) {
        op->perm_.push_back(t < len ? order[s + t] : -1);
      }
      op->chunks_.push_back(c);
      chunk_group.push_back(g);
    }
    i = end;
  }
  op->kp_ = static_cast<int64_t>(op->perm_.size());
  for (size_t c = 0; c < op->chunks_.size(); ++c) {
    for (int32_t b = 0; b < op->chunks_[c].len / kBlock; ++b) {
      op->block_chunk_.push_back(static_cast<int32_t>(c));
    }
  }
  op->identity_ = op->kp_ == K;
  for (int64_t p = 0; op->identity_ && p < K; ++p) op->identity_ = op->perm_[p] == p;
  if (op->identity_) op->perm_.clear();  // nothing to gather: keep no table

  const int64_t C = static_cast<int64_t>(op->chunks_.size());
  op->codes_.assign(static_cast<size_t>(N * op->row_bytes()), 0);
  op->scale_.resize(static_cast<size_t>(N * C));
  op->szero_.resize(static_cast<size_t>(N * C));
  for (int64_t n = 0; n < N; ++n) {
    uint8_t* row = op->codes_.data() + n * op->row_bytes();
    const uint8_t* src = q.codes.data() + n * K;
    for (int64_t p = 0; p < op->kp_; ++p) {
      const int32_t k = op->identity_ ? static_cast<int32_t>(p) : op->perm_[p];
      // Padding gets code 0: its activation is 0, and the chunk's sum(x) excludes it.
      const uint8_t code = k >= 0 ? src[k] : 0;
      if (op->bits_ == 8) {
        row[p] = code;
      } else {
        const int64_t b = p / kBlock, j = p % kBlock;
        row[b * (kBlock / 2) + (j % 16)] |= static_cast<uint8_t>(j < 16 ? code : code << 4);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t g = chunk_group[c];
      const float s = q.scales[g * N + n];
      op->scale_[n * C + c] = s;
      op->szero_[n * C + c] = s * q.zeros[g * N + n];
    }
  }
  op->bias_ = BiasToFloat(w);
  return op;
}

// ---- decode kernel: int16 activations x 4/8-bit codes with pmaddwd ----

// Activations of the decode kernel: int16 codes with one scale per (row, chunk).
struct Int16Acts {
  std::vector<int16_t> q;    // [m, kp]
  std::vector<int8_t> q8;    // [m, kp] the same codes as int8 (W8A8 with VNNI only)
  std::vector<float> scale;  // [m, C]
  std::vector<float> sum;    // [m, C] sum of the dequantized activations of the chunk
};

template <int kBits, int kM>
QSHARD_AVX2 void IntGemvAvx2(const uint8_t* codes, int64_t row_bytes, const Chunk* chunks,
                             int64_t C, const float* scale, const float* szero, const Int16Acts& a,
                             int64_t kp, int64_t n0, int64_t n1, const float* bias, float* y,
                             int64_t ldy) {
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    __m256 accf[kM];
    float zt[kM];
    for (int r = 0; r < kM; ++r) {
      accf[r] = _mm256_setzero_ps();
      zt[r] = 0.0f;
    }
    for (int64_t c = 0; c < C; ++c) {
      __m256i acc[kM];
      for (int r = 0; r < kM; ++r) acc[r] = _mm256_setzero_si256();
      const int64_t end = chunks[c].start + chunks[c].len;
      for (int64_t p = chunks[c].start; p < end; p += kBlock) {
        __m256i w0, w1;
        if constexpr (kBits == 4) {
          // 16 bytes = 32 codes: low nibbles are inputs p..p+15, high nibbles p+16..p+31.
          const __m256i b =
              _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p / 2)));
          w0 = _mm256_and_si256(b, low4);
          w1 = _mm256_srli_epi16(b, 4);
        } else {
          w0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p)));
          w1 =
              _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p + 16)));
        }
        for (int r = 0; r < kM; ++r) {
          const int16_t* xr = a.q.data() + r * kp + p;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16));
          // |code| <= 255, |x| <= 32767: a pair sum < 2^24, a chunk (<= 128 inputs, 8 pair
          // sums per lane) < 2^27: no int32 overflow.
          acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w0, x0));
          acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(w1, x1));
        }
      }
      const float s = scale[n * C + c];
      const float sz = szero[n * C + c];
      for (int r = 0; r < kM; ++r) {
        accf[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]),
                                  _mm256_set1_ps(s * a.scale[r * C + c]), accf[r]);
        zt[r] += sz * a.sum[r * C + c];
      }
    }
    for (int r = 0; r < kM; ++r) {
      y[r * ldy + n] = HSum(accf[r]) - zt[r] + (bias ? bias[n] : 0.0f);
    }
  }
}

// AVX-512 + VNNI decode kernel, same contract as IntGemvAvx2. kBytes (8-bit codes with
// int8 W8A8 activations): vpdpbusd multiplies 64 unsigned codes by 64 signed int8
// activations per instruction. Otherwise the codes are widened to int16 (a 4-bit block of
// 32 codes becomes one zmm in input order: low nibbles then high nibbles) and vpdpwssd
// multiplies them with the int16 activations, 32 per instruction.
//
// One output feature at a time, so each thread reads one sequential stream of codes (four
// interleaved row streams measured ~2x slower here: the hardware prefetchers follow one
// stream much better). VNNI's multiply-add has a 4-5 cycle latency, so the inputs of a
// chunk are spread over kChains independent accumulators per row of x.
// Overflow: per int32 lane and chunk (<= 128 inputs) at most 8 products of <= 255 * 32767.
template <int kBits, int kM, bool kBytes>
QSHARD_AVX512_VNNI void IntGemvAvx512(const uint8_t* codes, int64_t row_bytes, const Chunk* chunks,
                                      int64_t C, const float* scale, const float* szero,
                                      const Int16Acts& a, int64_t kp, int64_t n0, int64_t n1,
                                      const float* bias, float* y, int64_t ldy) {
  constexpr int kChains = kM >= 3 ? 1 : kBytes ? 2 : 4 / kM;
  constexpr int64_t kStep = kBytes ? 64 : kBlock;  // inputs per instruction
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    __m512 accf[kM];
    float zt[kM];
#pragma GCC unroll 4
    for (int r = 0; r < kM; ++r) {
      accf[r] = _mm512_setzero_ps();
      zt[r] = 0.0f;
    }
    for (int64_t c = 0; c < C; ++c) {
      __m512i acc[kChains][kM];
#pragma GCC unroll 4
      for (int h = 0; h < kChains; ++h) {
#pragma GCC unroll 4
        for (int r = 0; r < kM; ++r) acc[h][r] = _mm512_setzero_si512();
      }
      const int64_t end = chunks[c].start + chunks[c].len;
      int64_t p = chunks[c].start;
      // One step: chain h multiplies inputs [q, q + kStep) (q + kStep <= end, or for kBytes
      // a trailing half vector: chunks are whole 32-input blocks).
      auto step = [&](int h, int64_t q) QSHARD_AVX512_VNNI {
        if constexpr (kBytes) {
          const bool full = end - q >= 64;
          const __m512i w = full ? _mm512_loadu_si512(row + q)
                                 : _mm512_zextsi256_si512(_mm256_loadu_si256(
                                       reinterpret_cast<const __m256i*>(row + q)));
#pragma GCC unroll 4
          for (int r = 0; r < kM; ++r) {
            const int8_t* xq = a.q8.data() + r * kp + q;
            const __m512i xv = full ? _mm512_loadu_si512(xq)
                                    : _mm512_zextsi256_si512(
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
            acc[h][r] = _mm512_dpbusd_epi32(acc[h][r], w, xv);
          }
        } else {
          __m512i w;
          if constexpr (kBits == 4) {
            const __m256i b = _mm256_cvtepu8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + q / 2)));
            w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)),
                                   _mm256_srli_epi16(b, 4), 1);
          } else {
            w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + q)));
          }
#pragma GCC unroll 4
          for (int r = 0; r < kM; ++r) {
            const __m512i xv = _mm512_loadu_si512(a.q.data() + r * kp + q);
            acc[h][r] = _mm512_dpwssd_epi32(acc[h][r], w, xv);
          }
        }
      };
      for (; p + kChains * kStep <= end; p += kChains * kStep) {
#pragma GCC unroll 4
        for (int h = 0; h < kChains; ++h) step(h, p + h * kStep);
      }
      for (; p < end; p += kStep) step(0, p);
      const float s = scale[n * C + c];
      const float sz = szero[n * C + c];
#pragma GCC unroll 4
      for (int r = 0; r < kM; ++r) {
        __m512i sum = acc[0][r];
#pragma GCC unroll 4
        for (int h = 1; h < kChains; ++h) sum = _mm512_add_epi32(sum, acc[h][r]);
        accf[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(s * a.scale[r * C + c]),
                                  accf[r]);
        zt[r] += sz * a.sum[r * C + c];
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kM; ++r) {
      y[r * ldy + n] = _mm512_reduce_add_ps(accf[r]) - zt[r] + (bias ? bias[n] : 0.0f);
    }
  }
}

template <int kBits, bool kBytes, int kM>
void IntGemvAvx512M(const uint8_t* codes, int64_t row_bytes, const Chunk* chunks, int64_t C,
                    const float* scale, const float* szero, const Int16Acts& a, int64_t kp,
                    int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
  IntGemvAvx512<kBits, kM, kBytes>(codes, row_bytes, chunks, C, scale, szero, a, kp, n0, n1, bias,
                                   y, ldy);
}

// The decode kernel for the active ISA. bytes: int8 codes x int8 activations (a.q8).
template <int kBits>
void IntGemvDispatch(int64_t m, bool avx512, bool bytes, const uint8_t* codes, int64_t row_bytes,
                     const Chunk* chunks, int64_t C, const float* scale, const float* szero,
                     const Int16Acts& a, int64_t kp, int64_t n0, int64_t n1, const float* bias,
                     float* y, int64_t ldy) {
#define QSHARD_INT_GEMV_ARGS codes, row_bytes, chunks, C, scale, szero, a, kp, n0, n1, bias, y, ldy
  if (avx512) {
    if (kBits == 8 && bytes) {
      switch (m) {
        case 1:
          return IntGemvAvx512M<kBits, true, 1>(QSHARD_INT_GEMV_ARGS);
        case 2:
          return IntGemvAvx512M<kBits, true, 2>(QSHARD_INT_GEMV_ARGS);
        case 3:
          return IntGemvAvx512M<kBits, true, 3>(QSHARD_INT_GEMV_ARGS);
        default:
          return IntGemvAvx512M<kBits, true, 4>(QSHARD_INT_GEMV_ARGS);
      }
    }
    switch (m) {
      case 1:
        return IntGemvAvx512M<kBits, false, 1>(QSHARD_INT_GEMV_ARGS);
      case 2:
        return IntGemvAvx512M<kBits, false, 2>(QSHARD_INT_GEMV_ARGS);
      case 3:
        return IntGemvAvx512M<kBits, false, 3>(QSHARD_INT_GEMV_ARGS);
      default:
        return IntGemvAvx512M<kBits, false, 4>(QSHARD_INT_GEMV_ARGS);
    }
  }
  switch (m) {
    case 1:
      return IntGemvAvx2<kBits, 1>(QSHARD_INT_GEMV_ARGS);
    case 2:
      return IntGemvAvx2<kBits, 2>(QSHARD_INT_GEMV_ARGS);
    case 3:
      return IntGemvAvx2<kBits, 3>(QSHARD_INT_GEMV_ARGS);
    default:
      return IntGemvAvx2<kBits, 4>(QSHARD_INT_GEMV_ARGS);
  }
#undef QSHARD_INT_GEMV_ARGS
}

// max |x[i]| over n floats.
QSHARD_AVX2 float AbsMaxAvx2(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float r = 0.0f;
  for (float v : lanes) r = std::max(r, v);
  for (; i < n; ++i) r = std::max(r, std::fabs(x[i]));
  return r;
}

// q[i] = clamp(round_half_even(divide ? x[i] / s : x[i] * s), -qmax, qmax) for n (a
// multiple of 16) inputs, as int16 and (when q8 is not null) int8; returns sum(q). The
// same IEEE operations as the scalar std::nearbyint(x / s) / (x * inv) forms, so the codes
// are identical to the portable path's.
QSHARD_AVX2 inline __m256i QuantizeX8(const float* p, __m256 vs, bool divide, __m256 lo,
                                      __m256 hi) {
  const __m256 v =
      divide ? _mm256_div_ps(_mm256_loadu_ps(p), vs) : _mm256_mul_ps(_mm256_loadu_ps(p), vs);
  const __m256 r = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
}

QSHARD_AVX2 int64_t QuantizeRowAvx2(const float* x, int64_t n, float s, bool divide, float qmax,
                                    int16_t* q, int8_t* q8) {
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 hi = _mm256_set1_ps(qmax), lo = _mm256_set1_ps(-qmax);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < n; i += 16) {
    const __m256i a = QuantizeX8(x + i, vs, divide, lo, hi);
    const __m256i b = QuantizeX8(x + i + 8, vs, divide, lo, hi);
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
    // packs interleaves 128-bit lanes: [a0-3 b0-3 a4-7 b4-7] -> input order.
    const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), p16);
    if (q8 != nullptr) {
      _mm_storeu_si128(
          reinterpret_cast<__m128i*>(q8 + i),
          _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1)));
    }
  }
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  int64_t total = 0;
  for (int32_t v : lanes) total += v;
  return total;
}

// xr[0:n] = clamp(round_half_even(xr / s), -127, 127) * s, the same IEEE operations as
// the scalar form (identical results).
QSHARD_AVX2 void FakeQuantInt8Avx2(float* xr, int64_t n, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xr + i), vs),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_ps(xr + i, _mm256_mul_ps(_mm256_min_ps(_mm256_max_ps(r, lo), hi), vs));
  }
  for (; i < n; ++i) xr[i] = std::clamp(std::nearbyint(xr[i] / s), -127.0f, 127.0f) * s;
}

void IntLinear::GatherActivations(const float* x, int64_t m, std::vector<float>& xp) const {
  xp.resize(static_cast<size_t>(m * kp_));
  const bool simd = HasAvx2();
  // Rows are independent: threaded (prefill gathers [m, kp] per linear).
  ThreadPool::Global().ParallelFor(
      m,
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* xr = x + r * k_;
          float* dst = xp.data() + r * kp_;
          if (identity_) {
            std::memcpy(dst, xr, sizeof(float) * k_);
          } else {
            for (int64_t p = 0; p < kp_; ++p) dst[p] = perm_[p] >= 0 ? xr[perm_[p]] : 0.0f;
          }
          if (!int8_act_) continue;
          // Symmetric int8 per token: scale = amax / 127, q = round_half_even(x / scale).
          float amax = 0.0f;
          if (simd) {
            amax = AbsMaxAvx2(dst, kp_);
          } else {
            for (int64_t p = 0; p < kp_; ++p) amax = std::max(amax, std::fabs(dst[p]));
          }
          const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
          if (simd) {
            FakeQuantInt8Avx2(dst, kp_, s);
            continue;
          }
          for (int64_t p = 0; p < kp_; ++p) {
            dst[p] = std::clamp(std::nearbyint(dst[p] / s), -127.0f, 127.0f) * s;
          }
        }
      },
      /*min_chunk=*/4);
}

void IntLinear::RunGemv(const float* x, int64_t m, float* y) const {
  // Per-thread buffers reused across calls: decode runs ~150 linears per token. (The
  // workers below must see the caller's buffers: a lambda naming a thread_local directly
  // would get its own thread's instance, hence the reference.)
  thread_local std::vector<float> xg;
  thread_local Int16Acts tl_acts;
  Int16Acts& a = tl_acts;
  const int64_t C = static_cast<int64_t>(chunks_.size());
  const bool avx512 = ActiveIsa() == Isa::kAvx512 && CpuHasAvx512Vnni();
  const bool bytes = avx512 && int8_act_ && bits_ == 8;
  // xs[r, 0:kp]: the activations in code order (gathered through perm_, padding 0).
  const float* xs = x;
  if (!identity_) {
    xg.resize(static_cast<size_t>(m * kp_));
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t p = 0; p < kp_; ++p) {
        xg[r * kp_ + p] = perm_[p] >= 0 ? x[r * k_ + perm_[p]] : 0.0f;
      }
    }
    xs = xg.data();
  }
  a.q.resize(static_cast<size_t>(m * kp_));
  if (bytes) a.q8.resize(static_cast<size_t>(m * kp_));
  a.scale.resize(static_cast<size_t>(m * C));
  a.sum.resize(static_cast<size_t>(m * C));
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = xs + r * kp_;
    int16_t* qr = a.q.data() + r * kp_;
    int8_t* q8r = bytes ? a.q8.data() + r * kp_ : nullptr;
    if (int8_act_) {
      // W8A8: symmetric int8 per token, scale = amax / 127, q = round_half_even(x / scale)
      // (the activation quantization of the checkpoint's scheme; exact integers here).
      const float amax = AbsMaxAvx2(xr, kp_);
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      for (int64_t c = 0; c < C; ++c) {
        const Chunk& ch = chunks_[c];
        const int64_t isum = QuantizeRowAvx2(xr + ch.start, ch.len, s, /*divide=*/true, 127.0f,
                                             qr + ch.start, q8r ? q8r + ch.start : nullptr);
        a.scale[r * C + c] = s;
        a.sum[r * C + c] = s * static_cast<float>(isum);
      }
      continue;
    }
    // Weight-only: int16 with each chunk's own scale (see the header comment).
    for (int64_t c = 0; c < C; ++c) {
      const Chunk& ch = chunks_[c];
      const float amax = AbsMaxAvx2(xr + ch.start, ch.len);
      const float s = amax > 0.0f ? amax / 32767.0f : 1.0f;
      const int64_t isum = QuantizeRowAvx2(xr + ch.start, ch.len, 1.0f / s, /*divide=*/false,
                                           32767.0f, qr + ch.start, nullptr);
      a.scale[r * C + c] = s;
      a.sum[r * C + c] = s * static_cast<float>(isum);
    }
  }
  const float* bias = bias_.empty() ? nullptr : bias_.data();
  ThreadPool::Global().ParallelFor(
      n_,
      [&](int64_t n0, int64_t n1) {
        if (bits_ == 4) {
          IntGemvDispatch<4>(m, avx512, bytes, codes_.data(), row_bytes(), chunks_.data(), C,
                             scale_.data(), szero_.data(), a, kp_, n0, n1, bias, y, n_);
        } else {
          IntGemvDispatch<8>(m, avx512, bytes, codes_.data(), row_bytes(), chunks_.data(), C,
                             scale_.data(), szero_.data(), a, kp_, n0, n1, bias, y, n_);
        }
      },
      /*min_chunk=*/16);
}

// out[p - k0] = scale * code - scale * zero for the padded inputs p in [k0, k1) (whole
// blocks of kBlock).
QSHARD_AVX2 void DequantIntRangeAvx2(const uint8_t* row, int bits, const int32_t* block_chunk,
                                     const float* scale, const float* szero, int64_t k0, int64_t k1,
                                     float* out) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t p = k0; p < k1; p += kBlock) {
    const int32_t c = block_chunk[p / kBlock];
    const __m256 s = _mm256_set1_ps(scale[c]);
    const __m256 sz = _mm256_set1_ps(szero[c]);
    __m128i lo, hi;  // codes p..p+15 and p+16..p+31 as bytes
    if (bits == 4) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p / 2));
      lo = _mm_and_si128(b, low4);
      hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
    } else {
      lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p));
      hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + p + 16));
    }
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i) {
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
      _mm256_storeu_ps(out + (p - k0) + 8 * i, _mm256_fmsub_ps(q, s, sz));
    }
  }
}

void IntLinear::Dequant(int64_t n0, int64_t count, int64_t k0, int64_t k1, float* out,
                        int64_t ldo) const {
  const int64_t C = static_cast<int64_t>(chunks_.size());
  for (int64_t j = 0; j < count; ++j) {
    const int64_t n = n0 + j;
    float* o = out + j * ldo;
    if (HasAvx2()) {
      DequantIntRangeAvx2(codes_.data() + n * row_bytes(), bits_, block_chunk_.data(),
                          scale_.data() + n * C, szero_.data() + n * C, k0, k1, o);
      continue;
    }
    for (int64_t p = k0; p < k1; ++p) {
      const int64_t c = block_chunk_[p / kBlock];
      o[p - k0] = static_cast<float>(Code(n, p)) * scale_[n * C + c] - szero_[n * C + c];
    }
  }
}

void IntLinear::Run(const float* x, int64_t m, float* y) const {
  if (m <= kMaxGemvRows && HasAvx2()) {
    for (int64_t r0 = 0; r0 < m; r0 += kMaxGemvRows) {
      RunGemv(x + r0 * k_, std::min(kMaxGemvRows, m - r0), y + r0 * n_);
    }
    return;
  }
  thread_local std::vector<float> xp;
  GatherActivations(x, m, xp);
  PanelGemm(*this, xp.data(), m, kp_, n_, bias_.empty() ? nullptr : bias_.data(), y);
}

// ===========================================================================
// FP8 (e4m3) weights, used in place.
// ===========================================================================

// e4m3 -> f16 bits: sign to bit 15, exponent+mantissa shifted up by 7. The f16 exponent
// bias is 15 vs 7, so the f16 value is the e4m3 value times 2^-8 (subnormals map exactly
// too); the 2^8 goes into the scale. Sign-extending the byte and shifting by 7 puts the
// sign in bit 15 and a copy in bit 14, which the mask clears. 16 codes per call.
QSHARD_AVX2 inline void E4M3x16ToF32(const uint8_t* p, __m256* lo, __m256* hi) {
  const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h =
      _mm256_and_si256(_mm256_slli_epi16(b, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBFFF)));
  *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

constexpr float kE4M3ToF16Scale = 256.0f;

template <int kM>
QSHARD_AVX2 void Fp8GemvAvx2(const uint8_t* w, int64_t k, const Fp8ScaleGrid& g, const float* x,
                             int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
  // Independent accumulator chains per row: an FMA's latency (4-5 cycles) would otherwise
  // bound the loop. kM <= 2 handles 32 codes per step (4 chains per row), else 16 (2).
  constexpr int kChains = kM <= 2 ? 4 : 2;
  constexpr int64_t kStep = 8 * kChains;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * k;
    float out[kM] = {};
    for (int64_t kb = 0; kb < k; kb += g.bk) {
      const int64_t end = std::min(k, kb + g.bk);
      __m256 acc[kM][kChains];
      for (int r = 0; r < kM; ++r) {
        for (int c = 0; c < kChains; ++c) acc[r][c] = _mm256_setzero_ps();
      }
      int64_t i = kb;
      for (; i + kStep <= end; i += kStep) {
        __m256 wv[kChains];
        for (int c = 0; c < kChains; c += 2) E4M3x16ToF32(row + i + 8 * c, &wv[c], &wv[c + 1]);
        for (int r = 0; r < kM; ++r) {
          for (int c = 0; c < kChains; ++c) {
            acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * k + i + 8 * c), wv[c], acc[r][c]);
          }
        }
      }
      const float s = g.at(n, kb);
      for (int r = 0; r < kM; ++r) {
        __m256 sum = acc[r][0];
        for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, acc[r][c]);
        float part = HSum(sum) * kE4M3ToF16Scale;
        for (int64_t t = i; t < end; ++t) part += x[r * k + t] * E4M3ToFloat(row[t]);
        out[r] += s * part;
      }
    }
    for (int r = 0; r < kM; ++r) y[r * ldy + n] = out[r] + (bias ? bias[n] : 0.0f);
  }
}

// out[i - k0] = e4m3 weight i of row n times its scale, for i in [k0, k1).
QSHARD_AVX2 void DequantFp8RangeAvx2(const uint8_t* row, int64_t k0, int64_t k1,
                                     const Fp8ScaleGrid& g, int64_t n, float* out) {
  for (int64_t kb = k0; kb < k1;) {
    const int64_t end = std::min(k1, (kb / g.bk + 1) * g.bk);  // this scale block's end
    const float s = g.at(n, kb);
    const __m256 vs = _mm256_set1_ps(s * kE4M3ToF16Scale);
    int64_t i = kb;
    for (; i + 16 <= end; i += 16) {
      __m256 w0, w1;
      E4M3x16ToF32(row + i, &w0, &w1);
      _mm256_storeu_ps(out + (i - k0), _mm256_mul_ps(w0, vs));
      _mm256_storeu_ps(out + (i - k0) + 8, _mm256_mul_ps(w1, vs));
    }
    for (; i < end; ++i) out[i - k0] = E4M3ToFloat(row[i]) * s;
    kb = end;
  }
}

class Fp8Linear : public CpuQuantLinear, public WeightPanelSource {
 public:
  Fp8Linear(const LinearWeights& w, Fp8ScaleGrid grid)
      : weight_(w.weight),
        k_(w.in_features),
        n_(w.out_features),
        grid_(std::move(grid)),
        act_(w.act_quant),
        act_group_(w.act_group_size > 0 ? w.act_group_size : w.in_features),
        bias_(BiasToFloat(w)) {
    if (!w.input_scale.empty()) input_scale_ = quant_internal::FloatAt(w.input_scale, 0);
  }
  int64_t in_features() const override { return k_; }
  int64_t out_features() const override { return n_; }
  std::string kernel_name() const override {
    std::string scales = grid_.rows == 1 && grid_.cols == 1 ? "tensor"
                         : grid_.cols == 1                  ? "channel"
                                                            : absl::StrCat("block", grid_.bk);
    return absl::StrCat("cpu-fp8-", act_ == ActQuant::kNone ? "w8a16-" : "w8a8-", scales,
                        "-", IsaName(ActiveIsa()));
  }
  int64_t weight_bytes() const override {
    return static_cast<int64_t>(weight_.nbytes() +
                                (grid_.scale.size() + bias_.size()) * sizeof(float));
  }
  void Run(const float* x, int64_t m, float* y) const override;
  void Dequant(int64_t n0, int64_t count, int64_t k0, int64_t k1, float* out,
               int64_t ldo) const override {
    const uint8_t* w = weight_.data<uint8_t>();
    for (int64_t j = 0; j < count; ++j) {
      const int64_t n = n0 + j;
      if (HasAvx2()) {
        DequantFp8RangeAvx2(w + n * k_, k0, k1, grid_, n, out + j * ldo);
        continue;
      }
      for (int64_t i = k0; i < k1; ++i) {
        out[j * ldo + i - k0] = E4M3ToFloat(w[n * k_ + i]) * grid_.at(n, i);
      }
    }
  }

 private:
  // x rounded through e4m3 as the checkpoint's activation scheme says (fp32 result:
  // the products are then exact, as in an fp8 GEMM with fp32 accumulation).
  void QuantizeActivations(const float* x, int64_t m, std::vector<float>& xq) const;

  Tensor weight_;  // [N, K] e4m3 view of the checkpoint (keeps the mapping alive)
  int64_t k_, n_;
  Fp8ScaleGrid grid_;
  ActQuant act_;
  int64_t act_group_;
  float input_scale_ = 1.0f;
  std::vector<float> bias_;
};

// x rounded to the nearest e4m3 value (ties to even), saturating at 448, for |x| not NaN:
// the float result equals E4M3ToFloat(FloatToE4M3(x)) without forming the code. Normal
// e4m3 values (>= 2^-6) keep 3 mantissa bits: round the float's 23 to 3. Below 2^-6 the
// grid is uniform (2^-9 steps): round x * 2^9 to an integer.
QSHARD_AVX2 inline __m256 RoundToE4M3Avx2(__m256 v) {
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x80000000));
  const __m256 a = _mm256_andnot_ps(sign_mask, v);
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFFF), lsb)),
                       _mm256_set1_epi32(static_cast<int>(0xFFF00000u)));
  const __m256 normal = _mm256_castsi256_ps(rounded);
  const __m256 sub = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(512.0f)),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                   _mm256_set1_ps(1.0f / 512.0f));
  const __m256 is_sub = _mm256_cmp_ps(a, _mm256_set1_ps(1.0f / 64.0f), _CMP_LT_OQ);
  const __m256 r = _mm256_min_ps(_mm256_blendv_ps(normal, sub, is_sub), _mm256_set1_ps(kE4M3Max));
  return _mm256_or_ps(r, _mm256_and_ps(v, sign_mask));
}

// xr[0:n] = e4m3(xr / s) * s.
QSHARD_AVX2 void FakeQuantE4M3Avx2(float* xr, int64_t n, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 q = RoundToE4M3Avx2(_mm256_div_ps(_mm256_loadu_ps(xr + i), vs));
    _mm256_storeu_ps(xr + i, _mm256_mul_ps(q, vs));
  }
  for (; i < n; ++i) xr[i] = E4M3ToFloat(FloatToE4M3(xr[i] / s)) * s;
}

void Fp8Linear::QuantizeActivations(const float* x, int64_t m, std::vector<float>& xq) const {
  xq.assign(x, x + m * k_);
  if (act_ == ActQuant::kNone) return;
  const bool simd = HasAvx2();
  ThreadPool::Global().ParallelFor(
      m,
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float* xr = xq.data() + r * k_;
          const int64_t group = act_ == ActQuant::kFp8PerTokenGroup ? act_group_ : k_;
          for (int64_t g0 = 0; g0 < k_; g0 += group) {
            const int64_t g1 = std::min(k_, g0 + group);
            float s = input_scale_;
            if (act_ != ActQuant::kFp8Static) {
              float amax = 0.0f;
              for (int64_t i = g0; i < g1; ++i) amax = std::max(amax, std::fabs(xr[i]));
              // The reference clamps amax away from 0 so an all-zero row stays zero.
              s = std::max(amax, 1e-12f) / kE4M3Max;
            }
            if (simd) {
              FakeQuantE4M3Avx2(xr + g0, g1 - g0, s);
            } else {
              for (int64_t i = g0; i < g1; ++i) xr[i] = E4M3ToFloat(FloatToE4M3(xr[i] / s)) * s;
            }
          }
        }
      },
      /*min_chunk=*/8);
}

void Fp8Linear::Run(const float* x, int64_t m, float* y) const {
  std::vector<float> xq;
  QuantizeActivations(x, m, xq);
  const float* bias = bias_.empty() ? nullptr : bias_.data();
  if (m <= kMaxGemvRows && HasAvx2()) {
    const uint8_t* w = weight_.data<uint8_t>();
    ThreadPool::Global().ParallelFor(
        n_,
        [&](int64_t n0, int64_t n1) {
          switch (m) {
            case 1:
              Fp8GemvAvx2<1>(w, k_, grid_, xq.data(), n0, n1, bias, y, n_);
              break;
            case 2:
              Fp8GemvAvx2<2>(w, k_, grid_, xq.data(), n0, n1, bias, y, n_);
              break;
            case 3:
              Fp8GemvAvx2<3>(w, k_, grid_, xq.data(), n0, n1, bias, y, n_);
              break;
            default:
              Fp8GemvAvx2<4>(w, k_, grid_, xq.data(), n0, n1, bias, y, n_);
              break;
          }
        },
        /*min_chunk=*/16);
    return;
  }
  PanelGemm(*this, xq.data(), m, k_, n_, bias, y);
}

// The checkpoint's packed tensors were read once to repack them; ask the kernel to drop
// their pages so the process keeps only the repacked copy resident. Only pages of a mapped
// checkpoint are dropped (mapped_file.h): host tensors built in memory (dummy weights, a
// fused q|k|v) are freed by their owner instead.
void ReleaseSourcePages(const Tensor& t) {
  if (t.empty()) return;
  ReleaseMappedPages(t.raw(), t.nbytes());
}

std::string GroupLabel(int64_t group_size, int64_t k) {
  return group_size > 0 && group_size < k ? absl::StrCat("g", group_size) : "gch";
}

absl::StatusOr<std::unique_ptr<LinearOp>> PrepareIntOrFp8(const LinearWeights& w,
                                                          const std::string& group) {
  switch (w.format) {
    case WeightFormat::kGptq: {
      QSHARD_ASSIGN_OR_RETURN(IntQuantMatrix q, UnpackGptq(w));
      QSHARD_ASSIGN_OR_RETURN(
          auto op, IntLinear::Create(w, q, absl::StrCat("gptq-w", w.bits, group), false));
      return std::unique_ptr<LinearOp>(std::move(op));
    }
    case WeightFormat::kAwq: {
      QSHARD_ASSIGN_OR_RETURN(IntQuantMatrix q, UnpackAwq(w));
      QSHARD_ASSIGN_OR_RETURN(auto op,
                              IntLinear::Create(w, q, absl::StrCat("awq-w4", group), false));
      return std::unique_ptr<LinearOp>(std::move(op));
    }
    case WeightFormat::kPacked: {
      QSHARD_ASSIGN_OR_RETURN(IntQuantMatrix q, UnpackPackQuantized(w));
      QSHARD_ASSIGN_OR_RETURN(
          auto op, IntLinear::Create(w, q, absl::StrCat("packed-w", w.bits, group), false));
      return std::unique_ptr<LinearOp>(std::move(op));
    }
    case WeightFormat::kInt8: {
      if (w.act_quant != ActQuant::kNone && w.act_quant != ActQuant::kInt8PerToken) {
        return absl::InvalidArgumentError(
            absl::StrCat(w.name,
                         ": int8 weights support activation quantization none or int8-per-token, "
                         "not ",
                         ActQuantName(w.act_quant)));
      }
      QSHARD_ASSIGN_OR_RETURN(IntQuantMatrix q, UnpackInt8(w));
      const bool w8a8 = w.act_quant == ActQuant::kInt8PerToken;
      QSHARD_ASSIGN_OR_RETURN(auto op,
                              IntLinear::Create(w, q, w8a8 ? "int8-w8a8" : "int8-w8a16", w8a8));
      return std::unique_ptr<LinearOp>(std::move(op));
    }
    case WeightFormat::kFp8: {
      if (w.act_quant == ActQuant::kInt8PerToken) {
        return absl::InvalidArgumentError(
            absl::StrCat(w.name, ": fp8 weights cannot take int8 activation quantization"));
      }
      if (w.act_quant == ActQuant::kFp8Static && w.input_scale.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(w.name, ".input_scale: missing (the static activation scheme needs it)"));
      }
      QSHARD_ASSIGN_OR_RETURN(Fp8ScaleGrid grid, Fp8Scales(w));
      return std::unique_ptr<LinearOp>(new Fp8Linear(w, std::move(grid)));
    }
    case WeightFormat::kDense:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat(w.name, ": PrepareQuantLinear called with a dense weight"));
}

}  // namespace

bool IsQuantFormat(WeightFormat f) { return f != WeightFormat::kDense; }

absl::StatusOr<std::unique_ptr<LinearOp>> PrepareQuantLinear(const LinearWeights& w) {
  if (!w.bias.empty()) {
    QSHARD_RETURN_IF_ERROR(quant_internal::CheckTensor(
        w.name, "bias", w.bias, {DType::kF16, DType::kBF16, DType::kF32}, {w.out_features}));
  }
  const std::string group = GroupLabel(w.group_size, w.in_features);
  absl::StatusOr<std::unique_ptr<LinearOp>> op = PrepareIntOrFp8(w, group);
  if (op.ok() && w.format != WeightFormat::kFp8) {  // fp8 runs from the checkpoint's pages
    for (const Tensor* t : {&w.qweight, &w.qzeros, &w.scales, &w.g_idx, &w.weight}) {
      ReleaseSourcePages(*t);
    }
  }
  return op;
}

}  // namespace qshard::cpu
