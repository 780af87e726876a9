// File: int_quant_matrix.h
// The common unpacked form of every integer weight format (GPTQ, AWQ, compressed-tensors
// pack-quantized and int8): one unsigned code per weight plus per-group scale and zero,
//
//   W[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n])
//
// Format readers (gptq_format.h, awq_format.h, compressed_tensors.h) produce it from the
// checkpoint tensors; backends repack it into their kernel layout and drop it, so it only
// lives for one layer at a time during loading.
#ifndef QSHARD_QUANT_INT_QUANT_MATRIX_H_
#define QSHARD_QUANT_INT_QUANT_MATRIX_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/base/tensor.h"

namespace qshard {

struct IntQuantMatrix {
  int64_t in_features = 0;     // K
  int64_t out_features = 0;    // N
  int bits = 4;                // codes are in [0, 2^bits)
  int64_t num_groups = 0;      // G
  std::vector<uint8_t> codes;  // [N, K], output-feature major
  std::vector<float> scales;   // [G, N]
  std::vector<float> zeros;    // [G, N], in code units (not pre-multiplied by the scale)
  std::vector<int32_t> g_idx;  // [K], each in [0, G)

  float Dequant(int64_t n, int64_t k) const {
    const int64_t g = g_idx[k];
    return scales[g * out_features + n] *
           (static_cast<float>(codes[n * in_features + k]) - zeros[g * out_features + n]);
  }
};

namespace quant_internal {

// Element i of a bf16 / f16 / f32 tensor as float.
float FloatAt(const Tensor& t, int64_t i);
// Checks dtype and shape of a format tensor; errors name the layer and the tensor.
absl::Status CheckTensor(const std::string& layer, const char* name, const Tensor& t,
                         std::initializer_list<DType> dtypes, const Shape& shape);
// g_idx [K] from the tensor (validated to lie in [0, G)) or the default k / group_size.
absl::StatusOr<std::vector<int32_t>> GroupIndex(const std::string& layer, const Tensor& g_idx,
                                                int64_t k, int64_t group_size, int64_t num_groups);

}  // namespace quant_internal
}  // namespace qshard

#endif  // QSHARD_QUANT_INT_QUANT_MATRIX_H_
