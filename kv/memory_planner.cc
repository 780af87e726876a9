#include "kv/memory_planner.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/base/status_macros.h"

namespace qshard {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bytes of `bits`-wide values packed into int32 words along a dimension of `n` values.
int64_t PackedBytes(int64_t n, int bits) { return CeilDiv(n * bits, 32) * 4; }

absl::Status CheckModel(const ModelConfig& m) {
  const std::pair<const char*, int64_t> dims[] = {
      {"hidden_size", m.hidden_size},
      {"intermediate_size", m.intermediate_size},
      {"num_hidden_layers", m.num_layers},
      {"num_attention_heads", m.num_heads},
      {"num_key_value_heads", m.num_kv_heads},
      {"head_dim", m.head_dim},
      {"vocab_size", m.vocab_size},
  };
  for (const auto& [name, v] : dims) {
    if (v <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("model shape: ", name, " must be positive, got ", v));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckWeightSpec(const WeightPlanSpec& s) {
  if (s.format == WeightPlanFormat::kGptq && s.bits != 4 && s.bits != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("--bits: gptq supports 4 or 8 bits, got ", s.bits));
  }
  if (s.format == WeightPlanFormat::kAwq && s.bits != 4) {
    return absl::InvalidArgumentError(absl::StrCat("--bits: awq supports 4 bits, got ", s.bits));
  }
  if ((s.format == WeightPlanFormat::kGptq || s.format == WeightPlanFormat::kAwq) &&
      s.group_size != -1 && s.group_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--group-size: expected -1 (per channel) or a positive size, got ", s.group_size));
  }
  return absl::OkStatus();
}

// Element size of the parts that stay in floating point.
int64_t UnquantizedElementSize(const ModelConfig& m, WeightPlanFormat f) {
  switch (f) {
    case WeightPlanFormat::kBf16:
    case WeightPlanFormat::kF16:
      return 2;
    case WeightPlanFormat::kNone:
      // The checkpoint as it is: float32 stays float32; anything else (fp8 or int
      // checkpoints name their activation dtype here anyway) is 16-bit.
      return m.dtype == DType::kF32 ? 4 : 2;
    default:
      return 2;
  }
}

struct Linear {
  int64_t in;   // K
  int64_t out;  // N
};

}  // namespace

absl::StatusOr<WeightPlanFormat> ParseWeightPlanFormat(const std::string& s) {
  if (s == "none" || s == "auto") return WeightPlanFormat::kNone;
  if (s == "bf16" || s == "bfloat16") return WeightPlanFormat::kBf16;
  if (s == "fp16" || s == "float16" || s == "half") return WeightPlanFormat::kF16;
  if (s == "fp8") return WeightPlanFormat::kFp8;
  if (s == "int8") return WeightPlanFormat::kInt8;
  if (s == "gptq") return WeightPlanFormat::kGptq;
  if (s == "awq") return WeightPlanFormat::kAwq;
  return absl::InvalidArgumentError(absl::StrCat("--quantization: unsupported value '", s,
                                                 "'; expected none, bf16, fp16, fp8, int8, gptq "
                                                 "or awq"));
}

std::string WeightPlanFormatName(WeightPlanFormat f) {
  switch (f) {
    case WeightPlanFormat::kNone:
      return "none";
    case WeightPlanFormat::kBf16:
      return "bf16";
    case WeightPlanFormat::kF16:
      return "fp16";
    case WeightPlanFormat::kFp8:
      return "fp8";
    case WeightPlanFormat::kInt8:
      return "int8";
    case WeightPlanFormat::kGptq:
      return "gptq";
    case WeightPlanFormat::kAwq:
      return "awq";
  }
  return "?";
}

absl::StatusOr<WeightBytes> EstimateWeightBytes(const ModelConfig& m, const WeightPlanSpec& spec) {
  QSHARD_RETURN_IF_ERROR(CheckModel(m));
  QSHARD_RETURN_IF_ERROR(CheckWeightSpec(spec));
  const int64_t h = m.hidden_size, q = m.num_heads * m.head_dim, kv = m.num_kv_heads * m.head_dim;
  const int64_t i = m.intermediate_size;
  const Linear linears[] = {{h, q}, {h, kv}, {h, kv}, {q, h}, {h, i}, {h, i}, {i, h}};
  const int64_t fp = UnquantizedElementSize(m, spec.format);

  WeightBytes w;
  // Per layer first, then times the layer count (layers are identical).
  WeightBytes layer;
  for (const Linear& l : linears) {
    const int64_t params = l.in * l.out;
    layer.num_parameters += params;
    const int64_t groups = spec.group_size > 0 ? CeilDiv(l.in, spec.group_size) : 1;
    switch (spec.format) {
      case WeightPlanFormat::kNone:
      case WeightPlanFormat::kBf16:
      case WeightPlanFormat::kF16:
        layer.quantized += params * fp;
        break;
      case WeightPlanFormat::kFp8:
      case WeightPlanFormat::kInt8:
        layer.quantized += params;
        layer.scales += l.out * 4;  // fp32 per output channel
        break;
      case WeightPlanFormat::kGptq:
        // qweight [K * bits / 32, N] int32: packed along K.
        layer.quantized += PackedBytes(l.in, spec.bits) * l.out;
        layer.scales += groups * l.out * 2;
        // qzeros [G, N * bits / 32] int32: packed along N.
        if (!spec.symmetric) layer.zero_points += groups * PackedBytes(l.out, spec.bits);
        break;
      case WeightPlanFormat::kAwq:
        // qweight [K, N / 8] int32: packed along N; qzeros [G, N / 8].
        layer.quantized += l.in * PackedBytes(l.out, spec.bits);
        layer.scales += groups * l.out * 2;
        layer.zero_points += groups * PackedBytes(l.out, spec.bits);
        break;
    }
  }
  // 16-bit extras of a layer: two RMSNorm weights and the biases.
  int64_t layer_extra = 2 * h;
  if (m.attention_bias) {
    layer_extra += q + 2 * kv;
    // Llama's attention_bias also covers o_proj; Qwen2 has q/k/v biases only.
    if (m.model_type != "qwen2") layer_extra += h;
  }
  if (m.mlp_bias) layer_extra += 2 * i + h;

  const int64_t n = m.num_layers;
  w.quantized = layer.quantized * n;
  w.scales = layer.scales * n;
  w.zero_points = layer.zero_points * n;
  const int64_t embed = m.vocab_size * h;
  const int64_t extra =
      layer_extra * n + h /*final norm*/ + embed + (m.tie_word_embeddings ? 0 : embed /*lm_head*/);
  w.unquantized = extra * fp;
  w.num_parameters = layer.num_parameters * n + extra;
  return w;
}

KvCacheSpec KvCacheSpecFor(const ModelConfig& model, DType kv_dtype, int64_t block_size) {
  KvCacheSpec s;
  s.num_layers = model.num_layers;
  s.num_kv_heads = model.num_kv_heads;
  s.head_dim = model.head_dim;
  s.block_size = block_size;
  s.dtype = kv_dtype;
  s.num_blocks = 0;
  return s;
}

int64_t KvBlocksForBudget(const KvCacheSpec& spec, int64_t bytes) {
  const int64_t per_block = spec.BytesPerBlock();
  if (bytes <= 0 || per_block <= 0) return 0;
  return bytes / per_block;
}

int64_t EstimateActivationBytes(const ModelConfig& m, int64_t max_num_batched_tokens,
                                int64_t max_num_seqs, int64_t workspace_bytes) {
  const int64_t h = m.hidden_size, q = m.num_heads * m.head_dim, kv = m.num_kv_heads * m.head_dim;
  const int64_t per_token = 2 * h + q + 2 * kv + q + 3 * m.intermediate_size;
  const int64_t sampling_rows = std::min(max_num_seqs, max_num_batched_tokens);
  return max_num_batched_tokens * per_token * 4 + 2 * sampling_rows * m.vocab_size * 4 +
         workspace_bytes;
}

absl::StatusOr<MemoryPlan> PlanMemory(const MemoryPlanRequest& r) {
  QSHARD_RETURN_IF_ERROR(CheckModel(r.model));
  if (!(r.gpu_memory_utilization > 0.0 && r.gpu_memory_utilization <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gpu-memory-utilization must be in (0, 1], got ", r.gpu_memory_utilization));
  }
  if (r.device_memory_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--device-memory must be a positive byte size, got ", r.device_memory_bytes));
  }
  if (r.max_model_len < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-model-len must be positive (0: the model's), got ", r.max_model_len));
  }
  const std::pair<const char*, int64_t> positive[] = {
      {"--max-num-seqs", r.max_num_seqs},
      {"--max-num-batched-tokens", r.max_num_batched_tokens},
      {"--block-size", r.block_size},
  };
  for (const auto& [flag, v] : positive) {
    if (v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(flag, " must be positive, got ", v));
    }
  }
  if (r.workspace_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("workspace bytes must not be negative, got ", r.workspace_bytes));
  }

  MemoryPlan p;
  p.max_model_len = r.max_model_len > 0 ? r.max_model_len : r.model.max_position_embeddings;
  if (p.max_model_len <= 0) {
    return absl::InvalidArgumentError(
        "--max-model-len is required: the model does not state max_position_embeddings");
  }
  p.max_num_seqs = r.max_num_seqs;
  p.kv_dtype = ResolveKvCacheDType(r.kv_cache_dtype, r.model.dtype);
  // A budget of whole bytes, rounded down so that "fits" never rounds in its own favour.
  p.budget_bytes = static_cast<int64_t>(
      std::floor(static_cast<double>(r.device_memory_bytes) * r.gpu_memory_utilization));

  QSHARD_ASSIGN_OR_RETURN(p.weights, EstimateWeightBytes(r.model, r.weights));
  p.weights_bytes = p.weights.Total();

  p.kv_spec = KvCacheSpecFor(r.model, p.kv_dtype, r.block_size);
  p.kv_bytes_per_token = p.kv_spec.BytesPerToken();
  p.kv_bytes_per_block = p.kv_spec.BytesPerBlock();
  p.kv_blocks_per_seq = CeilDiv(p.max_model_len, r.block_size);
  p.kv_bytes_total = p.max_num_seqs * p.kv_blocks_per_seq * p.kv_bytes_per_block;

  p.workspace_bytes = r.workspace_bytes;
  p.activation_bytes =
      EstimateActivationBytes(r.model, r.max_num_batched_tokens, r.max_num_seqs, r.workspace_bytes);
  p.total_bytes = p.weights_bytes + p.kv_bytes_total + p.activation_bytes;
  p.fits = p.total_bytes <= p.budget_bytes;

  p.kv_budget_bytes = std::max<int64_t>(0, p.budget_bytes - p.weights_bytes - p.activation_bytes);
  p.num_kv_blocks = KvBlocksForBudget(p.kv_spec, p.kv_budget_bytes);
  p.kv_spec.num_blocks = p.num_kv_blocks;
  p.max_concurrent_seqs = p.num_kv_blocks / p.kv_blocks_per_seq;
  return p;
}

}  // namespace qshard
