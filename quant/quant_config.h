// File: quant_config.h
// One description of how a checkpoint is quantized, parsed from config.json's
// "quantization_config" or from the legacy quantize_config.json (AutoGPTQ) /
// quant_config.json (AutoAWQ) files next to it.
//
//   QSHARD_ASSIGN_OR_RETURN(QuantizationConfig q, LoadQuantizationConfig(dir, cfg_json));
//   if (q.method == QuantMethod::kGptq && q.bits == 4) { ... }
//   if (q.IsIgnored("lm_head")) { ... the lm_head stays dense ... }
//
// Every unsupported value is an error naming the field, the value and what is supported.
#ifndef QSHARD_QUANT_QUANT_CONFIG_H_
#define QSHARD_QUANT_QUANT_CONFIG_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace qshard {

enum class QuantMethod {
  kNone,
  kGptq,               // AutoGPTQ / GPTQModel: qweight, qzeros, scales, g_idx
  kAwq,                // AutoAWQ GEMM: qweight, qzeros, scales (interleaved nibbles)
  kFp8,                // vLLM/HF "fp8": weight e4m3 + weight_scale or weight_scale_inv
  kCompressedTensors,  // llm-compressor: float-quantized / int-quantized / pack-quantized
  kInt8,               // online per-channel int8 W8A8 (only from --quantization int8)
};
std::string_view QuantMethodName(QuantMethod m);  // "none", "gptq", "awq", ...

// GPTQ's zero-point convention: v1 stores zero - 1, v2 stores the true zero.
enum class GptqCheckpointFormat { kGptq, kGptqV2 };

// compressed-tensors "format".
enum class CompressedFormat {
  kNone,
  kFloatQuantized,  // fp8 e4m3 weight [N, K] + weight_scale
  kIntQuantized,    // int8 weight [N, K] + weight_scale
  kPackQuantized,   // int4/int8 packed into int32: weight_packed [N, K*bits/32]
};
std::string_view CompressedFormatName(CompressedFormat f);

// How one weight scale is shared.
enum class WeightStrategy {
  kTensor,   // one scale per tensor
  kChannel,  // one per output feature
  kGroup,    // one per (output feature, group of group_size input features)
  kBlock,    // one per [block_n, block_k] tile
};
std::string_view WeightStrategyName(WeightStrategy s);

// How the inputs of a quantized Linear are quantized before the multiply.
enum class ActivationScheme {
  kNone,                  // weight-only (W4A16 / W8A16): activations stay in float
  kDynamicPerToken,       // scale = amax(row) / qmax computed at run time for every token
  kStatic,                // one calibrated scale per tensor: the checkpoint's input_scale
  kDynamicPerTokenGroup,  // block fp8: per token and per group of group_size inputs
};
std::string_view ActivationSchemeName(ActivationScheme s);

struct QuantizationConfig {
  QuantMethod method = QuantMethod::kNone;
  int bits = 16;            // weight bits (4 or 8 for the supported integer formats)
  int64_t group_size = -1;  // -1: one group per output channel (all of K)
  bool sym = true;          // symmetric weights (no stored zero point)
  bool desc_act = false;    // GPTQ act-order: g_idx is non-monotone
  GptqCheckpointFormat checkpoint_format = GptqCheckpointFormat::kGptq;
  std::string awq_version;  // "gemm" (the only supported one)
  CompressedFormat compressed_format = CompressedFormat::kNone;
  bool weight_is_float = false;  // fp8 weights (vs integer)
  WeightStrategy weight_strategy = WeightStrategy::kChannel;
  ActivationScheme activation = ActivationScheme::kNone;
  int activation_bits = 16;
  bool activation_is_float = false;
  // Module names (or "re:" regular expressions) kept in their original dtype.
  std::vector<std::string> ignore;
  // [block_n, block_k] for block-wise fp8 scales; empty otherwise.
  std::vector<int64_t> weight_block_size;
  // Where it came from: "config.json", "quantize_config.json", ... (for messages).
  std::string source;

  bool quantized() const { return method != QuantMethod::kNone; }
  // Whether the Linear `module` (e.g. "model.layers.0.mlp.down_proj", "lm_head") is kept
  // unquantized: an exact name, a suffix after a '.', or a "re:" pattern match.
  bool IsIgnored(const std::string& module) const;
  // One line for logs and `qshard inspect`: "gptq 4-bit g128 sym (checkpoint_format gptq)".
  std::string Describe() const;
};

// Parses the JSON text of a quantization_config object; source names it in errors.
absl::StatusOr<QuantizationConfig> ParseQuantizationConfig(std::string_view json,
                                                           std::string_view source);

// The checkpoint's quantization: config.json's quantization_config (the raw JSON from
// ModelConfig::quantization_config_json, may be empty), else dir/quantize_config.json,
// else dir/quant_config.json, else none.
absl::StatusOr<QuantizationConfig> LoadQuantizationConfig(const std::string& dir,
                                                          std::string_view config_json);

}  // namespace qshard

#endif  // QSHARD_QUANT_QUANT_CONFIG_H_
