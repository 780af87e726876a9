#include "quant/quant_config.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "runtime/base/status_macros.h"

namespace qshard {
namespace {

using json = nlohmann::json;

std::string Lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string Show(const json& v) {
  std::string text = v.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

// Typed access to one JSON object; `where` ("config.json: quantization_config.config_groups
// .group_0.weights") prefixes every error. null counts as absent (HF writes null for unset).
class Obj {
 public:
  Obj(const json& obj, std::string where) : obj_(obj), where_(std::move(where)) {}

  const json* Find(const char* key) const {
    auto it = obj_.find(key);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }
  bool Has(const char* key) const { return Find(key) != nullptr; }

  absl::Status Error(const char* key, const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(where_, ".", key, ": ", what));
  }
  absl::Status Unsupported(const char* key, const json& v, const std::string& supported) const {
    return Error(key, absl::StrCat(Show(v), " is not supported (supported: ", supported, ")"));
  }

  absl::StatusOr<int64_t> Int(const char* key, int64_t dflt) const {
    const json* v = Find(key);
    if (v == nullptr) return dflt;
    if (!v->is_number_integer())
      return Error(key, absl::StrCat("expected an integer, got ", Show(*v)));
    return v->get<int64_t>();
  }
  absl::StatusOr<bool> Bool(const char* key, bool dflt) const {
    const json* v = Find(key);
    if (v == nullptr) return dflt;
    if (!v->is_boolean()) return Error(key, absl::StrCat("expected true or false, got ", Show(*v)));
    return v->get<bool>();
  }
  absl::StatusOr<std::string> Str(const char* key, const std::string& dflt) const {
    const json* v = Find(key);
    if (v == nullptr) return dflt;
    if (!v->is_string()) return Error(key, absl::StrCat("expected a string, got ", Show(*v)));
    return v->get<std::string>();
  }
  // A list of strings (module names); a single string counts as a list of one.
  absl::StatusOr<std::vector<std::string>> Names(const char* key) const {
    std::vector<std::string> out;
    const json* v = Find(key);
    if (v == nullptr) return out;
    if (v->is_string()) return std::vector<std::string>{v->get<std::string>()};
    if (!v->is_array()) return Error(key, absl::StrCat("expected a list of names, got ", Show(*v)));
    for (const json& e : *v) {
      if (!e.is_string()) return Error(key, absl::StrCat("expected strings, got ", Show(e)));
      out.push_back(e.get<std::string>());
    }
    return out;
  }
  absl::StatusOr<Obj> Child(const char* key) const {
    const json* v = Find(key);
    if (v == nullptr || !v->is_object()) {
      return Error(key, v == nullptr ? "missing (expected an object)"
                                     : absl::StrCat("expected an object, got ", Show(*v)));
    }
    return Obj(*v, absl::StrCat(where_, ".", key));
  }
  const json& raw() const { return obj_; }
  const std::string& where() const { return where_; }

 private:
  const json& obj_;
  std::string where_;
};

absl::Status CheckGroupSize(const Obj& o, const char* key, int64_t g) {
  if (g == -1 || g > 0) return absl::OkStatus();
  return o.Unsupported(key, json(g),
                       "-1 for per-channel, or a positive group size such as "
                       "32, 64, 128");
}

absl::Status ParseGptq(const Obj& o, QuantizationConfig& q) {
  q.method = QuantMethod::kGptq;
  QSHARD_ASSIGN_OR_RETURN(int64_t bits, o.Int("bits", 4));
  if (bits != 4 && bits != 8) return o.Unsupported("bits", json(bits), "4, 8");
  q.bits = static_cast<int>(bits);
  QSHARD_ASSIGN_OR_RETURN(q.group_size, o.Int("group_size", 128));
  QSHARD_RETURN_IF_ERROR(CheckGroupSize(o, "group_size", q.group_size));
  QSHARD_ASSIGN_OR_RETURN(q.sym, o.Bool("sym", true));
  QSHARD_ASSIGN_OR_RETURN(q.desc_act, o.Bool("desc_act", false));
  // GPTQModel writes checkpoint_format; older HF configs may spell it "format".
  std::string fmt_key = o.Has("checkpoint_format") ? "checkpoint_format" : "format";
  QSHARD_ASSIGN_OR_RETURN(std::string fmt, o.Str(fmt_key.c_str(), "gptq"));
  fmt = Lower(fmt);
  if (fmt == "gptq") {
    q.checkpoint_format = GptqCheckpointFormat::kGptq;
  } else if (fmt == "gptq_v2") {
    q.checkpoint_format = GptqCheckpointFormat::kGptqV2;
  } else {
    return o.Unsupported(fmt_key.c_str(), json(fmt), "gptq (v1, zeros stored minus one), gptq_v2");
  }
  QSHARD_ASSIGN_OR_RETURN(bool marlin, o.Bool("is_marlin_format", false));
  if (marlin) {
    return o.Unsupported("is_marlin_format", json(true), "false (AutoGPTQ layout only)");
  }
  QSHARD_ASSIGN_OR_RETURN(std::string pack, o.Str("pack_dtype", "int32"));
  if (pack != "int32") return o.Unsupported("pack_dtype", json(pack), "int32");
  QSHARD_ASSIGN_OR_RETURN(q.ignore, o.Names("modules_to_not_convert"));
  return absl::OkStatus();
}

absl::Status ParseAwq(const Obj& o, QuantizationConfig& q) {
  q.method = QuantMethod::kAwq;
  // The legacy quant_config.json spells bits / group_size as w_bit / q_group_size.
  const char* bits_key = o.Has("bits") ? "bits" : "w_bit";
  QSHARD_ASSIGN_OR_RETURN(int64_t bits, o.Int(bits_key, 4));
  if (bits != 4) return o.Unsupported(bits_key, json(bits), "4");
  q.bits = 4;
  const char* group_key = o.Has("group_size") ? "group_size" : "q_group_size";
  QSHARD_ASSIGN_OR_RETURN(q.group_size, o.Int(group_key, 128));
  QSHARD_RETURN_IF_ERROR(CheckGroupSize(o, group_key, q.group_size));
  QSHARD_ASSIGN_OR_RETURN(bool zero_point, o.Bool("zero_point", true));
  q.sym = !zero_point;
  QSHARD_ASSIGN_OR_RETURN(std::string version, o.Str("version", "gemm"));
  q.awq_version = Lower(version);
  if (q.awq_version != "gemm") {
    return o.Unsupported("version", json(version), "gemm (AutoAWQ WQLinear_GEMM layout)");
  }
  QSHARD_ASSIGN_OR_RETURN(q.ignore, o.Names("modules_to_not_convert"));
  return absl::OkStatus();
}

absl::Status ParseFp8(const Obj& o, QuantizationConfig& q) {
  q.method = QuantMethod::kFp8;
  q.bits = 8;
  q.weight_is_float = true;
  q.sym = true;
  QSHARD_ASSIGN_OR_RETURN(std::string fmt, o.Str("fmt", "e4m3"));
  if (Lower(fmt) != "e4m3") return o.Unsupported("fmt", json(fmt), "e4m3");
  QSHARD_ASSIGN_OR_RETURN(std::string scheme, o.Str("activation_scheme", "dynamic"));
  scheme = Lower(scheme);
  if (scheme != "dynamic" && scheme != "static") {
    return o.Unsupported("activation_scheme", json(scheme), "dynamic, static");
  }
  q.activation_bits = 8;
  q.activation_is_float = true;
  if (const json* b = o.Find("weight_block_size")) {
    if (!b->is_array() || b->size() != 2 || !(*b)[0].is_number_integer() ||
        !(*b)[1].is_number_integer() || (*b)[0].get<int64_t>() <= 0 ||
        (*b)[1].get<int64_t>() <= 0) {
      return o.Unsupported("weight_block_size", *b, "[block_n, block_k] of positive integers");
    }
    q.weight_block_size = {(*b)[0].get<int64_t>(), (*b)[1].get<int64_t>()};
    q.weight_strategy = WeightStrategy::kBlock;
    if (scheme != "dynamic") {
      return o.Unsupported("activation_scheme", json(scheme),
                           "dynamic (block-wise fp8 weights need dynamic activations)");
    }
    // DeepSeek-style: activations quantized per token and per block_k inputs.
    q.activation = ActivationScheme::kDynamicPerTokenGroup;
    q.group_size = q.weight_block_size[1];
  } else {
    q.weight_strategy = WeightStrategy::kTensor;
    q.activation =
        scheme == "dynamic" ? ActivationScheme::kDynamicPerToken : ActivationScheme::kStatic;
  }
  QSHARD_ASSIGN_OR_RETURN(std::vector<std::string> ignored, o.Names("ignored_layers"));
  QSHARD_ASSIGN_OR_RETURN(std::vector<std::string> not_convert, o.Names("modules_to_not_convert"));
  q.ignore = ignored;
  q.ignore.insert(q.ignore.end(), not_convert.begin(), not_convert.end());
  return absl::OkStatus();
}

// compressed-tensors block_structure: [bn, bk] or the older "NxM" string.
absl::StatusOr<std::vector<int64_t>> ParseBlockStructure(const Obj& w) {
  const json* b = w.Find("block_structure");
  if (b == nullptr) return w.Error("block_structure", "missing (strategy block needs [bn, bk])");
  if (b->is_array() && b->size() == 2 && (*b)[0].is_number_integer() &&
      (*b)[1].is_number_integer() && (*b)[0].get<int64_t>() > 0 && (*b)[1].get<int64_t>() > 0) {
    return std::vector<int64_t>{(*b)[0].get<int64_t>(), (*b)[1].get<int64_t>()};
  }
  if (b->is_string()) {
    int64_t bn = 0, bk = 0;
    char x = 0;
    std::istringstream in(b->get<std::string>());
    if (in >> bn >> x >> bk && (x == 'x' || x == 'X') && bn > 0 && bk > 0) {
      return std::vector<int64_t>{bn, bk};
    }
  }
  return w.Unsupported("block_structure", *b, "[block_n, block_k]");
}

absl::Status ParseCompressedTensors(const Obj& o, QuantizationConfig& q) {
  q.method = QuantMethod::kCompressedTensors;
  QSHARD_ASSIGN_OR_RETURN(std::string status, o.Str("quantization_status", "compressed"));
  if (status != "compressed") {
    return o.Unsupported("quantization_status", json(status),
                         "compressed (fake-quantized 'frozen' checkpoints are not loaded)");
  }
  QSHARD_ASSIGN_OR_RETURN(std::string format, o.Str("format", ""));
  QSHARD_ASSIGN_OR_RETURN(Obj groups, o.Child("config_groups"));
  if (groups.raw().size() != 1) {
    return groups.Error(
        "", absl::StrCat("has ", groups.raw().size(),
                         " groups; exactly one scheme for all Linear layers is supported"));
  }
  const std::string group_name = groups.raw().begin().key();
  QSHARD_ASSIGN_OR_RETURN(Obj g, groups.Child(group_name.c_str()));
  // Newer compressed-tensors versions put the format inside the group.
  QSHARD_ASSIGN_OR_RETURN(std::string group_format, g.Str("format", ""));
  if (!group_format.empty()) format = group_format;
  if (format == "float-quantized") {
    q.compressed_format = CompressedFormat::kFloatQuantized;
  } else if (format == "int-quantized") {
    q.compressed_format = CompressedFormat::kIntQuantized;
  } else if (format == "pack-quantized") {
    q.compressed_format = CompressedFormat::kPackQuantized;
  } else {
    return o.Unsupported("format", json(format), "float-quantized, int-quantized, pack-quantized");
  }
  QSHARD_ASSIGN_OR_RETURN(std::vector<std::string> targets, g.Names("targets"));
  if (!targets.empty() && std::find(targets.begin(), targets.end(), "Linear") == targets.end()) {
    return g.Unsupported("targets", json(targets), "[\"Linear\"]");
  }

  QSHARD_ASSIGN_OR_RETURN(Obj w, g.Child("weights"));
  QSHARD_ASSIGN_OR_RETURN(int64_t bits, w.Int("num_bits", 8));
  QSHARD_ASSIGN_OR_RETURN(std::string type, w.Str("type", "int"));
  QSHARD_ASSIGN_OR_RETURN(q.sym, w.Bool("symmetric", true));
  QSHARD_ASSIGN_OR_RETURN(bool wdynamic, w.Bool("dynamic", false));
  if (wdynamic) return w.Unsupported("dynamic", json(true), "false");
  QSHARD_ASSIGN_OR_RETURN(std::string strategy, w.Str("strategy", "tensor"));
  q.bits = static_cast<int>(bits);
  q.weight_is_float = type == "float";
  if (type != "float" && type != "int") return w.Unsupported("type", json(type), "int, float");
  switch (q.compressed_format) {
    case CompressedFormat::kFloatQuantized:
      if (type != "float") return w.Unsupported("type", json(type), "float (float-quantized)");
      if (bits != 8) return w.Unsupported("num_bits", json(bits), "8 (fp8 e4m3)");
      if (!q.sym) return w.Unsupported("symmetric", json(false), "true (fp8)");
      break;
    case CompressedFormat::kIntQuantized:
      if (type != "int") return w.Unsupported("type", json(type), "int (int-quantized)");
      if (bits != 8) return w.Unsupported("num_bits", json(bits), "8 (int-quantized)");
      if (!q.sym) return w.Unsupported("symmetric", json(false), "true (int-quantized)");
      break;
    default:
      if (type != "int") return w.Unsupported("type", json(type), "int (pack-quantized)");
      if (bits != 4 && bits != 8) return w.Unsupported("num_bits", json(bits), "4, 8");
      break;
  }
  if (strategy == "tensor") {
    q.weight_strategy = WeightStrategy::kTensor;
  } else if (strategy == "channel") {
    q.weight_strategy = WeightStrategy::kChannel;
  } else if (strategy == "group") {
    q.weight_strategy = WeightStrategy::kGroup;
    QSHARD_ASSIGN_OR_RETURN(q.group_size, w.Int("group_size", 0));
    if (q.group_size <= 0) {
      return w.Unsupported("group_size", json(q.group_size), "a positive group size");
    }
  } else if (strategy == "block") {
    q.weight_strategy = WeightStrategy::kBlock;
    QSHARD_ASSIGN_OR_RETURN(q.weight_block_size, ParseBlockStructure(w));
  } else {
    return w.Unsupported("strategy", json(strategy), "tensor, channel, group, block");
  }
  const bool float_fmt = q.compressed_format == CompressedFormat::kFloatQuantized;
  if (q.compressed_format == CompressedFormat::kPackQuantized &&
      q.weight_strategy != WeightStrategy::kGroup &&
      q.weight_strategy != WeightStrategy::kChannel) {
    return w.Unsupported("strategy", json(strategy), "group, channel (pack-quantized)");
  }
  if (q.compressed_format == CompressedFormat::kIntQuantized &&
      q.weight_strategy != WeightStrategy::kChannel &&
      q.weight_strategy != WeightStrategy::kTensor) {
    return w.Unsupported("strategy", json(strategy), "channel, tensor (int-quantized)");
  }
  if (float_fmt && q.weight_strategy == WeightStrategy::kGroup) {
    return w.Unsupported("strategy", json(strategy), "tensor, channel, block (float-quantized)");
  }

  q.activation = ActivationScheme::kNone;
  if (g.Has("input_activations")) {
    QSHARD_ASSIGN_OR_RETURN(Obj a, g.Child("input_activations"));
    QSHARD_ASSIGN_OR_RETURN(int64_t abits, a.Int("num_bits", 8));
    QSHARD_ASSIGN_OR_RETURN(std::string atype, a.Str("type", type));
    QSHARD_ASSIGN_OR_RETURN(bool adynamic, a.Bool("dynamic", false));
    QSHARD_ASSIGN_OR_RETURN(std::string astrategy, a.Str("strategy", "tensor"));
    QSHARD_ASSIGN_OR_RETURN(bool asym, a.Bool("symmetric", true));
    if (abits != 8) return a.Unsupported("num_bits", json(abits), "8");
    if (!asym) return a.Unsupported("symmetric", json(false), "true");
    if (atype != (float_fmt ? "float" : "int")) {
      return a.Unsupported("type", json(atype),
                           float_fmt ? "float (same as the weights)" : "int (same as the weights)");
    }
    if (q.compressed_format == CompressedFormat::kPackQuantized) {
      return a.Error("",
                     "pack-quantized checkpoints are weight-only (W4A16 / W8A16); "
                     "input_activations must be null");
    }
    if (adynamic && astrategy == "token") {
      q.activation = ActivationScheme::kDynamicPerToken;
    } else if (adynamic && astrategy == "group" && float_fmt) {
      q.activation = ActivationScheme::kDynamicPerTokenGroup;
      QSHARD_ASSIGN_OR_RETURN(q.group_size, a.Int("group_size", 128));
    } else if (!adynamic && astrategy == "tensor") {
      q.activation = ActivationScheme::kStatic;
    } else {
      return a.Error("strategy",
                     absl::StrCat("'", astrategy, "' with dynamic ", adynamic ? "true" : "false",
                                  " is not supported (supported: token with dynamic "
                                  "true, tensor with dynamic false)"));
    }
    q.activation_bits = 8;
    q.activation_is_float = float_fmt;
  }
  if (q.compressed_format == CompressedFormat::kIntQuantized &&
      q.activation == ActivationScheme::kStatic) {
    return absl::InvalidArgumentError(
        absl::StrCat(g.where(),
                     ".input_activations: static int8 activation scales are not supported "
                     "(supported: dynamic per-token)"));
  }
  QSHARD_ASSIGN_OR_RETURN(q.ignore, o.Names("ignore"));
  return absl::OkStatus();
}

}  // namespace

std::string_view QuantMethodName(QuantMethod m) {
  switch (m) {
    case QuantMethod::kNone:
      return "none";
    case QuantMethod::kGptq:
      return "gptq";
    case QuantMethod::kAwq:
      return "awq";
    case QuantMethod::kFp8:
      return "fp8";
    case QuantMethod::kCompressedTensors:
      return "compressed-tensors";
    case QuantMethod::kInt8:
      return "int8";
  }
  return "?";
}

std::string_view CompressedFormatName(CompressedFormat f) {
  switch (f) {
    case CompressedFormat::kNone:
      return "none";
    case CompressedFormat::kFloatQuantized:
      return "float-quantized";
    case CompressedFormat::kIntQuantized:
      return "int-quantized";
    case CompressedFormat::kPackQuantized:
      return "pack-quantized";
  }
  return "?";
}

std::string_view WeightStrategyName(WeightStrategy s) {
  switch (s) {
    case WeightStrategy::kTensor:
      return "tensor";
    case WeightStrategy::kChannel:
      return "channel";
    case WeightStrategy::kGroup:
      return "group";
    case WeightStrategy::kBlock:
      return "block";
  }
  return "?";
}

std::string_view ActivationSchemeName(ActivationScheme s) {
  switch (s) {
    case ActivationScheme::kNone:
      return "none";
    case ActivationScheme::kDynamicPerToken:
      return "dynamic-per-token";
    case ActivationScheme::kStatic:
      return "static";
    case ActivationScheme::kDynamicPerTokenGroup:
      return "dynamic-per-token-group";
  }
  return "?";
}

bool QuantizationConfig::IsIgnored(const std::string& module) const {
  for (const std::string& e : ignore) {
    if (e.rfind("re:", 0) == 0) {
      // compressed-tensors matches patterns from the start of the name (Python re.match).
      try {
        std::regex re(e.substr(3));
        if (std::regex_search(module, re, std::regex_constants::match_continuous)) return true;
      } catch (const std::regex_error&) {
        continue;  // an invalid pattern matches nothing
      }
      continue;
    }
    if (module == e) return true;
    // "lm_head" also names "model.lm_head"; "mlp.down_proj" names every layer's down_proj.
    if (module.size() > e.size() && module.compare(module.size() - e.size(), e.size(), e) == 0 &&
        module[module.size() - e.size() - 1] == '.') {
      return true;
    }
    // A module prefix ("model.layers.0") excludes everything under it.
    if (module.rfind(e + ".", 0) == 0) return true;
  }
  return false;
}

std::string QuantizationConfig::Describe() const {
  if (method == QuantMethod::kNone) return "none";
  std::string g = group_size > 0 ? absl::StrCat(" g", group_size) : std::string(" per-channel");
  switch (method) {
    case QuantMethod::kGptq:
      return absl::StrCat("gptq ", bits, "-bit", g, sym ? " sym" : " asym",
                          desc_act ? " desc_act" : "", " (checkpoint_format ",
                          checkpoint_format == GptqCheckpointFormat::kGptq ? "gptq" : "gptq_v2",
                          ")");
    case QuantMethod::kAwq:
      return absl::StrCat("awq ", bits, "-bit", g, sym ? " sym" : " zero-point", " (", awq_version,
                          ")");
    case QuantMethod::kFp8:
    case QuantMethod::kCompressedTensors:
    case QuantMethod::kInt8: {
      std::string s = std::string(QuantMethodName(method));
      if (method == QuantMethod::kCompressedTensors) {
        absl::StrAppend(&s, " ", std::string(CompressedFormatName(compressed_format)));
      }
      absl::StrAppend(&s, " w", bits, weight_is_float ? "-float" : "-int", " ",
                      std::string(WeightStrategyName(weight_strategy)));
      if (weight_strategy == WeightStrategy::kGroup) absl::StrAppend(&s, g);
      if (weight_strategy == WeightStrategy::kBlock && weight_block_size.size() == 2) {
        absl::StrAppend(&s, " [", weight_block_size[0], ",", weight_block_size[1], "]");
      }
      absl::StrAppend(&s, ", activations ", std::string(ActivationSchemeName(activation)));
      return s;
    }
    default:
      return std::string(QuantMethodName(method));
  }
}

absl::StatusOr<QuantizationConfig> ParseQuantizationConfig(std::string_view text,
                                                           std::string_view source) {
  json root = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(std::string(source), ": invalid JSON"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(source), ": expected a JSON object, got ", Show(root)));
  }
  Obj o(root, std::string(source));
  QuantizationConfig q;
  q.source = std::string(source);
  QSHARD_ASSIGN_OR_RETURN(std::string method, o.Str("quant_method", ""));
  method = Lower(method);
  if (method.empty()) {
    // Legacy files carry no quant_method: AutoAWQ's quant_config.json has w_bit /
    // zero_point / version; AutoGPTQ's quantize_config.json has bits / desc_act.
    if (o.Has("w_bit") || o.Has("zero_point") || o.Has("version")) {
      method = "awq";
    } else if (o.Has("bits")) {
      method = "gptq";
    } else {
      return o.Error("quant_method", "missing (expected gptq, awq, fp8 or compressed-tensors)");
    }
  }
  if (method == "gptq") {
    QSHARD_RETURN_IF_ERROR(ParseGptq(o, q));
  } else if (method == "awq") {
    QSHARD_RETURN_IF_ERROR(ParseAwq(o, q));
  } else if (method == "fp8") {
    QSHARD_RETURN_IF_ERROR(ParseFp8(o, q));
  } else if (method == "compressed-tensors" || method == "compressed_tensors") {
    QSHARD_RETURN_IF_ERROR(ParseCompressedTensors(o, q));
  } else {
    return o.Unsupported("quant_method", json(method), "gptq, awq, fp8, compressed-tensors");
  }
  return q;
}

absl::StatusOr<QuantizationConfig> LoadQuantizationConfig(const std::string& dir,
                                                          std::string_view config_json) {
  if (!config_json.empty()) {
    return ParseQuantizationConfig(config_json, "config.json: quantization_config");
  }
  for (const char* name : {"quantize_config.json", "quant_config.json"}) {
    const std::filesystem::path path = std::filesystem::path(dir) / name;
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec)) continue;
    std::ifstream in(path, std::ios::binary);
    std::stringstream text;
    text << in.rdbuf();
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path.string()));
    return ParseQuantizationConfig(text.str(), path.string());
  }
  return QuantizationConfig{};
}

}  // namespace qshard
