// `qshard plan`: will this model, in this format, with this much KV cache, fit on the
// device? Prints the memory planner's numbers (kv/memory_planner.h) as a table or JSON.
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kv/memory_planner.h"
#include "kv/model_shapes.h"
#include "nlohmann/json.hpp"
#include "runtime/checkpoint/model_config.h"
#include "service/cli/commands.h"

namespace qshard {
namespace {

// The weight format a checkpoint's quantization_config describes. Only what changes the
// byte count is read: method, bits, group size, symmetry.
absl::StatusOr<WeightPlanSpec> SpecFromQuantizationConfig(const std::string& raw) {
  WeightPlanSpec spec;
  if (raw.empty()) return spec;  // not quantized: kNone
  nlohmann::json q = nlohmann::json::parse(raw, nullptr, /*allow_exceptions=*/false);
  if (!q.is_object()) {
    return absl::InvalidArgumentError("config.json: quantization_config is not a JSON object");
  }
  auto get_int = [](const nlohmann::json& j, const char* key, int64_t def) -> int64_t {
    auto it = j.find(key);
    return it != j.end() && it->is_number_integer() ? it->get<int64_t>() : def;
  };
  auto get_bool = [](const nlohmann::json& j, const char* key, bool def) {
    auto it = j.find(key);
    return it != j.end() && it->is_boolean() ? it->get<bool>() : def;
  };
  const std::string method = q.value("quant_method", std::string());
  if (method == "gptq") {
    spec.format = WeightPlanFormat::kGptq;
    spec.bits = static_cast<int>(get_int(q, "bits", 4));
    spec.group_size = get_int(q, "group_size", 128);
    spec.symmetric = get_bool(q, "sym", true);
    return spec;
  }
  if (method == "awq") {
    spec.format = WeightPlanFormat::kAwq;
    spec.bits = static_cast<int>(get_int(q, "bits", get_int(q, "w_bit", 4)));
    spec.group_size = get_int(q, "group_size", get_int(q, "q_group_size", 128));
    spec.symmetric = false;
    return spec;
  }
  if (method == "fp8") {
    spec.format = WeightPlanFormat::kFp8;
    return spec;
  }
  if (method == "compressed-tensors") {
    // The first config group's weight scheme decides; checkpoints we read have one group.
    const nlohmann::json* weights = nullptr;
    if (auto g = q.find("config_groups"); g != q.end() && g->is_object()) {
      for (const auto& [name, group] : g->items()) {
        if (group.is_object() && group.contains("weights") && group["weights"].is_object()) {
          weights = &group["weights"];
          break;
        }
      }
    }
    if (weights == nullptr) {
      return absl::InvalidArgumentError(
          "config.json: compressed-tensors quantization_config has no config_groups weights");
    }
    const std::string type = weights->value("type", std::string("int"));
    const int64_t bits = get_int(*weights, "num_bits", 8);
    if (type == "float" && bits == 8) {
      spec.format = WeightPlanFormat::kFp8;
    } else if (type == "int" && bits == 8 && q.value("format", std::string()) != "pack-quantized") {
      spec.format = WeightPlanFormat::kInt8;
    } else if (type == "int" && (bits == 4 || bits == 8)) {
      // pack-quantized W4A16 / W8A16: GPTQ-like packed ints with group scales.
      spec.format = WeightPlanFormat::kGptq;
      spec.bits = static_cast<int>(bits);
      spec.group_size = get_int(*weights, "group_size", -1);
      spec.symmetric = get_bool(*weights, "symmetric", true);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("config.json: unsupported compressed-tensors weights (type ", type, ", ",
                       bits, " bits)"));
    }
    return spec;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("config.json: unsupported quant_method '", method,
                   "'; qshard plans gptq, awq, fp8 and compressed-tensors checkpoints"));
}

// "16.06 GB (14.96 GiB)": decimal units first (what device specs and the seed quote),
// binary second (what allocators and nvidia-smi report).
std::string Human(int64_t bytes) {
  const double b = static_cast<double>(bytes);
  if (b >= 1e9) return absl::StrFormat("%.2f GB (%.2f GiB)", b / 1e9, b / 1073741824.0);
  if (b >= 1e6) return absl::StrFormat("%.2f MB (%.2f MiB)", b / 1e6, b / 1048576.0);
  return absl::StrFormat("%.2f kB (%.2f KiB)", b / 1e3, b / 1024.0);
}

std::string Grouped(int64_t v) {
  std::string digits = absl::StrCat(v < 0 ? -v : v);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return v < 0 ? "-" + out : out;
}

void Row(const std::string& label, int64_t bytes) {
  std::printf("  %-40s %20s  %s\n", label.c_str(), Grouped(bytes).c_str(), Human(bytes).c_str());
}

}  // namespace

int PlanMain(int argc, char** argv) {
  FlagSet flags(
      "qshard plan",
      "Plans device memory for a model: weights in the chosen format (quantized data, scales, "
      "zero points and 16-bit embeddings/norms listed apart), KV cache per token and for "
      "max-num-seqs sequences of max-model-len tokens, an activation/workspace estimate, the "
      "total against device memory x utilization, and how many full-length sequences fit. "
      "Sizes: 80GB = 80e9 bytes, 80G / 80GiB = 80 x 2^30.");
  std::string model_dir, shape, kv_cache_dtype = "auto", quantization, device = "cuda";
  int64_t device_memory = 0, max_model_len = 0, max_num_seqs = 1, max_num_batched_tokens = 2048;
  int64_t block_size = 16, bits = 0, group_size = 0;
  double utilization = 0.9;
  bool asym = false, json = false;
  flags.AddString("model", &model_dir, "model directory (reads config.json)");
  flags.AddString(
      "shape", &shape,
      "a named model shape instead of --model: " + absl::StrJoin(ModelShapeNames(), ", "));
  flags.AddBytes("device-memory", &device_memory,
                 "device memory, e.g. 80GB, 24GiB, 85899345920 (required)");
  flags.AddDouble("gpu-memory-utilization", &utilization,
                  "fraction of device memory the engine may use, in (0, 1]");
  flags.AddInt("max-model-len", &max_model_len, "tokens per sequence (0: the model's context)");
  flags.AddInt("max-num-seqs", &max_num_seqs, "sequences held in the KV cache at once");
  flags.AddInt("max-num-batched-tokens", &max_num_batched_tokens,
               "tokens per engine step (sizes the activations)");
  flags.AddInt("block-size", &block_size, "tokens per KV cache block");
  flags.AddString("kv-cache-dtype", &kv_cache_dtype,
                  "auto|bfloat16|float16|float32|fp8|fp8_e4m3|fp8_e5m2");
  flags.AddString("quantization", &quantization,
                  "none|bf16|fp16|fp8|int8|gptq|awq (default: the checkpoint's, else none)");
  flags.AddInt("bits", &bits, "gptq: 4 or 8; awq: 4 (0: the checkpoint's, else 4)");
  flags.AddInt("group-size", &group_size,
               "gptq/awq group size, -1 = per channel (0: the checkpoint's, else 128)");
  flags.AddBool("asym", &asym, "gptq with zero points (asymmetric)");
  flags.AddString("device", &device, "cuda (adds 256 MiB of GPU workspace) or cpu");
  flags.AddBool("json", &json, "print JSON instead of a table");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("plan", st);
  auto fail = [](const std::string& message) {
    return ReportFlagError("plan", absl::InvalidArgumentError(message));
  };

  if (model_dir.empty() == shape.empty()) {
    return fail("give exactly one of --model DIR or --shape NAME (shapes: " +
                absl::StrJoin(ModelShapeNames(), ", ") + ")");
  }
  if (device_memory <= 0) {
    return fail("missing required flag --device-memory (e.g. --device-memory 80GB)");
  }
  if (device != "cuda" && device != "cpu") {
    return fail("--device: expected cuda or cpu, got '" + device + "'");
  }

  MemoryPlanRequest req;
  std::string model_name;
  std::string format_source = "flag";
  if (!shape.empty()) {
    auto cfg = ModelShapeByName(shape);
    if (!cfg.ok()) return fail("--shape: " + std::string(cfg.status().message()));
    req.model = *std::move(cfg);
    model_name = shape;
  } else {
    auto cfg = LoadModelConfig(model_dir);
    if (!cfg.ok()) return ReportFlagError("plan", cfg.status());
    req.model = *std::move(cfg);
    model_name = model_dir;
  }

  // Weight format: the flag, else the checkpoint's quantization_config, else as stored.
  auto from_checkpoint = SpecFromQuantizationConfig(req.model.quantization_config_json);
  if (quantization.empty() || quantization == "auto" || quantization == "compressed-tensors") {
    if (!from_checkpoint.ok()) return ReportFlagError("plan", from_checkpoint.status());
    if (quantization == "compressed-tensors" &&
        req.model.quantization_config_json.find("compressed-tensors") == std::string::npos) {
      return fail(
          "--quantization compressed-tensors needs a --model whose config.json has a "
          "compressed-tensors quantization_config");
    }
    req.weights = *from_checkpoint;
    format_source = req.model.quantization_config_json.empty() ? "checkpoint dtype" : "checkpoint";
  } else {
    auto format = ParseWeightPlanFormat(quantization);
    if (!format.ok()) return ReportFlagError("plan", format.status());
    req.weights.format = *format;
    // Same method as the checkpoint: keep its bits / group size / symmetry as defaults.
    if (from_checkpoint.ok() && from_checkpoint->format == *format) req.weights = *from_checkpoint;
  }
  const bool grouped =
      req.weights.format == WeightPlanFormat::kGptq || req.weights.format == WeightPlanFormat::kAwq;
  if (!grouped && (bits != 0 || group_size != 0 || asym)) {
    return fail("--bits, --group-size and --asym apply to --quantization gptq or awq only");
  }
  if (bits != 0) req.weights.bits = static_cast<int>(bits);
  if (group_size != 0) req.weights.group_size = group_size;
  if (asym) req.weights.symmetric = false;

  auto kv = ParseKvCacheDType(kv_cache_dtype);
  if (!kv.ok()) return ReportFlagError("plan", kv.status());
  req.kv_cache_dtype = *kv;
  req.max_model_len = max_model_len;
  req.max_num_seqs = max_num_seqs;
  req.max_num_batched_tokens = max_num_batched_tokens;
  req.block_size = block_size;
  req.device_memory_bytes = device_memory;
  req.gpu_memory_utilization = utilization;
  req.workspace_bytes = device == "cuda" ? kGpuWorkspaceBytes : 0;

  auto plan_or = PlanMemory(req);
  if (!plan_or.ok()) return ReportFlagError("plan", plan_or.status());
  const MemoryPlan& p = *plan_or;
  const WeightPlanSpec& w = req.weights;
  const std::string format_name = WeightPlanFormatName(w.format);
  const std::string kv_dtype_name(DTypeName(p.kv_dtype));

  if (json) {
    nlohmann::json j;
    j["model"] = model_name;
    j["weight_format"] = format_name;
    j["weight_format_source"] = format_source;
    if (grouped) {
      j["bits"] = w.bits;
      j["group_size"] = w.group_size;
      j["symmetric"] = w.format == WeightPlanFormat::kGptq && w.symmetric;
    }
    j["num_parameters"] = p.weights.num_parameters;
    j["weights_bytes"] = p.weights_bytes;
    j["weights"] = {{"quantized_bytes", p.weights.quantized},
                    {"scales_bytes", p.weights.scales},
                    {"zero_points_bytes", p.weights.zero_points},
                    {"unquantized_bytes", p.weights.unquantized}};
    j["kv_cache_dtype"] = kv_dtype_name;
    j["kv_bytes_per_token"] = p.kv_bytes_per_token;
    j["kv_bytes_per_block"] = p.kv_bytes_per_block;
    j["block_size"] = block_size;
    j["max_model_len"] = p.max_model_len;
    j["max_num_seqs"] = p.max_num_seqs;
    j["kv_bytes_total"] = p.kv_bytes_total;
    j["activation_bytes"] = p.activation_bytes;
    j["workspace_bytes"] = p.workspace_bytes;
    j["total_bytes"] = p.total_bytes;
    j["device_memory_bytes"] = device_memory;
    j["gpu_memory_utilization"] = utilization;
    j["budget_bytes"] = p.budget_bytes;
    j["fits"] = p.fits;
    j["max_concurrent_seqs"] = p.max_concurrent_seqs;
    j["kv_budget_bytes"] = p.kv_budget_bytes;
    j["num_kv_blocks"] = p.num_kv_blocks;
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }

  std::string format_desc = format_name;
  if (w.format == WeightPlanFormat::kNone) {
    format_desc = absl::StrCat("none (", std::string(DTypeName(req.model.dtype)), " as stored)");
  } else if (grouped) {
    absl::StrAppend(&format_desc, " ", w.bits, "-bit ",
                    w.group_size > 0 ? absl::StrCat("g", w.group_size) : "per-channel",
                    w.format == WeightPlanFormat::kGptq && w.symmetric ? " sym" : " asym");
  }
  const double params = static_cast<double>(p.weights.num_parameters);
  std::printf("model:    %s (%s parameters)\n", model_name.c_str(),
              params >= 1e9 ? absl::StrFormat("%.2f B", params / 1e9).c_str()
                            : absl::StrFormat("%.2f M", params / 1e6).c_str());
  std::printf("weights:  %s (%s)\n", format_desc.c_str(), format_source.c_str());
  std::printf("KV cache: %s, %lld tokens x %lld sequences, blocks of %lld tokens\n",
              kv_dtype_name.c_str(), static_cast<long long>(p.max_model_len),
              static_cast<long long>(p.max_num_seqs), static_cast<long long>(block_size));
  std::printf("device:   %s, %s x %.2f = budget %s\n\n", device.c_str(),
              Human(device_memory).c_str(), utilization, Human(p.budget_bytes).c_str());
  std::printf("  %-40s %20s  %s\n", "", "bytes", "size");
  Row("weights", p.weights_bytes);
  Row("  decoder linear weights", p.weights.quantized);
  Row("  scales", p.weights.scales);
  Row("  zero points", p.weights.zero_points);
  Row("  unquantized (embeddings, lm_head, norms)", p.weights.unquantized);
  std::printf("  %-40s %20s  %.1f KiB\n", "KV cache per token",
              Grouped(p.kv_bytes_per_token).c_str(), p.kv_bytes_per_token / 1024.0);
  Row(absl::StrCat("KV cache (", p.max_num_seqs, " x ", p.max_model_len, " tokens)"),
      p.kv_bytes_total);
  Row("activations + workspace", p.activation_bytes);
  Row("total", p.total_bytes);
  Row("budget (device memory x utilization)", p.budget_bytes);
  std::printf("\nfits: %s\n", p.fits ? "yes" : "no");
  std::printf("max concurrent sequences of %lld tokens: %lld (KV pool: %lld blocks, %s)\n",
              static_cast<long long>(p.max_model_len),
              static_cast<long long>(p.max_concurrent_seqs),
              static_cast<long long>(p.num_kv_blocks),
              Human(p.num_kv_blocks * p.kv_bytes_per_block).c_str());
  return 0;
}

}  // namespace qshard
