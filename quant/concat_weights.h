// File: concat_weights.h
// Load-time fusion of Linears that read the same input: q_proj | k_proj | v_proj and
// gate_proj | up_proj become one Linear whose output holds the parts' outputs side by side,
//
//   y[T, N_0 + N_1 + ...] = [ x . W_0^T | x . W_1^T | ... ]       (x [T, K], W_i [N_i, K])
//
// so a decoder layer runs one GEMM (one kernel launch, one thread-pool dispatch) instead of
// three or two, and the small k / v matrices stream together with q (vLLM's QKVParallelLinear
// and MergedColumnParallelLinear, done here on the checkpoint tensors). The concatenation is
// along the output dimension N, in each format's own checkpoint layout (linear_weights.h), so
// the result is prepared by Backend::PrepareLinear like any checkpoint Linear and its
// dequantized matrix is exactly the parts' dequantized matrices stacked row-wise:
//   dense, fp8, int8  weight [N, K]: rows. weight_scale: per-channel [N, 1] / [N] rows;
//                     per-tensor [1] scales that are all equal stay one [1] scale, otherwise
//                     every part becomes per-channel (its value repeated N_i times, same
//                     dtype, so exact) and the result is [N, 1]; block-wise scales
//                     [ceil(N/bn), ceil(K/bk)] rows, which needs N_i % bn == 0 for every part
//                     but the last (a partial block row would mix two parts).
//   gptq              qweight [K*bits/32, N], scales [G, N], qzeros [G, N*bits/32]: columns
//                     (N_i % (32/bits) == 0, as the format requires anyway); g_idx shared.
//   awq               qweight [K, N/8], qzeros [G, N/8], scales [G, N]: columns.
//   pack-quantized    weight_packed [N, K*bits/32], weight_scale [N, G]: rows;
//                     weight_zero_point [ceil(N*bits/32), G]: rows, which needs
//                     N_i % (32/bits) == 0 for every part but the last; g_idx shared.
//   bias [N]          rows (every part has one, or none has).
//
// Refused, with an error naming the part and what differs (callers then keep the parts
// separate): different formats, in_features, bits, group sizes, zero-point conventions,
// activation schemes (act_quant, act_group_size), block sizes, tensor dtypes or presence,
// static input_scale values, g_idx, shapes that do not match the part's N / K, an N that
// breaks the packing, or tensors not in host memory. Every tensor of the result is a new host
// tensor owned by the result (none aliases a part); the parts are not modified.
//
//   std::vector<const LinearWeights*> parts = {&q, &k, &v};
//   QSHARD_ASSIGN_OR_RETURN(LinearWeights qkv,
//                           ConcatLinearWeights(parts, "model.layers.0.self_attn.qkv_proj"));
//   auto op = backend->PrepareLinear(qkv);   // y[:, 0:Nq] = q, [Nq:Nq+Nk] = k, then v
#ifndef QSHARD_QUANT_CONCAT_WEIGHTS_H_
#define QSHARD_QUANT_CONCAT_WEIGHTS_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "quant/linear_weights.h"

namespace qshard {

// The parts concatenated along N in order, named `name`. At least one part.
absl::StatusOr<LinearWeights> ConcatLinearWeights(absl::Span<const LinearWeights* const> parts,
                                                  std::string name);

}  // namespace qshard

#endif  // QSHARD_QUANT_CONCAT_WEIGHTS_H_
