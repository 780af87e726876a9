#include <cstdio>

#include "absl/strings/str_cat.h"
#include "runtime/base/log.h"
#include "runtime/base/status_macros.h"
#include "service/cli/commands.h"

namespace qshard {

void EngineFlags::Register(FlagSet& flags, bool with_batching) {
  flags.AddString("model", &model, "model directory (config.json, safetensors, tokenizer.model)",
                  /*required=*/model_required);
  flags.AddString("device", &device, "cpu, cuda or auto");
  flags.AddString("kv-cache-dtype", &kv_cache_dtype,
                  "auto|float32|bfloat16|float16|fp8|fp8_e4m3|fp8_e5m2 (auto: float32 on the "
                  "CPU, the model dtype on a GPU)");
  flags.AddBytes("kv-cache-memory-bytes", &kv_cache_memory_bytes,
                 "memory for the paged KV cache, e.g. 512M (0: 512 MiB on the CPU)");
  flags.AddDouble("gpu-memory-utilization", &gpu_memory_utilization,
                  "fraction of GPU memory for weights + KV cache + workspace; sizes the KV pool "
                  "on a GPU (the CPU uses --kv-cache-memory-bytes)");
  flags.AddInt("max-model-len", &max_model_len,
               "maximum context length, prompt + output (0: max_position_embeddings)");
  flags.AddInt("block-size", &block_size, "tokens per KV cache block");
  flags.AddString("quantization", &quantization,
                  "auto|none|fp8|int8|gptq|awq|compressed-tensors (auto: what the checkpoint "
                  "holds)");
  flags.AddBool("weight-only-activations", &weight_only_activations,
                "run W8A8 weights (fp8/int8 checkpoints, --quantization fp8|int8) without "
                "quantizing the activations: slower, slightly more accurate");
  flags.AddBool("calculate-kv-scales", &calculate_kv_scales,
                "fp8 KV cache without checkpoint scales: derive them from the first prefill's "
                "K/V absolute maximum (else 1.0)");
  flags.AddBool("fuse-projections", &fuse_projections,
                "run q|k|v and gate|up of each layer as one fused Linear each where the "
                "weight formats allow (--no-fuse-projections: separate Linears)");
  flags.AddBool("enable-prefix-caching", &enable_prefix_caching,
                "reuse cached K/V of repeated prompt prefixes (--no-enable-prefix-caching: off)");
  if (with_batching) {
    flags.AddInt("max-num-seqs", &max_num_seqs, "maximum sequences per engine step");
    flags.AddInt("max-num-batched-tokens", &max_num_batched_tokens,
                 "maximum tokens per engine step (prefill is chunked to fit)");
  }
  flags.AddString("log-level", &log_level, "debug, info, warning or error");
}

absl::StatusOr<EngineOptions> EngineFlags::ToOptions() const {
  EngineOptions o;
  o.model_dir = model;
  o.device = device;
  QSHARD_ASSIGN_OR_RETURN(o.kv_cache_dtype, ParseKvCacheDType(kv_cache_dtype));
  o.kv_cache_memory_bytes = kv_cache_memory_bytes;
  if (max_model_len < 0) return absl::InvalidArgumentError("--max-model-len must be >= 0");
  o.max_model_len = max_model_len;
  o.block_size = block_size;
  o.enable_prefix_caching = enable_prefix_caching;
  o.calculate_kv_scales = calculate_kv_scales;
  o.quantization = quantization;
  o.weight_only_activations = weight_only_activations;
  o.fuse_projections = fuse_projections;
  if (!(gpu_memory_utilization > 0.0 && gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gpu-memory-utilization must be in (0, 1], got ", gpu_memory_utilization));
  }
  o.gpu_memory_utilization = gpu_memory_utilization;
  if (max_num_seqs < 1) return absl::InvalidArgumentError("--max-num-seqs must be >= 1");
  if (max_num_batched_tokens < 1) {
    return absl::InvalidArgumentError("--max-num-batched-tokens must be >= 1");
  }
  o.max_num_seqs = static_cast<int32_t>(max_num_seqs);
  o.max_num_batched_tokens = static_cast<int32_t>(max_num_batched_tokens);
  QSHARD_RETURN_IF_ERROR(ApplyLogLevel(log_level));
  return o;
}

absl::Status ApplyLogLevel(const std::string& level) {
  if (level == "debug") {
    SetLogLevel(LogLevel::kDebug);
  } else if (level == "info") {
    SetLogLevel(LogLevel::kInfo);
  } else if (level == "warning") {
    SetLogLevel(LogLevel::kWarning);
  } else if (level == "error") {
    SetLogLevel(LogLevel::kError);
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--log-level: unknown value '", level, "'; expected debug, info, warning or error"));
  }
  return absl::OkStatus();
}

int ReportFlagError(const std::string& command, const absl::Status& status) {
  if (absl::IsCancelled(status)) return 0;  // --help
  std::fprintf(stderr, "qshard %s: %s\n", command.c_str(), std::string(status.message()).c_str());
  return 1;
}

}  // namespace qshard
