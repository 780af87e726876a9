// File: linear_weights.h
// The weights of one linear layer as read from a checkpoint, in whatever format the
// checkpoint stores them. Backends turn this into a prepared LinearOp (possibly repacked).
//
// Shapes use K = in_features, N = out_features, G = number of weight groups along K.
#ifndef QSHARD_QUANT_LINEAR_WEIGHTS_H_
#define QSHARD_QUANT_LINEAR_WEIGHTS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/base/tensor.h"

namespace qshard {

enum class WeightFormat {
  kDense,   // weight [N, K] in bf16 / f16 / f32
  kGptq,    // qweight [K*bits/32, N] i32, qzeros [G, N*bits/32] i32, scales [G, N],
            // g_idx [K] i32 (optional: k / group_size when absent)
  kAwq,     // qweight [K, N/8] i32 (interleaved nibbles), qzeros [G, N/8] i32, scales [G, N]
  kPacked,  // compressed-tensors pack-quantized: weight_packed [N, K*bits/32] i32,
            // weight_scale [N, G], weight_zero_point [N*bits/32, G] i32 (asymmetric),
            // weight_g_idx [K] (optional)
  kFp8,     // weight [N, K] float8_e4m3fn + weight_scale ([1], [N, 1] or [N/bn, K/bk])
  kInt8,    // weight [N, K] int8 + weight_scale ([1] or [N, 1]), symmetric
};
const char* WeightFormatName(WeightFormat f);

// What happens to the input of a quantized Linear before the multiply.
enum class ActQuant {
  kNone,              // weight-only: activations stay float
  kFp8PerToken,       // e4m3, scale = amax(row) / 448, computed per token
  kFp8PerTokenGroup,  // e4m3 per token and per act_group_size inputs (block fp8)
  kFp8Static,         // e4m3 with the checkpoint's input_scale
  kInt8PerToken,      // int8 symmetric, scale = amax(row) / 127, per token
};
const char* ActQuantName(ActQuant a);

struct LinearWeights {
  std::string name;  // module name, e.g. "model.layers.0.self_attn.q_proj"
  int64_t in_features = 0;
  int64_t out_features = 0;
  WeightFormat format = WeightFormat::kDense;
  Tensor weight;  // kDense: [N, K]; kFp8 / kInt8: [N, K] codes
  Tensor bias;    // [N] or empty

  // --- integer formats (kGptq, kAwq, kPacked) ---
  int bits = 16;
  int64_t group_size = -1;           // -1: one group spans all of K
  bool gptq_zeros_minus_one = true;  // GPTQ v1 (checkpoint_format "gptq") vs gptq_v2
  bool has_zero_point = true;        // false: symmetric, implicit zero 2^(bits-1)
  Tensor qweight;                    // gptq / awq / packed (weight_packed) codes
  Tensor qzeros;                     // gptq / awq / packed (weight_zero_point), may be empty
  Tensor scales;                     // gptq / awq: [G, N]; packed: weight_scale [N, G]
  Tensor g_idx;                      // [K] int32 or empty

  // --- fp8 / int8 ---
  Tensor weight_scale;              // f32: [1], [N, 1] or [ceil(N/bn), ceil(K/bk)]
  Tensor input_scale;               // f32 [1] (static activation scheme) or empty
  std::vector<int64_t> block_size;  // [bn, bk] for block-wise weight scales; else empty
  ActQuant act_quant = ActQuant::kNone;
  int64_t act_group_size = 0;  // kFp8PerTokenGroup
};

inline const char* WeightFormatName(WeightFormat f) {
  switch (f) {
    case WeightFormat::kDense:
      return "dense";
    case WeightFormat::kGptq:
      return "gptq";
    case WeightFormat::kAwq:
      return "awq";
    case WeightFormat::kPacked:
      return "pack-quantized";
    case WeightFormat::kFp8:
      return "fp8";
    case WeightFormat::kInt8:
      return "int8";
  }
  return "?";
}

inline const char* ActQuantName(ActQuant a) {
  switch (a) {
    case ActQuant::kNone:
      return "none";
    case ActQuant::kFp8PerToken:
      return "fp8-per-token";
    case ActQuant::kFp8PerTokenGroup:
      return "fp8-per-token-group";
    case ActQuant::kFp8Static:
      return "fp8-static";
    case ActQuant::kInt8PerToken:
      return "int8-per-token";
  }
  return "?";
}

}  // namespace qshard

#endif  // QSHARD_QUANT_LINEAR_WEIGHTS_H_
