#include "quant/awq_format.h"

#include <string>

#include "absl/strings/str_cat.h"
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
  const uint32_t* qw = w.qweight.data<uint32_t>();
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < N / 8; ++c) {
      const uint32_t word = qw[k * (N / 8) + c];
      for (int i = 0; i < 8; ++i) {
        m.codes[(8 * c + kAwqOrder[i]) * K + k] = static_cast<uint8_t>((word >> (4 * i)) & 0xF);
      }
    }
  }
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
