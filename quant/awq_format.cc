#include "quant/awq_format.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "quant/dense_linalg.h"
#include "runtime/base/status_macros.h"

namespace qshard {

using quant_internal::CheckTensor;
using quant_internal::FloatAt;

absl::StatusOr<IntQuantMatrix> UnpackAwq(const LinearWeights& w) {
  const int64_t K = w.in_features, N = w.out_features;
  if (w.bits != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat(w.name, ": AWQ bits ", w.bits, " is not supported (supported: 4)"));
  }
  if (N % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(w.name, ": AWQ needs out_features divisible by 8 (got ", N, ")"));
  }
  const int64_t gs = w.group_size > 0 ? w.group_size : K;
  const int64_t G = (K + gs - 1) / gs;
  QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "qweight", w.qweight, {DType::kI32}, {K, N / 8}));
  if (!w.qzeros.empty()) {
    QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "qzeros", w.qzeros, {DType::kI32}, {G, N / 8}));
  }
  QSHARD_RETURN_IF_ERROR(
      CheckTensor(w.name, "scales", w.scales, {DType::kF16, DType::kBF16, DType::kF32}, {G, N}));
  IntQuantMatrix m;
  m.in_features = K;
  m.out_features = N;
  m.bits = 4;
  m.num_groups = G;
  QSHARD_ASSIGN_OR_RETURN(m.g_idx, quant_internal::GroupIndex(w.name, Tensor(), K, gs, G));
  m.codes.resize(static_cast<size_t>(N * K));
  // A transpose: threaded over blocks of k, walked in 64-input x 8-word (64-column) tiles
  // so the codes written (K-contiguous per output row) stay in cache.
  const uint32_t* qw = w.qweight.data<uint32_t>();
  constexpr int64_t kTileK = 64, kTileC = 8;
  const int64_t C = N / 8;
  quant_internal::ParallelRange((K + kTileK - 1) / kTileK, 1, [&](int64_t bb, int64_t be) {
    for (int64_t k0 = bb * kTileK; k0 < std::min(K, be * kTileK); k0 += kTileK) {
      const int64_t k1 = std::min(K, k0 + kTileK);
      for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
        const int64_t c1 = std::min(C, c0 + kTileC);
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t k = k0; k < k1; ++k) {
            const uint32_t word = qw[k * C + c];
            for (int i = 0; i < 8; ++i) {
              m.codes[(8 * c + kAwqOrder[i]) * K + k] =
                  static_cast<uint8_t>((word >> (4 * i)) & 0xF);
            }
          }
        }
      }
    }
  });
  m.scales.resize(static_cast<size_t>(G * N));
  m.zeros.assign(static_cast<size_t>(G * N), 8.0f);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t c = 0; c < N / 8; ++c) {
      if (w.qzeros.empty()) break;
      const uint32_t word = w.qzeros.data<uint32_t>()[g * (N / 8) + c];
      for (int i = 0; i < 8; ++i) {
        m.zeros[g * N + 8 * c + kAwqOrder[i]] = static_cast<float>((word >> (4 * i)) & 0xF);
      }
    }
    for (int64_t n = 0; n < N; ++n) m.scales[g * N + n] = FloatAt(w.scales, g * N + n);
  }
  return m;
}

}  // namespace qshard
