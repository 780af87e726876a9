// `qshard inspect`: what a checkpoint holds, without running it.
#include <cstdio>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "quant/kernel_selection.h"
#include "runtime/backend/backend.h"
#include "runtime/model/llama_model.h"
#include "service/cli/commands.h"

namespace qshard {

int InspectMain(int argc, char** argv) {
  FlagSet flags("qshard inspect",
                "Prints the architecture, parameter count, bytes per dtype, total weight bytes "
                "and RoPE settings of a model directory.");
  std::string model_dir;
  bool json = false;
  flags.AddString("model", &model_dir, "model directory", /*required=*/true);
  flags.AddBool("json", &json, "print JSON instead of text");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("inspect", st);

  auto config = LoadModelConfig(model_dir);
  if (!config.ok()) return ReportFlagError("inspect", config.status());
  auto backend = CreateBackend("cpu");
  if (!backend.ok()) return ReportFlagError("inspect", backend.status());
  // Loading on the CPU backend maps the weights without copying: cheap even for big models.
  auto model = LlamaModel::Load(model_dir, *config, backend->get());
  if (!model.ok()) return ReportFlagError("inspect", model.status());
  const ModelConfig& c = *config;
  const WeightSummary& w = (*model)->weight_summary();

  nlohmann::json j;
  j["model"] = model_dir;
  j["architecture"] = c.architecture;
  j["dtype"] = std::string(DTypeName(c.dtype));
  j["num_parameters"] = w.num_parameters;
  j["total_weight_bytes"] = w.total_bytes;
  j["bytes_per_dtype"] = w.bytes_per_dtype;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["bos_token_id"] = c.bos_token_id;
  j["eos_token_ids"] = c.eos_token_ids;
  j["rope"] = {{"type", std::string(RopeTypeName(c.rope.type))},
               {"theta", c.rope.theta},
               {"factor", c.rope.factor},
               {"low_freq_factor", c.rope.low_freq_factor},
               {"high_freq_factor", c.rope.high_freq_factor},
               {"original_max_position_embeddings", c.rope.original_max_position_embeddings}};
  const QuantizationConfig& q = (*model)->quantization();
  j["quantization"] = w.quantization;
  j["quantization_method"] = std::string(QuantMethodName(q.method));
  if (q.quantized()) {
    j["quantization_config"] = nlohmann::json::parse(c.quantization_config_json.empty()
                                                         ? std::string("{}")
                                                         : c.quantization_config_json);
    j["quantization_source"] = q.source;
  }
  j["bytes_per_format"] = w.bytes_per_format;
  j["linear_kernel_cpu"] = w.linear_kernel;
  j["lm_head_kernel_cpu"] = w.lm_head_kernel;
  // What the selection function picks for this checkpoint on each device class, so an
  // operator sees before deploying which node pool runs it with which kernel.
  const DeviceInfo devices[] = {DeviceInfo::Cpu(),      DeviceInfo::Cuda(75),
                                DeviceInfo::Cuda(80),   DeviceInfo::Cuda(86),
                                DeviceInfo::Cuda(89),   DeviceInfo::Cuda(90)};
  nlohmann::json selection = nlohmann::json::object();
  for (const DeviceInfo& d : devices) {
    auto choice = SelectKernel(d, q, "auto");
    selection[d.Name()] = choice.ok() ? nlohmann::json{{"kernel", choice->kernel},
                                                       {"reason", choice->reason}}
                                      : nlohmann::json{{"error", choice.status().message()}};
  }
  j["kernel_selection"] = selection;
  if (json) {
    std::printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  std::printf("model:                %s\n", model_dir.c_str());
  std::printf("architecture:         %s\n", c.architecture.c_str());
  std::printf("dtype:                %s\n", std::string(DTypeName(c.dtype)).c_str());
  std::printf("parameters:           %lld (%.2f M)\n", static_cast<long long>(w.num_parameters),
              w.num_parameters / 1e6);
  std::printf("total weight bytes:   %lld (%.2f MiB)\n", static_cast<long long>(w.total_bytes),
              w.total_bytes / 1048576.0);
  for (const auto& [dt, bytes] : w.bytes_per_dtype) {
    std::printf("  %-18s  %lld bytes\n", (dt + ":").c_str(), static_cast<long long>(bytes));
  }
  std::printf("quantization:         %s\n", w.quantization.c_str());
  for (const auto& [format, bytes] : w.bytes_per_format) {
    std::printf("  %-18s  %lld bytes\n", (format + ":").c_str(), static_cast<long long>(bytes));
  }
  std::printf("layers:               %lld\n", static_cast<long long>(c.num_layers));
  std::printf("hidden / intermediate: %lld / %lld\n", static_cast<long long>(c.hidden_size),
              static_cast<long long>(c.intermediate_size));
  std::printf("heads / kv heads / head_dim: %lld / %lld / %lld\n",
              static_cast<long long>(c.num_heads), static_cast<long long>(c.num_kv_heads),
              static_cast<long long>(c.head_dim));
  std::printf("vocab size:           %lld\n", static_cast<long long>(c.vocab_size));
  std::printf("max position:         %lld\n", static_cast<long long>(c.max_position_embeddings));
  std::printf("tied embeddings:      %s\n", c.tie_word_embeddings ? "yes" : "no");
  std::printf("rope:                 type=%s theta=%g", std::string(RopeTypeName(c.rope.type)).c_str(),
              c.rope.theta);
  if (c.rope.type != RopeType::kDefault) std::printf(" factor=%g", c.rope.factor);
  if (c.rope.type == RopeType::kLlama3) {
    std::printf(" low_freq_factor=%g high_freq_factor=%g original_max_position_embeddings=%lld",
                c.rope.low_freq_factor, c.rope.high_freq_factor,
                static_cast<long long>(c.rope.original_max_position_embeddings));
  }
  std::printf("\nCPU linear kernel:    %s\n", w.linear_kernel.c_str());
  std::printf("CPU lm_head kernel:   %s\n", w.lm_head_kernel.c_str());
  std::printf("kernel selection:\n");
  for (const DeviceInfo& d : devices) {
    const nlohmann::json& e = selection[d.Name()];
    std::printf("  %-5s %s\n", d.Name().c_str(),
                e.contains("kernel") ? (e["kernel"].get<std::string>() + ": " +
                                        e["reason"].get<std::string>())
                                           .c_str()
                                     : ("unsupported: " + e["error"].get<std::string>()).c_str());
  }
  return 0;
}

}  // namespace qshard
