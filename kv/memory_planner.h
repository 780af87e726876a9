// File: memory_planner.h
// How much device memory a model needs: weights in a given format (quantized data, scales
// and zero points counted apart), the paged KV cache, and activations/workspace; whether it
// fits, and how many KV blocks / full-length sequences the rest holds. Pure arithmetic:
// `qshard plan` prints it, and the server sizes its KV pool with the same functions.
//
//   MemoryPlanRequest req;
//   req.model = ModelShapeByName("llama-3.1-8b").value();
//   req.weights.format = WeightPlanFormat::kFp8;
//   req.device_memory_bytes = 80'000'000'000;
//   req.max_model_len = 8192;
//   req.max_num_seqs = 16;
//   QSHARD_ASSIGN_OR_RETURN(MemoryPlan plan, PlanMemory(req));
//   if (!plan.fits) ...;  plan.max_concurrent_seqs, plan.num_kv_blocks
//
// What is counted:
// - Weights. Every decoder linear (q, k, v, o, gate, up, down) is stored in the chosen
//   format; embeddings, an untied lm_head, the RMSNorm weights and biases stay 16-bit (the
//   checkpoint's float dtype when the format is `none`).
//     none / bf16 / fp16: 2 bytes per weight (4 for a float32 checkpoint with `none`).
//     fp8, int8: 1 byte per weight + one fp32 scale per output channel.
//     gptq (4 or 8 bit), awq (4 bit): bits/8 bytes per weight packed in int32 words, fp16
//       scales per (group of group_size inputs, output channel), and for asymmetric GPTQ and
//       for AWQ packed zero points of the same width per (group, output channel). Symmetric
//       GPTQ checkpoints also carry a constant qzeros tensor, but kernels never read it, so it
//       is not resident and not counted. act-order's g_idx (4 bytes per input row) is left out.
// - KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes per value per token, in
//   whole blocks of block_size tokens: max_num_seqs x ceil(max_model_len / block_size)
//   blocks. FP8 KV's per-layer scales (8 bytes a layer) are negligible and left out.
// - Activations and workspace, for one step of max_num_batched_tokens tokens in fp32:
//     T x (2 h + q + 2 kv + q + 3 i) x 4      residual + normed input, q/k/v projections,
//                                            attention output, gate + up + SwiGLU product
//   + 2 x S x vocab x 4                       logits and sampling probabilities of the S =
//                                            min(max_num_seqs, T) rows that sample
//   + workspace_bytes                         fixed: cuBLAS/cuBLASLt workspaces, CUDA graph
//                                            pools and allocator slack (256 MiB on a GPU)
//   (h = hidden, q = heads x head_dim, kv = kv_heads x head_dim, i = intermediate). Attention
//   keeps one row of scores per thread (never a T x T matrix) and buffers are reused layer to
//   layer, so only one layer's worth is live.
#ifndef QSHARD_KV_MEMORY_PLANNER_H_
#define QSHARD_KV_MEMORY_PLANNER_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "kv/kv_cache_spec.h"
#include "runtime/checkpoint/model_config.h"

namespace qshard {

// How decoder linear weights are stored, for planning.
enum class WeightPlanFormat { kNone, kBf16, kF16, kFp8, kInt8, kGptq, kAwq };
// "none", "bf16"/"bfloat16", "fp16"/"float16", "fp8", "int8", "gptq", "awq".
absl::StatusOr<WeightPlanFormat> ParseWeightPlanFormat(const std::string& s);
std::string WeightPlanFormatName(WeightPlanFormat f);

struct WeightPlanSpec {
  WeightPlanFormat format = WeightPlanFormat::kNone;
  int bits = 4;              // gptq: 4 or 8; awq: 4
  int64_t group_size = 128;  // gptq / awq; -1: one group spans all inputs (per channel)
  bool symmetric = true;     // gptq; awq always has zero points
};

struct WeightBytes {
  int64_t quantized = 0;    // decoder linear weights in the chosen format
  int64_t scales = 0;       // their scales
  int64_t zero_points = 0;  // their packed zero points
  int64_t unquantized = 0;  // embeddings, lm_head, norms, biases (16-bit)
  int64_t num_parameters = 0;
  int64_t Total() const { return quantized + scales + zero_points + unquantized; }
};

absl::StatusOr<WeightBytes> EstimateWeightBytes(const ModelConfig& model,
                                                const WeightPlanSpec& spec);

// The KV cache layout of `model` (num_blocks left 0).
KvCacheSpec KvCacheSpecFor(const ModelConfig& model, DType kv_dtype, int64_t block_size);
// Whole blocks of `spec` that fit in `bytes`; 0 when bytes <= 0.
int64_t KvBlocksForBudget(const KvCacheSpec& spec, int64_t bytes);

inline constexpr int64_t kGpuWorkspaceBytes = int64_t{256} << 20;

// Activations + workspace for one step (formula above).
int64_t EstimateActivationBytes(const ModelConfig& model, int64_t max_num_batched_tokens,
                                int64_t max_num_seqs, int64_t workspace_bytes);

struct MemoryPlanRequest {
  ModelConfig model;
  WeightPlanSpec weights;
  KvCacheDType kv_cache_dtype = KvCacheDType::kAuto;  // auto: the model's dtype
  int64_t max_model_len = 0;                          // 0: the model's max_position_embeddings
  int64_t max_num_seqs = 1;
  int64_t max_num_batched_tokens = 2048;
  int64_t block_size = 16;
  int64_t device_memory_bytes = 0;
  double gpu_memory_utilization = 0.9;  // fraction of the device the engine may use, (0, 1]
  int64_t workspace_bytes = kGpuWorkspaceBytes;
};

struct MemoryPlan {
  // Resolved inputs.
  int64_t max_model_len = 0;
  int64_t max_num_seqs = 0;
  DType kv_dtype = DType::kBF16;
  int64_t budget_bytes = 0;  // device memory x utilization

  WeightBytes weights;
  int64_t weights_bytes = 0;  // weights.Total()
  int64_t kv_bytes_per_token = 0;
  int64_t kv_bytes_per_block = 0;
  int64_t kv_blocks_per_seq = 0;  // ceil(max_model_len / block_size)
  int64_t kv_bytes_total = 0;     // max_num_seqs full-length sequences
  int64_t activation_bytes = 0;   // includes workspace_bytes
  int64_t workspace_bytes = 0;
  int64_t total_bytes = 0;  // weights + KV + activations
  bool fits = false;        // total_bytes <= budget_bytes

  // What the server would do with the budget: all that is left after weights and
  // activations goes to KV blocks.
  int64_t kv_budget_bytes = 0;  // budget - weights - activations, >= 0
  int64_t num_kv_blocks = 0;
  int64_t max_concurrent_seqs = 0;  // full-length sequences those blocks hold
  KvCacheSpec kv_spec;              // with num_blocks = num_kv_blocks
};

// Errors (InvalidArgument, naming the setting): a model without dimensions, utilization
// outside (0, 1], a non-positive device memory, negative or zero lengths and counts, an
// unsupported bits / group size combination.
absl::StatusOr<MemoryPlan> PlanMemory(const MemoryPlanRequest& request);

}  // namespace qshard

#endif  // QSHARD_KV_MEMORY_PLANNER_H_
