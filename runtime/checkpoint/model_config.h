// File: model_config.h
// The Llama-family model configuration read from config.json (+ generation_config.json).
//
//   QSHARD_ASSIGN_OR_RETURN(ModelConfig cfg, LoadModelConfig("models/kjv-llama-12m"));
#ifndef QSHARD_RUNTIME_CHECKPOINT_MODEL_CONFIG_H_
#define QSHARD_RUNTIME_CHECKPOINT_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/base/dtype.h"

namespace qshard {

enum class RopeType { kDefault, kLinear, kLlama3 };
std::string_view RopeTypeName(RopeType t);

struct RopeConfig {
  double theta = 10000.0;
  RopeType type = RopeType::kDefault;
  double factor = 1.0;  // linear and llama3
  // llama3 only (Llama 3.1 "rope_type": "llama3").
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
  bool operator==(const RopeConfig&) const = default;
};

struct ModelConfig {
  std::string architecture;  // "LlamaForCausalLM" or "MistralForCausalLM"
  std::string model_type;    // "llama", "mistral"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;        // num_hidden_layers
  int64_t num_heads = 0;         // num_attention_heads
  int64_t num_kv_heads = 0;      // num_key_value_heads (defaults to num_heads)
  int64_t head_dim = 0;          // defaults to hidden_size / num_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  int32_t bos_token_id = -1;            // -1: none
  std::vector<int32_t> eos_token_ids;   // union of config.json and generation_config.json
  DType dtype = DType::kBF16;           // torch_dtype or dtype
  RopeConfig rope;
  // Raw JSON of "quantization_config" ("" when absent); parsed by quant/.
  std::string quantization_config_json;
};

// Parses the text of a config.json; source names the file in errors. Required fields:
// architectures (one of the supported), hidden_size, intermediate_size, num_hidden_layers,
// num_attention_heads, vocab_size; a missing one is an error listing what is expected.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json, std::string_view source);
// Reads dir/config.json and, when present, dir/generation_config.json (eos ids).
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_CHECKPOINT_MODEL_CONFIG_H_
