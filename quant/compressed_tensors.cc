#include "quant/compressed_tensors.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/base/status_macros.h"

namespace qshard {

using quant_internal::CheckTensor;
using quant_internal::FloatAt;

absl::StatusOr<IntQuantMatrix> UnpackPackQuantized(const LinearWeights& w) {
  const int64_t K = w.in_features, N = w.out_features;
  const int bits = w.bits;
  if (bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(absl::StrCat(w.name, ": pack-quantized num_bits ", bits,
                                                   " is not supported (supported: 4, 8)"));
  }
  const int per_word = 32 / bits;
  if (K % per_word != 0) {
    return absl::InvalidArgumentError(absl::StrCat(w.name, ": pack-quantized ", bits,
                                                   "-bit needs in_features divisible by ", per_word,
                                                   " (got ", K, ")"));
  }
  const int64_t gs = w.group_size > 0 ? w.group_size : K;
  const int64_t G = (K + gs - 1) / gs;
  QSHARD_RETURN_IF_ERROR(
      CheckTensor(w.name, "weight_packed", w.qweight, {DType::kI32}, {N, K / per_word}));
  QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "weight_scale", w.scales,
                                     {DType::kF16, DType::kBF16, DType::kF32}, {N, G}));
  const int64_t zp_rows = (N + per_word - 1) / per_word;
  if (!w.qzeros.empty()) {
    QSHARD_RETURN_IF_ERROR(
        CheckTensor(w.name, "weight_zero_point", w.qzeros, {DType::kI32}, {zp_rows, G}));
  }
  IntQuantMatrix m;
  m.in_features = K;
  m.out_features = N;
  m.bits = bits;
  m.num_groups = G;
  QSHARD_ASSIGN_OR_RETURN(m.g_idx, quant_internal::GroupIndex(w.name, w.g_idx, K, gs, G));
  const uint32_t mask = (1u << bits) - 1;
  m.codes.resize(static_cast<size_t>(N * K));
  const uint32_t* qw = w.qweight.data<uint32_t>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < K / per_word; ++c) {
      const uint32_t word = qw[n * (K / per_word) + c];
      uint8_t* dst = m.codes.data() + n * K + c * per_word;
      for (int j = 0; j < per_word; ++j) dst[j] = static_cast<uint8_t>((word >> (bits * j)) & mask);
    }
  }
  m.scales.resize(static_cast<size_t>(G * N));
  m.zeros.assign(static_cast<size_t>(G * N), static_cast<float>(1 << (bits - 1)));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < G; ++g) {
      m.scales[g * N + n] = FloatAt(w.scales, n * G + g);
      if (!w.qzeros.empty()) {
        const uint32_t word = w.qzeros.data<uint32_t>()[(n / per_word) * G + g];
        m.zeros[g * N + n] = static_cast<float>((word >> (bits * (n % per_word))) & mask);
      }
    }
  }
  return m;
}

absl::StatusOr<IntQuantMatrix> UnpackInt8(const LinearWeights& w) {
  const int64_t K = w.in_features, N = w.out_features;
  QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "weight", w.weight, {DType::kI8}, {N, K}));
  const Tensor& s = w.weight_scale;
  const bool per_tensor = s.numel() == 1;
  if (!per_tensor) {
    Shape want = s.rank() == 1 ? Shape{N} : Shape{N, 1};
    QSHARD_RETURN_IF_ERROR(
        CheckTensor(w.name, "weight_scale", s, {DType::kF32, DType::kF16, DType::kBF16}, want));
  } else {
    QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "weight_scale", s,
                                       {DType::kF32, DType::kF16, DType::kBF16}, s.shape()));
  }
  IntQuantMatrix m;
  m.in_features = K;
  m.out_features = N;
  m.bits = 8;
  m.num_groups = 1;
  m.g_idx.assign(static_cast<size_t>(K), 0);
  m.codes.resize(static_cast<size_t>(N * K));
  const int8_t* q = w.weight.data<int8_t>();
  // Signed codes shifted to unsigned with zero 128 so every integer format shares a kernel.
  for (int64_t i = 0; i < N * K; ++i) m.codes[i] = static_cast<uint8_t>(q[i] + 128);
  m.zeros.assign(static_cast<size_t>(N), 128.0f);
  m.scales.resize(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) m.scales[n] = FloatAt(s, per_tensor ? 0 : n);
  return m;
}

absl::StatusOr<Fp8ScaleGrid> Fp8Scales(const LinearWeights& w) {
  const int64_t K = w.in_features, N = w.out_features;
  QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "weight", w.weight, {DType::kF8E4M3}, {N, K}));
  const Tensor& s = w.weight_scale;
  const auto float_types = {DType::kF32, DType::kF16, DType::kBF16};
  Fp8ScaleGrid g;
  if (!w.block_size.empty()) {
    g.bn = w.block_size[0];
    g.bk = w.block_size[1];
    g.rows = (N + g.bn - 1) / g.bn;
    g.cols = (K + g.bk - 1) / g.bk;
    QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "weight_scale", s, float_types, {g.rows, g.cols}));
  } else if (s.numel() == 1) {
    QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "weight_scale", s, float_types, s.shape()));
    g.bn = N;
    g.bk = K;
    g.rows = g.cols = 1;
  } else {
    Shape want = s.rank() == 1 ? Shape{N} : Shape{N, 1};
    QSHARD_RETURN_IF_ERROR(CheckTensor(w.name, "weight_scale", s, float_types, want));
    g.bn = 1;
    g.bk = K;
    g.rows = N;
    g.cols = 1;
  }
  g.scale.resize(static_cast<size_t>(g.rows * g.cols));
  for (int64_t i = 0; i < g.rows * g.cols; ++i) g.scale[i] = FloatAt(s, i);
  if (!w.input_scale.empty()) {
    QSHARD_RETURN_IF_ERROR(
        CheckTensor(w.name, "input_scale", w.input_scale, float_types, w.input_scale.shape()));
    if (w.input_scale.numel() != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat(w.name, ".input_scale: shape ", ShapeToString(w.input_scale.shape()),
                       ", expected one per-tensor scale ([] or [1])"));
    }
  }
  return g;
}

}  // namespace qshard
