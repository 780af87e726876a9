#include "quant/gptq_format.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "quant/dense_linalg.h"
#include "runtime/base/status_macros.h"

namespace qshard {

using quant_internal::CheckTensor;
using quant_internal::FloatAt;

absl::StatusOr<IntQuantMatrix> UnpackGptq(const LinearWeights& w) {
  const int64_t K = w.in_features, N = w.out_features;
  const int bits = w.bits;
  if (bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(w.name, ": GPTQ bits ", bits, " is not supported (supported: 4, 8)"));
  }
  const int per_word = 32 / bits;
  if (K % per_word != 0 || N % per_word != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        w.name, ": GPTQ ", bits, "-bit needs in_features and out_features divisible by ", per_word,
        " (got ", K, " x ", N, ")"));
  }
  const int64_t gs = w.group_size > 0 ? w.group_size : K;
  const int64_t G = (K + gs - 1) / gs;
  QSHARD_RETURN_IF_ERROR(
      CheckTensor(w.name, "qweight", w.qweight, {DType::kI32}, {K / per_word, N}));
  QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "qzeros", w.qzeros, {DType::kI32}, {G, N / per_word}));
  QSHARD_RETURN_IF_ERROR(
      CheckTensor(w.name, "scales", w.scales, {DType::kF16, DType::kBF16, DType::kF32}, {G, N}));
  IntQuantMatrix m;
  m.in_features = K;
  m.out_features = N;
  m.bits = bits;
  m.num_groups = G;
  QSHARD_ASSIGN_OR_RETURN(m.g_idx, quant_internal::GroupIndex(w.name, w.g_idx, K, gs, G));
  const uint32_t mask = (1u << bits) - 1;
  // qweight is K-packed and N-contiguous; codes are N-major: walk words in storage order
  // (streaming the checkpoint) and scatter into the rows of `codes`.
  m.codes.resize(static_cast<size_t>(N * K));
  // A transpose: threaded over blocks of packed rows, and walked in 64 x 64-word tiles so
  // both the words read (N-contiguous) and the codes written (K-contiguous) stay in cache.
  // An 8B model's linears hold ~7e9 codes: minutes on one core, untiled.
  const uint32_t* qw = w.qweight.data<uint32_t>();
  constexpr int64_t kTile = 64;
  const int64_t R = K / per_word;
  quant_internal::ParallelRange((R + kTile - 1) / kTile, 1, [&](int64_t bb, int64_t be) {
    for (int64_t r0 = bb * kTile; r0 < std::min(R, be * kTile); r0 += kTile) {
      const int64_t r1 = std::min(R, r0 + kTile);
      for (int64_t n0 = 0; n0 < N; n0 += kTile) {
        const int64_t n1 = std::min(N, n0 + kTile);
        for (int64_t n = n0; n < n1; ++n) {
          uint8_t* dst = m.codes.data() + n * K + r0 * per_word;
          for (int64_t r = r0; r < r1; ++r, dst += per_word) {
            const uint32_t word = qw[r * N + n];
            for (int j = 0; j < per_word; ++j) {
              dst[j] = static_cast<uint8_t>((word >> (bits * j)) & mask);
            }
          }
        }
      }
    }
  });
  m.scales.resize(static_cast<size_t>(G * N));
  m.zeros.resize(static_cast<size_t>(G * N));
  const uint32_t* qz = w.qzeros.data<uint32_t>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t n = 0; n < N; ++n) {
      uint32_t z = (qz[g * (N / per_word) + n / per_word] >> (bits * (n % per_word))) & mask;
      // v1 stored zero - 1; adding one back within the field also undoes the wrap of a
      // zero of 0 (stored as -1 = all ones).
      if (w.gptq_zeros_minus_one) z = (z + 1) & mask;
      m.zeros[g * N + n] = static_cast<float>(z);
      m.scales[g * N + n] = FloatAt(w.scales, g * N + n);
    }
  }
  return m;
}

}  // namespace qshard
