// File: compressed_tensors.h
// compressed-tensors (llm-compressor) and vLLM-fp8 weight layouts.
//
// pack-quantized (W4A16 / W8A16), K inputs, N outputs, G groups along K:
//   weight_packed     [N, K*bits/32] int32, packed along K: element j of word (n, c) is input
//                     k = c*(32/bits) + j at bits [bits*j, bits*j + bits). Signed values are
//                     stored offset by 2^(bits-1) (so the code of -8 is 0 for 4-bit).
//   weight_scale      [N, G] (f16 / bf16 / f32)
//   weight_zero_point [N*bits/32, G] int32 packed along N the same way (asymmetric only)
//   weight_g_idx      [K] int32 (optional, act-order)
//   W[n, k] = weight_scale[n, g] * (code - zero), zero = 2^(bits-1) when symmetric.
// int-quantized: weight [N, K] int8, weight_scale [N, 1] or [1]; W = scale * q.
// float-quantized / vLLM fp8: weight [N, K] float8_e4m3fn; weight_scale (or
//   weight_scale_inv for block-wise) f32: [1], [N, 1], or [ceil(N/bn), ceil(K/bk)];
//   W = fp8 * scale (weight_scale_inv is multiplied too, despite its name).
#ifndef QSHARD_QUANT_COMPRESSED_TENSORS_H_
#define QSHARD_QUANT_COMPRESSED_TENSORS_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/int_quant_matrix.h"
#include "quant/linear_weights.h"

namespace qshard {

// kPacked: w.qweight = weight_packed, w.scales = weight_scale, w.qzeros = weight_zero_point
// (empty when symmetric), w.g_idx = weight_g_idx (may be empty).
absl::StatusOr<IntQuantMatrix> UnpackPackQuantized(const LinearWeights& w);
// kInt8: w.weight int8 [N, K], w.weight_scale [N, 1] / [N] / [1]. Codes are q + 128.
absl::StatusOr<IntQuantMatrix> UnpackInt8(const LinearWeights& w);

// An fp8 weight's scales as a grid of [rows, cols] tiles of [bn, bk] weights: per-tensor is
// one tile of [N, K], per-channel N tiles of [1, K], block-wise the checkpoint's grid.
struct Fp8ScaleGrid {
  int64_t bn = 1, bk = 1;
  int64_t rows = 0, cols = 0;
  std::vector<float> scale;  // [rows, cols]
  float at(int64_t n, int64_t k) const { return scale[(n / bn) * cols + k / bk]; }
};
// Validates w.weight (float8_e4m3fn [N, K]) and w.weight_scale against w.block_size.
absl::StatusOr<Fp8ScaleGrid> Fp8Scales(const LinearWeights& w);

}  // namespace qshard

#endif  // QSHARD_QUANT_COMPRESSED_TENSORS_H_
