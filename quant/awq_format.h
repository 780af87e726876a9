// File: awq_format.h
// AutoAWQ GEMM checkpoint layout (quant_method "awq", version "gemm"), 4-bit.
//
// Per Linear with K inputs, N outputs, G = K / group_size groups:
//   qweight [K, N/8] int32: nibble i (bits 4i..4i+3) of word (k, c) holds column
//           8c + kAwqOrder[i], kAwqOrder = {0, 2, 4, 6, 1, 3, 5, 7} (interleaved).
//   qzeros  [G, N/8] int32, same interleave; zeros stored as is (no "+1" as in GPTQ v1).
//   scales  [G, N] f16.
//   W[k, n] = scales[k / group_size, n] * (q[k, n] - zero[k / group_size, n])
#ifndef QSHARD_QUANT_AWQ_FORMAT_H_
#define QSHARD_QUANT_AWQ_FORMAT_H_

#include "absl/status/statusor.h"
#include "quant/int_quant_matrix.h"
#include "quant/linear_weights.h"

namespace qshard {

// Column offset (within a word's 8) held by nibble i.
inline constexpr int kAwqOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};

// Unpacks w.qweight / w.qzeros (may be empty: symmetric, zero 8) / w.scales.
absl::StatusOr<IntQuantMatrix> UnpackAwq(const LinearWeights& w);

}  // namespace qshard

#endif  // QSHARD_QUANT_AWQ_FORMAT_H_
