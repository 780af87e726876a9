#include "runtime/checkpoint/model_config.h"

#include <algorithm>
#include <array>
#include <filesystem>
#include <limits>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "runtime/base/log.h"
#include "runtime/base/mapped_file.h"
#include "runtime/base/status_macros.h"

namespace qshard {
namespace {

using json = nlohmann::json;

// (architecture, model_type) pairs this engine runs; both share the Llama forward pass.
constexpr std::array<std::pair<const char*, const char*>, 2> kArchitectures = {{
    {"LlamaForCausalLM", "llama"},
    {"MistralForCausalLM", "mistral"},
}};

constexpr char kRequiredFields[] =
    "architectures (or model_type), hidden_size, intermediate_size, num_hidden_layers, "
    "num_attention_heads, vocab_size";

std::string SupportedArchitectures() {
  std::vector<std::string> names;
  for (const auto& [arch, type] : kArchitectures) names.push_back(arch);
  return absl::StrJoin(names, ", ");
}

std::string Describe(const json& v) {
  std::string text = v.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return absl::StrCat(std::string(v.type_name()), " ", text);
}

// Field accessors: `where` is the file (plus sub-object) named in errors. A JSON null counts
// as absent because transformers writes null for unset optional fields.
class Fields {
 public:
  Fields(const json& obj, std::string where) : obj_(obj), where_(std::move(where)) {}

  const json* Find(const char* key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  absl::StatusOr<std::optional<int64_t>> Int(const char* key) const {
    const json* v = Find(key);
    if (v == nullptr) return std::optional<int64_t>();
    if (v->is_number_integer()) {
      if (v->is_number_unsigned() &&
          v->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(key, "an integer that fits in 64 bits", *v);
      }
      return std::optional<int64_t>(v->get<int64_t>());
    }
    return Error(key, "an integer", *v);
  }

  absl::StatusOr<int64_t> RequiredInt(const char* key) const {
    QSHARD_ASSIGN_OR_RETURN(std::optional<int64_t> v, Int(key));
    if (!v) return Missing(key);
    return *v;
  }

  absl::StatusOr<std::optional<double>> Double(const char* key) const {
    const json* v = Find(key);
    if (v == nullptr) return std::optional<double>();
    if (!v->is_number()) return Error(key, "a number", *v);
    return std::optional<double>(v->get<double>());
  }

  absl::StatusOr<std::optional<bool>> Bool(const char* key) const {
    const json* v = Find(key);
    if (v == nullptr) return std::optional<bool>();
    if (!v->is_boolean()) return Error(key, "true or false", *v);
    return std::optional<bool>(v->get<bool>());
  }

  absl::StatusOr<std::optional<std::string>> String(const char* key) const {
    const json* v = Find(key);
    if (v == nullptr) return std::optional<std::string>();
    if (!v->is_string()) return Error(key, "a string", *v);
    return std::optional<std::string>(v->get<std::string>());
  }

  // Token ids: a single integer or a list of integers (eos_token_id is either).
  absl::StatusOr<std::vector<int32_t>> TokenIds(const char* key) const {
    std::vector<int32_t> ids;
    const json* v = Find(key);
    if (v == nullptr) return ids;
    auto add = [&](const json& e) -> absl::Status {
      if (!e.is_number_integer() || e.get<int64_t>() < 0 ||
          e.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        return Error(key, "a non-negative 32-bit token id or a list of them", *v);
      }
      int32_t id = static_cast<int32_t>(e.get<int64_t>());
      if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
      return absl::OkStatus();
    };
    if (v->is_array()) {
      for (const json& e : *v) QSHARD_RETURN_IF_ERROR(add(e));
    } else {
      QSHARD_RETURN_IF_ERROR(add(*v));
    }
    return ids;
  }

  absl::Status Error(const char* key, const char* expected, const json& found) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ": field '", key, "' must be ", expected,
                                                   ", found ", Describe(found)));
  }
  absl::Status Missing(const char* key) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ": missing required field '", key,
                                                   "'; required fields: ", kRequiredFields));
  }
  absl::Status Invalid(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ": ", what));
  }
  const std::string& where() const { return where_; }

 private:
  const json& obj_;
  std::string where_;
};

absl::StatusOr<json> ParseObject(std::string_view text, const std::string& source) {
  json j;
  try {
    j = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    // Caught here so no exception leaves the component; what() carries the error position.
    return absl::InvalidArgumentError(absl::StrCat(source, ": malformed JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": expected a JSON object, found ", std::string(j.type_name())));
  }
  return j;
}

// Reads RoPE settings from either layout. transformers 4 puts `rope_theta` at the top level
// and scaling under `rope_scaling`; transformers 5 puts everything under `rope_parameters`.
absl::StatusOr<RopeConfig> ParseRope(const json& root, const std::string& source) {
  Fields top(root, source);
  RopeConfig rope;
  QSHARD_ASSIGN_OR_RETURN(std::optional<double> top_theta, top.Double("rope_theta"));

  const char* section = nullptr;
  if (top.Find("rope_parameters") != nullptr) {
    section = "rope_parameters";
  } else if (top.Find("rope_scaling") != nullptr) {
    section = "rope_scaling";
  }
  if (section == nullptr) {
    rope.theta = top_theta.value_or(rope.theta);
  } else {
    const json& params = *top.Find(section);
    if (!params.is_object()) return top.Error(section, "an object", params);
    Fields f(params, absl::StrCat(source, ": ", section));
    QSHARD_ASSIGN_OR_RETURN(std::optional<double> theta, f.Double("rope_theta"));
    rope.theta = theta.value_or(top_theta.value_or(rope.theta));
    // "type" is the older spelling of "rope_type".
    QSHARD_ASSIGN_OR_RETURN(std::optional<std::string> type, f.String("rope_type"));
    if (!type) {
      QSHARD_ASSIGN_OR_RETURN(type, f.String("type"));
    }
    const std::string type_name = type.value_or("default");
    auto required = [&](const char* key) -> absl::StatusOr<double> {
      QSHARD_ASSIGN_OR_RETURN(std::optional<double> v, f.Double(key));
      if (!v) {
        return f.Invalid(absl::StrCat("rope_type '", type_name, "' needs field '", key, "'"));
      }
      return *v;
    };
    if (type_name == "default") {
      rope.type = RopeType::kDefault;
    } else if (type_name == "linear") {
      rope.type = RopeType::kLinear;
      QSHARD_ASSIGN_OR_RETURN(rope.factor, required("factor"));
    } else if (type_name == "llama3") {
      rope.type = RopeType::kLlama3;
      QSHARD_ASSIGN_OR_RETURN(rope.factor, required("factor"));
      QSHARD_ASSIGN_OR_RETURN(rope.low_freq_factor, required("low_freq_factor"));
      QSHARD_ASSIGN_OR_RETURN(rope.high_freq_factor, required("high_freq_factor"));
      QSHARD_ASSIGN_OR_RETURN(std::optional<int64_t> original,
                              f.Int("original_max_position_embeddings"));
      if (!original) {
        return f.Invalid("rope_type 'llama3' needs field 'original_max_position_embeddings'");
      }
      rope.original_max_position_embeddings = *original;
      if (rope.original_max_position_embeddings <= 0) {
        return f.Invalid(absl::StrCat("original_max_position_embeddings must be positive, found ",
                                      rope.original_max_position_embeddings));
      }
      // The llama3 ramp divides by (high - low); equal factors would divide by zero.
      if (!(rope.high_freq_factor > rope.low_freq_factor) || !(rope.low_freq_factor > 0)) {
        return f.Invalid(absl::StrCat(
            "llama3 needs 0 < low_freq_factor < high_freq_factor, found low_freq_factor ",
            rope.low_freq_factor, " and high_freq_factor ", rope.high_freq_factor));
      }
    } else {
      return absl::UnimplementedError(absl::StrCat(source, ": ", section,
                                                   ": unsupported rope_type '", type_name,
                                                   "'; supported: default, linear, llama3"));
    }
    if (!(rope.factor > 0)) {
      return f.Invalid(absl::StrCat("rope factor must be positive, found ", rope.factor));
    }
  }
  if (!(rope.theta > 0)) {
    return top.Invalid(absl::StrCat("rope_theta must be positive, found ", rope.theta));
  }
  return rope;
}

}  // namespace

std::string_view RopeTypeName(RopeType t) {
  switch (t) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kLlama3:
      return "llama3";
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text,
                                             std::string_view source_view) {
  const std::string source(source_view);
  QSHARD_ASSIGN_OR_RETURN(json root, ParseObject(json_text, source));
  Fields f(root, source);
  ModelConfig cfg;

  // Architecture: the first supported entry of `architectures`, else from model_type.
  QSHARD_ASSIGN_OR_RETURN(std::optional<std::string> model_type, f.String("model_type"));
  const json* archs = f.Find("architectures");
  if (archs != nullptr && !(archs->is_array() && archs->empty())) {
    if (!archs->is_array()) return f.Error("architectures", "a list of strings", *archs);
    std::vector<std::string> listed;
    for (const json& a : *archs) {
      if (!a.is_string()) return f.Error("architectures", "a list of strings", *archs);
      listed.push_back(a.get<std::string>());
    }
    for (const std::string& a : listed) {
      for (const auto& [arch, type] : kArchitectures) {
        if (cfg.architecture.empty() && a == arch) {
          cfg.architecture = arch;
          if (!model_type) model_type = type;
        }
      }
    }
    if (cfg.architecture.empty()) {
      return absl::UnimplementedError(absl::StrCat(source, ": unsupported architecture '",
                                                   absl::StrJoin(listed, "', '"),
                                                   "'; supported: ", SupportedArchitectures()));
    }
  } else if (model_type) {
    for (const auto& [arch, type] : kArchitectures) {
      if (*model_type == type) cfg.architecture = arch;
    }
    if (cfg.architecture.empty()) {
      return absl::UnimplementedError(
          absl::StrCat(source, ": no 'architectures' and unsupported model_type '", *model_type,
                       "'; supported: llama, mistral (", SupportedArchitectures(), ")"));
    }
  } else {
    return f.Missing("architectures");
  }
  cfg.model_type = *model_type;

  QSHARD_ASSIGN_OR_RETURN(cfg.hidden_size, f.RequiredInt("hidden_size"));
  QSHARD_ASSIGN_OR_RETURN(cfg.intermediate_size, f.RequiredInt("intermediate_size"));
  QSHARD_ASSIGN_OR_RETURN(cfg.num_layers, f.RequiredInt("num_hidden_layers"));
  QSHARD_ASSIGN_OR_RETURN(cfg.num_heads, f.RequiredInt("num_attention_heads"));
  QSHARD_ASSIGN_OR_RETURN(cfg.vocab_size, f.RequiredInt("vocab_size"));

  QSHARD_ASSIGN_OR_RETURN(std::optional<int64_t> kv_heads, f.Int("num_key_value_heads"));
  cfg.num_kv_heads = kv_heads.value_or(cfg.num_heads);
  QSHARD_ASSIGN_OR_RETURN(std::optional<int64_t> max_pos, f.Int("max_position_embeddings"));
  cfg.max_position_embeddings = max_pos.value_or(2048);
  QSHARD_ASSIGN_OR_RETURN(std::optional<double> eps, f.Double("rms_norm_eps"));
  cfg.rms_norm_eps = eps.value_or(cfg.rms_norm_eps);
  QSHARD_ASSIGN_OR_RETURN(std::optional<bool> tie, f.Bool("tie_word_embeddings"));
  cfg.tie_word_embeddings = tie.value_or(false);
  QSHARD_ASSIGN_OR_RETURN(std::optional<bool> attn_bias, f.Bool("attention_bias"));
  cfg.attention_bias = attn_bias.value_or(false);
  QSHARD_ASSIGN_OR_RETURN(std::optional<bool> mlp_bias, f.Bool("mlp_bias"));
  cfg.mlp_bias = mlp_bias.value_or(false);

  // Positive sizes first, so the divisions below are safe.
  const std::pair<const char*, int64_t> sizes[] = {
      {"hidden_size", cfg.hidden_size},
      {"intermediate_size", cfg.intermediate_size},
      {"num_hidden_layers", cfg.num_layers},
      {"num_attention_heads", cfg.num_heads},
      {"num_key_value_heads", cfg.num_kv_heads},
      {"vocab_size", cfg.vocab_size},
      {"max_position_embeddings", cfg.max_position_embeddings},
  };
  for (const auto& [name, value] : sizes) {
    if (value <= 0) return f.Invalid(absl::StrCat(name, " must be positive, found ", value));
  }
  if (cfg.num_heads % cfg.num_kv_heads != 0) {
    return f.Invalid(absl::StrCat("num_attention_heads (", cfg.num_heads,
                                  ") must be a multiple of num_key_value_heads (", cfg.num_kv_heads,
                                  ") for grouped-query attention"));
  }
  QSHARD_ASSIGN_OR_RETURN(std::optional<int64_t> head_dim, f.Int("head_dim"));
  if (head_dim) {
    cfg.head_dim = *head_dim;
  } else {
    if (cfg.hidden_size % cfg.num_heads != 0) {
      return f.Invalid(absl::StrCat("hidden_size (", cfg.hidden_size,
                                    ") is not divisible by num_attention_heads (", cfg.num_heads,
                                    ") and no head_dim is given"));
    }
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
  }
  if (cfg.head_dim <= 0 || cfg.head_dim % 2 != 0) {
    // RoPE rotates pairs of dimensions, so an odd head_dim cannot be right.
    return f.Invalid(absl::StrCat("head_dim must be a positive even number, found ", cfg.head_dim));
  }
  if (!(cfg.rms_norm_eps > 0)) {
    return f.Invalid(absl::StrCat("rms_norm_eps must be positive, found ", cfg.rms_norm_eps));
  }

  QSHARD_ASSIGN_OR_RETURN(std::optional<std::string> act, f.String("hidden_act"));
  if (act && *act != "silu") {
    return absl::UnimplementedError(
        absl::StrCat(source, ": unsupported hidden_act '", *act, "'; supported: silu"));
  }

  QSHARD_ASSIGN_OR_RETURN(std::vector<int32_t> bos, f.TokenIds("bos_token_id"));
  if (bos.size() > 1) return f.Error("bos_token_id", "a single token id", *f.Find("bos_token_id"));
  cfg.bos_token_id = bos.empty() ? -1 : bos[0];
  QSHARD_ASSIGN_OR_RETURN(cfg.eos_token_ids, f.TokenIds("eos_token_id"));
  if (cfg.bos_token_id >= cfg.vocab_size) {
    return f.Invalid(absl::StrCat("bos_token_id ", cfg.bos_token_id, " is outside the vocabulary (",
                                  cfg.vocab_size, " tokens)"));
  }
  for (int32_t id : cfg.eos_token_ids) {
    if (id >= cfg.vocab_size) {
      return f.Invalid(absl::StrCat("eos_token_id ", id, " is outside the vocabulary (",
                                    cfg.vocab_size, " tokens)"));
    }
  }

  // transformers 5 writes "dtype", older versions "torch_dtype"; "auto" means unspecified.
  const char* dtype_key = f.Find("dtype") != nullptr ? "dtype" : "torch_dtype";
  QSHARD_ASSIGN_OR_RETURN(std::optional<std::string> dtype, f.String(dtype_key));
  if (dtype && *dtype != "auto") {
    auto parsed = ParseTorchDType(*dtype);
    if (!parsed.ok()) {
      return f.Invalid(absl::StrCat("field '", dtype_key, "': ", parsed.status().message()));
    }
    cfg.dtype = *parsed;
  }

  QSHARD_ASSIGN_OR_RETURN(cfg.rope, ParseRope(root, source));

  if (const json* q = f.Find("quantization_config")) {
    if (!q->is_object()) return f.Error("quantization_config", "an object", *q);
    cfg.quantization_config_json = q->dump();
  }

  QSHARD_ASSIGN_OR_RETURN(std::optional<int64_t> window, f.Int("sliding_window"));
  if (window && *window > 0 && *window < cfg.max_position_embeddings) {
    QSHARD_LOG(WARNING) << source << ": sliding_window " << *window
                        << " is ignored; attention spans the full context";
  }
  return cfg;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const std::string config_path = (fs::path(dir) / "config.json").string();
  if (!fs::is_regular_file(config_path, ec)) {
    return absl::NotFoundError(
        absl::StrCat("no config.json in '", dir, "' (looked for '", config_path, "')"));
  }
  QSHARD_ASSIGN_OR_RETURN(std::string text, ReadTextFile(config_path));
  QSHARD_ASSIGN_OR_RETURN(ModelConfig cfg, ParseModelConfig(text, config_path));

  // generation_config.json often lists extra stop ids (e.g. Llama 3's <|eot_id|>).
  const std::string gen_path = (fs::path(dir) / "generation_config.json").string();
  if (fs::is_regular_file(gen_path, ec)) {
    QSHARD_ASSIGN_OR_RETURN(std::string gen_text, ReadTextFile(gen_path));
    QSHARD_ASSIGN_OR_RETURN(json gen, ParseObject(gen_text, gen_path));
    Fields g(gen, gen_path);
    QSHARD_ASSIGN_OR_RETURN(std::vector<int32_t> eos, g.TokenIds("eos_token_id"));
    for (int32_t id : eos) {
      if (id >= cfg.vocab_size) {
        return g.Invalid(absl::StrCat("eos_token_id ", id, " is outside the vocabulary (",
                                      cfg.vocab_size, " tokens)"));
      }
      if (std::find(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end(), id) ==
          cfg.eos_token_ids.end()) {
        cfg.eos_token_ids.push_back(id);
      }
    }
    if (cfg.bos_token_id < 0) {
      QSHARD_ASSIGN_OR_RETURN(std::vector<int32_t> bos, g.TokenIds("bos_token_id"));
      if (bos.size() == 1 && bos[0] < cfg.vocab_size) cfg.bos_token_id = bos[0];
    }
  }
  return cfg;
}

}  // namespace qshard
