// File: gptq_format.h
// AutoGPTQ / GPTQModel checkpoint layout (quant_method "gptq"), bits 4 and 8.
//
// Per Linear with K inputs, N outputs, G = ceil(K / group_size) groups (1 when -1):
//   qweight [K*bits/32, N] int32: word (r, n) holds input rows k = r*(32/bits) + j,
//           element j at bits [bits*j, bits*j + bits) (LSB = lowest k), no interleave.
//   qzeros  [G, N*bits/32] int32: word (g, c) holds columns n = c*(32/bits) + j, same order.
//           checkpoint_format "gptq" (v1) stores zero - 1; "gptq_v2" stores the zero.
//   scales  [G, N] f16 (or the model dtype);  g_idx [K] int32 (group of each input row;
//           non-monotone with desc_act).
//   W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])
#ifndef QSHARD_QUANT_GPTQ_FORMAT_H_
#define QSHARD_QUANT_GPTQ_FORMAT_H_

#include "absl/status/statusor.h"
#include "quant/int_quant_matrix.h"
#include "quant/linear_weights.h"

namespace qshard {

// Unpacks w.qweight / w.qzeros / w.scales / w.g_idx (w.bits, w.group_size,
// w.gptq_zeros_minus_one) after checking every shape and dtype.
absl::StatusOr<IntQuantMatrix> UnpackGptq(const LinearWeights& w);

}  // namespace qshard

#endif  // QSHARD_QUANT_GPTQ_FORMAT_H_
