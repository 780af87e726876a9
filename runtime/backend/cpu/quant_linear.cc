#include "runtime/backend/cpu/quant_linear.h"

#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>

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
#include "runtime/backend/cpu/ops.h"
#include "runtime/backend/cpu/simd_avx2.h"
#include "runtime/base/status_macros.h"
#include "runtime/base/thread_pool.h"

namespace qshard::cpu {
namespace {

using simd::HSum;

constexpr int64_t kBlock = 32;       // inputs per code block (one 16-byte 4-bit load)
constexpr int64_t kMaxChunk = 128;   // inputs per int32 accumulation / activation scale
constexpr int64_t kPanel = 6;        // output features dequantized together for prefill
                                     // (two 4 x 3 register tiles)
constexpr int64_t kMaxGemvRows = 4;  // rows handled by the decode kernels

// ---------------------------------------------------------------------------
// Shared fp32 GEMM for prefill: the op dequantizes kPanel weight rows into a panel, the
// microkernel sweeps x in blocks of 4 rows while the panel stays in L1/L2.
// ---------------------------------------------------------------------------

class PanelSource {
 public:
  virtual ~PanelSource() = default;
  // panel[j, 0:k] = fp32 weights of output feature n0 + j, j < count (k = GemmK()).
  virtual void DequantRows(int64_t n0, int64_t count, float* panel) const = 0;
};

QSHARD_AVX2 inline float DotF32(const float* a, const float* b, int64_t n) { return simd::Dot(a, b, n); }

// out[r][c] = x[r, :] . w_c for 4 rows of x and 3 weight rows: 12 accumulators + 3 weight
// loads + 1 x load fit the 16 ymm registers.
QSHARD_AVX2 void Micro4x3(const float* x, int64_t ldx, int64_t k, const float* w0, const float* w1,
                          const float* w2, float out[4][3]) {
  __m256 c[4][3];
  for (int r = 0; r < 4; ++r) c[r][0] = c[r][1] = c[r][2] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 a = _mm256_loadu_ps(w0 + i);
    const __m256 b = _mm256_loadu_ps(w1 + i);
    const __m256 d = _mm256_loadu_ps(w2 + i);
    for (int r = 0; r < 4; ++r) {
      const __m256 v = _mm256_loadu_ps(x + r * ldx + i);
      c[r][0] = _mm256_fmadd_ps(v, a, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(v, b, c[r][1]);
      c[r][2] = _mm256_fmadd_ps(v, d, c[r][2]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    out[r][0] = HSum(c[r][0]);
    out[r][1] = HSum(c[r][1]);
    out[r][2] = HSum(c[r][2]);
    for (int64_t t = i; t < k; ++t) {
      out[r][0] += x[r * ldx + t] * w0[t];
      out[r][1] += x[r * ldx + t] * w1[t];
      out[r][2] += x[r * ldx + t] * w2[t];
    }
  }
}

// y[r, n] for r < m, n in [n0, n1): panels of kPanel features, 4 x 3 register tiles.
QSHARD_AVX2 void PanelGemmAvx2(const PanelSource& src, const float* x, int64_t m, int64_t k,
                               int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
  thread_local std::vector<float> panel;
  panel.resize(static_cast<size_t>(kPanel * k));
  for (int64_t j0 = n0; j0 < n1; j0 += kPanel) {
    const int64_t jn = std::min(kPanel, n1 - j0);
    src.DequantRows(j0, jn, panel.data());
    int64_t r = 0;
    for (; r + 4 <= m; r += 4) {
      int64_t jj = 0;
      for (; jj + 3 <= jn; jj += 3) {
        float out[4][3];
        const float* p = panel.data() + jj * k;
        Micro4x3(x + r * k, k, k, p, p + k, p + 2 * k, out);
        for (int rr = 0; rr < 4; ++rr) {
          for (int c = 0; c < 3; ++c) {
            y[(r + rr) * ldy + j0 + jj + c] = out[rr][c] + (bias ? bias[j0 + jj + c] : 0.0f);
          }
        }
      }
      for (; jj < jn; ++jj) {
        for (int rr = 0; rr < 4; ++rr) {
          y[(r + rr) * ldy + j0 + jj] =
              DotF32(x + (r + rr) * k, panel.data() + jj * k, k) + (bias ? bias[j0 + jj] : 0.0f);
        }
      }
    }
    for (; r < m; ++r) {
      for (int64_t jj = 0; jj < jn; ++jj) {
        y[r * ldy + j0 + jj] =
            DotF32(x + r * k, panel.data() + jj * k, k) + (bias ? bias[j0 + jj] : 0.0f);
      }
    }
  }
}

// Portable path (also the exact reference in tests): one dequantized row at a time.
void PanelGemmScalar(const PanelSource& src, const float* x, int64_t m, int64_t k, int64_t n0,
                     int64_t n1, const float* bias, float* y, int64_t ldy) {
  std::vector<float> row(static_cast<size_t>(k));
  for (int64_t n = n0; n < n1; ++n) {
    src.DequantRows(n, 1, row.data());
    for (int64_t r = 0; r < m; ++r) {
      float s = 0.0f;
      for (int64_t i = 0; i < k; ++i) s += x[r * k + i] * row[i];
      y[r * ldy + n] = s + (bias ? bias[n] : 0.0f);
    }
  }
}

// Threads over output features; rows in blocks that keep x cache resident.
void PanelGemm(const PanelSource& src, const float* x, int64_t m, int64_t k, int64_t n,
               const float* bias, float* y) {
  const bool simd = HasAvx2();
  const int64_t row_block =
      std::max<int64_t>(4, (256 * 1024 / 4) / std::max<int64_t>(k, 1) / 4 * 4);
  for (int64_t r0 = 0; r0 < m; r0 += row_block) {
    const int64_t rows = std::min(m, r0 + row_block) - r0;
    ThreadPool::Global().ParallelFor(
        (n + kPanel - 1) / kPanel,
        [&](int64_t p0, int64_t p1) {
          const int64_t a = p0 * kPanel, b = std::min(n, p1 * kPanel);
          if (simd) {
            PanelGemmAvx2(src, x + r0 * k, rows, k, a, b, bias, y + r0 * n, n);
          } else {
            PanelGemmScalar(src, x + r0 * k, rows, k, a, b, bias, y + r0 * n, n);
          }
        },
        /*min_chunk=*/2);
  }
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

class IntLinear : public CpuQuantLinear, public PanelSource {
 public:
  static absl::StatusOr<std::unique_ptr<IntLinear>> Create(const LinearWeights& w,
                                                           const IntQuantMatrix& q,
                                                           std::string label, bool int8_act);

  int64_t in_features() const override { return k_; }
  int64_t out_features() const override { return n_; }
  std::string kernel_name() const override {
    return absl::StrCat("cpu-", label_, HasAvx2() ? "-avx2" : "-scalar");
  }
  int64_t weight_bytes() const override {
    return static_cast<int64_t>(codes_.size() +
                                (scale_.size() + szero_.size() + bias_.size()) * sizeof(float) +
                                perm_.size() * sizeof(int32_t));
  }
  void Run(const float* x, int64_t m, float* y) const override;
  void DequantRows(int64_t n0, int64_t count, float* panel) const override;

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
  bool int8_act_ = false;       // W8A8: activations rounded to int8 per token
  bool identity_ = true;        // perm_ is the identity and kp_ == k_
  std::vector<int32_t> perm_;   // [kp] source input of each position, -1 = padding
  std::vector<Chunk> chunks_;   // [C]
  std::vector<uint8_t> codes_;  // [N, kp * bits / 8]
  std::vector<float> scale_;    // [N, C]
  std::vector<float> szero_;    // [N, C] scale * zero (subtracted times sum(x) of the chunk)
  std::vector<float> bias_;     // [N] or empty
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

void IntLinear::GatherActivations(const float* x, int64_t m, std::vector<float>& xp) const {
  xp.assign(static_cast<size_t>(m * kp_), 0.0f);
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * k_;
    float* dst = xp.data() + r * kp_;
    if (identity_) {
      std::memcpy(dst, xr, sizeof(float) * k_);
    } else {
      for (int64_t p = 0; p < kp_; ++p) dst[p] = perm_[p] >= 0 ? xr[perm_[p]] : 0.0f;
    }
    if (int8_act_) {
      // Symmetric int8 per token: scale = amax / 127, q = round_half_even(x / scale).
      float amax = 0.0f;
      for (int64_t p = 0; p < kp_; ++p) amax = std::max(amax, std::fabs(dst[p]));
      const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
      for (int64_t p = 0; p < kp_; ++p) {
        dst[p] = std::clamp(std::nearbyint(dst[p] / s), -127.0f, 127.0f) * s;
      }
    }
  }
}

// ---- decode kernel: int16 activations x 4/8-bit codes with pmaddwd ----

// Activations of the decode kernel: int16 codes with one scale per (row, chunk).
struct Int16Acts {
  std::vector<int16_t> q;    // [m, kp]
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

template <int kBits>
void IntGemvDispatch(int64_t m, const uint8_t* codes, int64_t row_bytes, const Chunk* chunks,
                     int64_t C, const float* scale, const float* szero, const Int16Acts& a,
                     int64_t kp, int64_t n0, int64_t n1, const float* bias, float* y, int64_t ldy) {
  switch (m) {
    case 1:
      IntGemvAvx2<kBits, 1>(codes, row_bytes, chunks, C, scale, szero, a, kp, n0, n1, bias, y, ldy);
      break;
    case 2:
      IntGemvAvx2<kBits, 2>(codes, row_bytes, chunks, C, scale, szero, a, kp, n0, n1, bias, y, ldy);
      break;
    case 3:
      IntGemvAvx2<kBits, 3>(codes, row_bytes, chunks, C, scale, szero, a, kp, n0, n1, bias, y, ldy);
      break;
    default:
      IntGemvAvx2<kBits, 4>(codes, row_bytes, chunks, C, scale, szero, a, kp, n0, n1, bias, y, ldy);
      break;
  }
}

void IntLinear::RunGemv(const float* x, int64_t m, float* y) const {
  std::vector<float> xp;
  GatherActivations(x, m, xp);
  const int64_t C = static_cast<int64_t>(chunks_.size());
  Int16Acts a;
  a.q.assign(static_cast<size_t>(m * kp_), 0);
  a.scale.resize(static_cast<size_t>(m * C));
  a.sum.resize(static_cast<size_t>(m * C));
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = xp.data() + r * kp_;
    float row_amax = 0.0f;
    if (int8_act_) {
      for (int64_t p = 0; p < kp_; ++p) row_amax = std::max(row_amax, std::fabs(xr[p]));
    }
    for (int64_t c = 0; c < C; ++c) {
      const Chunk& ch = chunks_[c];
      // W8A8: xp already holds int8 values times the row scale; recover the integers
      // exactly with that scale. Weight-only: int16 with the chunk's own scale.
      float amax = row_amax;
      if (!int8_act_) {
        for (int64_t p = ch.start; p < ch.start + ch.len; ++p) {
          amax = std::max(amax, std::fabs(xr[p]));
        }
      }
      const float qmax = int8_act_ ? 127.0f : 32767.0f;
      const float s = amax > 0.0f ? amax / qmax : 1.0f;
      const float inv = 1.0f / s;
      int64_t isum = 0;
      int16_t* dst = a.q.data() + r * kp_;
      for (int64_t p = ch.start; p < ch.start + ch.len; ++p) {
        const float v = std::clamp(std::nearbyint(xr[p] * inv), -qmax, qmax);
        dst[p] = static_cast<int16_t>(v);
        isum += dst[p];
      }
      a.scale[r * C + c] = s;
      a.sum[r * C + c] = s * static_cast<float>(isum);
    }
  }
  const float* bias = bias_.empty() ? nullptr : bias_.data();
  ThreadPool::Global().ParallelFor(
      n_,
      [&](int64_t n0, int64_t n1) {
        if (bits_ == 4) {
          IntGemvDispatch<4>(m, codes_.data(), row_bytes(), chunks_.data(), C, scale_.data(),
                             szero_.data(), a, kp_, n0, n1, bias, y, n_);
        } else {
          IntGemvDispatch<8>(m, codes_.data(), row_bytes(), chunks_.data(), C, scale_.data(),
                             szero_.data(), a, kp_, n0, n1, bias, y, n_);
        }
      },
      /*min_chunk=*/16);
}

// panel[j, p] = scale * code - scale * zero over the padded inputs.
QSHARD_AVX2 void DequantIntRowAvx2(const uint8_t* row, int bits, const Chunk* chunks, int64_t C,
                                   const float* scale, const float* szero, float* out) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t c = 0; c < C; ++c) {
    const __m256 s = _mm256_set1_ps(scale[c]);
    const __m256 sz = _mm256_set1_ps(szero[c]);
    const int64_t end = chunks[c].start + chunks[c].len;
    for (int64_t p = chunks[c].start; p < end; p += kBlock) {
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
        _mm256_storeu_ps(out + p + 8 * i, _mm256_fmsub_ps(q, s, sz));
      }
    }
  }
}

void IntLinear::DequantRows(int64_t n0, int64_t count, float* panel) const {
  const int64_t C = static_cast<int64_t>(chunks_.size());
  for (int64_t j = 0; j < count; ++j) {
    const int64_t n = n0 + j;
    float* out = panel + j * kp_;
    if (HasAvx2()) {
      DequantIntRowAvx2(codes_.data() + n * row_bytes(), bits_, chunks_.data(), C,
                        scale_.data() + n * C, szero_.data() + n * C, out);
      continue;
    }
    for (int64_t c = 0; c < C; ++c) {
      const float s = scale_[n * C + c], sz = szero_[n * C + c];
      for (int64_t p = chunks_[c].start; p < chunks_[c].start + chunks_[c].len; ++p) {
        out[p] = static_cast<float>(Code(n, p)) * s - sz;
      }
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
  std::vector<float> xp;
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

QSHARD_AVX2 void DequantFp8RowAvx2(const uint8_t* row, int64_t k, const Fp8ScaleGrid& g, int64_t n,
                                   float* out) {
  for (int64_t kb = 0; kb < k; kb += g.bk) {
    const int64_t end = std::min(k, kb + g.bk);
    const float s = g.at(n, kb);
    const __m256 vs = _mm256_set1_ps(s * kE4M3ToF16Scale);
    int64_t i = kb;
    for (; i + 16 <= end; i += 16) {
      __m256 w0, w1;
      E4M3x16ToF32(row + i, &w0, &w1);
      _mm256_storeu_ps(out + i, _mm256_mul_ps(w0, vs));
      _mm256_storeu_ps(out + i + 8, _mm256_mul_ps(w1, vs));
    }
    for (; i < end; ++i) out[i] = E4M3ToFloat(row[i]) * s;
  }
}

class Fp8Linear : public CpuQuantLinear, public PanelSource {
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
                        HasAvx2() ? "-avx2" : "-scalar");
  }
  int64_t weight_bytes() const override {
    return static_cast<int64_t>(weight_.nbytes() +
                                (grid_.scale.size() + bias_.size()) * sizeof(float));
  }
  void Run(const float* x, int64_t m, float* y) const override;
  void DequantRows(int64_t n0, int64_t count, float* panel) const override {
    const uint8_t* w = weight_.data<uint8_t>();
    for (int64_t j = 0; j < count; ++j) {
      const int64_t n = n0 + j;
      if (HasAvx2()) {
        DequantFp8RowAvx2(w + n * k_, k_, grid_, n, panel + j * k_);
        continue;
      }
      for (int64_t i = 0; i < k_; ++i)
        panel[j * k_ + i] = E4M3ToFloat(w[n * k_ + i]) * grid_.at(n, i);
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
// their pages so the process keeps only the repacked copy resident. MADV_PAGEOUT keeps the
// contents (clean file pages are re-read if touched again; anonymous memory is swapped or
// left alone), so it is safe whatever owns the memory. Only whole interior pages.
void ReleaseSourcePages(const Tensor& t) {
#ifdef MADV_PAGEOUT
  if (t.empty() || t.nbytes() == 0) return;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.raw()) + page - 1) / page * page;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.raw()) + t.nbytes()) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_PAGEOUT);
#endif
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
