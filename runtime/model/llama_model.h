// File: llama_model.h
// The Llama-family decoder (Llama 1/2/3, Mistral): weights bound to a Backend, and one
// batched forward step over several sequences whose K/V live in a paged cache.
//
//   auto backend = CreateBackend("cpu").value();
//   auto model = LlamaModel::Load("models/kjv-llama-12m", backend.get()).value();
//   model->AllocateKvCache(spec);
//   SequenceChunk c{tokens, start_pos, block_table, /*logits=*/LogitsMode::kLast};
//   std::vector<float> logits;              // [rows, vocab]
//   model->Forward({&c, 1}, &logits);
#ifndef QSHARD_RUNTIME_MODEL_LLAMA_MODEL_H_
#define QSHARD_RUNTIME_MODEL_LLAMA_MODEL_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "quant/quant_config.h"
#include "runtime/backend/backend.h"
#include "runtime/checkpoint/model_config.h"
#include "runtime/checkpoint/safetensors.h"

namespace qshard {

enum class LogitsMode {
  kNone,  // a prefill chunk that is not the last: no logits needed
  kLast,  // logits of the chunk's last token (sampling)
  kAll,   // logits of every token (perplexity)
};

// One sequence's share of a step: tokens at positions [start_pos, start_pos + size).
struct SequenceChunk {
  absl::Span<const int32_t> tokens;
  int32_t start_pos = 0;
  // Cache blocks covering positions [0, start_pos + tokens.size()).
  absl::Span<const int32_t> block_table;
  LogitsMode logits = LogitsMode::kLast;
};

// What was loaded, for `qshard inspect` and the service's model info.
struct WeightSummary {
  int64_t num_parameters = 0;            // elements of all weights
  int64_t total_bytes = 0;               // as stored
  std::map<std::string, int64_t> bytes_per_dtype;  // dtype name -> bytes
  // Checkpoint bytes per storage format: "gptq-w4", "awq-w4", "fp8-e4m3", "int8",
  // "packed-w4", or "dense <dtype>" for unquantized tensors (norms, embeddings, lm_head).
  std::map<std::string, int64_t> bytes_per_format;
  std::string linear_kernel;             // kernel of the decoder linears
  std::string lm_head_kernel;            // kernel of the lm_head
  std::string quantization = "none";     // QuantizationConfig::Describe()
};

// Choices made at load time that the checkpoint does not fix.
struct ModelLoadOptions {
  // Run W8A8 checkpoints (fp8 / int8 with activation quantization) weight-only: the
  // activations stay fp32. Default: the checkpoint's activation scheme.
  bool weight_only_activations = false;
  // Quantize the 16-bit decoder linears while loading (--quantization fp8|int8 on a bf16 /
  // fp16 checkpoint): kFp8 = per-channel e4m3 weights, kInt8 = per-channel symmetric int8,
  // both with dynamic per-token activation quantization (unless weight_only_activations).
  // The lm_head and the embedding stay 16-bit. Only for unquantized checkpoints.
  QuantMethod online_quantization = QuantMethod::kNone;
  // Fuse q_proj | k_proj | v_proj into one Linear [heads*D + 2*kv_heads*D, H] and
  // gate_proj | up_proj into one [2I, H] per layer (ConcatLinearWeights on the checkpoint's
  // tensors): one GEMM instead of three / two per block. A layer whose parts cannot be
  // concatenated (formats, scales or packing differ) keeps them separate and the load logs
  // why. false: always separate (what the offline quantizer needs to replace each one).
  bool fuse_projections = true;
};

// The four distinct inputs of a decoder layer's linears (what a quantizer calibrates on).
enum class LinearSlot {
  kQkv,     // input_layernorm output [T, H] -> q_proj, k_proj, v_proj
  kO,       // attention output [T, heads*D] -> o_proj
  kGateUp,  // post_attention_layernorm output [T, H] -> gate_proj, up_proj
  kDown,    // silu(gate) * up [T, I] -> down_proj
};

// Hooks for the offline quantizer's calibration passes.
struct CalibrationHooks {
  // Called during Forward with each decoder linear input of the layers in [0, stop]
  // (x is an activation tensor of the backend: host fp32 on the CPU).
  std::function<void(int layer, LinearSlot slot, const Tensor& x)> on_linear_input;
  // >= 0: Forward stops after this layer and returns no logits (later layers are not run).
  int stop_after_layer = -1;
};

class LlamaModel {
 public:
  // Reads config + checkpoint from dir, checks every tensor name and shape, and prepares
  // the weights on the backend (zero-copy on the CPU). The backend must outlive the model.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir,
                                                         Backend* backend);
  // Same, with a config already read (e.g. adjusted by flags).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir,
                                                         const ModelConfig& config,
                                                         Backend* backend);
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir,
                                                         const ModelConfig& config,
                                                         Backend* backend,
                                                         const ModelLoadOptions& options);

  // Random weights of `shape` without a checkpoint, for benchmarks (`qshard bench
  // --load-format dummy`). format: bf16, fp16, fp8 (compressed-tensors float-quantized,
  // per-channel scales, dynamic per-token activations), int8 (compressed-tensors W8A8,
  // per-channel), gptq-4bit (AutoGPTQ v1, g128 sym) or awq-4bit (AutoAWQ GEMM, g128). The
  // decoder linears are drawn as N(0, 0.02) in fp32, rounded-to-nearest into the format's
  // tensors and prepared through Backend::PrepareLinear like a checkpoint's; embeddings,
  // norms and lm_head stay bf16. The same seed gives the same underlying fp32 weights for
  // every format.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> CreateDummy(const ModelConfig& shape,
                                                                 const std::string& format,
                                                                 Backend* backend,
                                                                 uint64_t seed);
  // Same; of the options only fuse_projections applies (the format fixes the rest).
  static absl::StatusOr<std::unique_ptr<LlamaModel>> CreateDummy(const ModelConfig& shape,
                                                                 const std::string& format,
                                                                 Backend* backend, uint64_t seed,
                                                                 const ModelLoadOptions& options);
  // The formats CreateDummy accepts, in a stable order.
  static std::vector<std::string> DummyFormats();

  const ModelConfig& config() const { return config_; }
  const WeightSummary& weight_summary() const { return summary_; }
  const QuantizationConfig& quantization() const { return quant_; }
  Backend& backend() { return *backend_; }

  absl::Status AllocateKvCache(const KvCacheSpec& spec);
  const KvCacheSpec& kv_cache_spec() const { return backend_->kv_cache_spec(); }
  // For an fp8 KV cache: sets per-layer K/V scales from the checkpoint when it has them,
  // else (calculate) from the first prefill, else leaves 1.0 and logs a warning.
  absl::Status ApplyKvScales(bool calculate);
  // (k_scale, v_scale) per layer as found in the checkpoint; empty when it has none.
  const std::vector<std::pair<float, float>>& checkpoint_kv_scales() const {
    return ckpt_kv_scales_;
  }

  // Runs one step. Logit rows are appended in chunk order: one per kLast chunk, one per
  // token of a kAll chunk. logits receives [rows, vocab] fp32.
  absl::Status Forward(absl::Span<const SequenceChunk> chunks, std::vector<float>* logits);
  // Same step, but the logits [rows, vocab] fp32 stay in backend memory (valid until the
  // next step) for Backend::Sample; a rank-0 Tensor() when the step has no logit rows. The
  // step's errors surface from Backend::Sample / CopyToHost, which end it.
  absl::StatusOr<Tensor> ForwardLogits(absl::Span<const SequenceChunk> chunks);

  // --- offline quantizer support -------------------------------------------------
  // Installs (or, with a default-constructed value, removes) calibration hooks.
  void SetCalibrationHooks(CalibrationHooks hooks) { hooks_ = std::move(hooks); }
  // Replaces one decoder linear ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
  // "up_proj", "down_proj") of `layer` by an op prepared on this model's backend, e.g. its
  // quantized version; the shape must match. FailedPrecondition for a projection that was
  // fused at load (load with ModelLoadOptions::fuse_projections = false to replace it).
  absl::Status ReplaceLinear(int layer, const std::string& proj, std::unique_ptr<LinearOp> op);
  // The decoder linears of `layer` in forward order, as they run: q|k|v fused or q, k, v;
  // o; gate|up fused or gate, up; down. For benchmarks that time the linear kernels alone
  // and count the weight bytes they stream (a fused op holds the bytes of its parts). Empty
  // when layer is out of range.
  std::vector<const LinearOp*> DecoderLinears(int layer) const;
  // Whether `layer` runs fused q|k|v and gate|up Linears (false when out of range).
  bool qkv_fused(int layer) const;
  bool gate_up_fused(int layer) const;
  // Replaces the RMSNorm weights of a layer (AWQ folds its scales into them): host [H].
  absl::Status ReplaceNorms(int layer, const Tensor& input_norm, const Tensor& post_norm);

 private:
  struct Layer {
    Tensor input_norm;   // [H]
    Tensor post_norm;    // [H]
    // Either qkv_proj, or q_proj + k_proj + v_proj.
    std::unique_ptr<LinearOp> qkv_proj;  // [(heads + 2*kv_heads)*D, H]: rows q, then k, v
    std::unique_ptr<LinearOp> q_proj;    // [heads*D, H]
    std::unique_ptr<LinearOp> k_proj;    // [kv_heads*D, H]
    std::unique_ptr<LinearOp> v_proj;    // [kv_heads*D, H]
    std::unique_ptr<LinearOp> o_proj;    // [H, heads*D]
    // Either gate_up_proj, or gate_proj + up_proj.
    std::unique_ptr<LinearOp> gate_up_proj;  // [2I, H]: rows gate, then up
    std::unique_ptr<LinearOp> gate_proj; // [I, H]
    std::unique_ptr<LinearOp> up_proj;   // [I, H]
    std::unique_ptr<LinearOp> down_proj; // [H, I]
  };

  // How many layers got a fused Linear and why the first that did not was refused.
  struct FusionStats {
    int fused = 0;
    int separate = 0;
    std::string first_reason;
  };

  LlamaModel(ModelConfig config, Backend* backend) : config_(std::move(config)), backend_(backend) {}
  absl::Status LoadWeights(const Checkpoint& ckpt, const ModelLoadOptions& options);
  absl::Status BuildDummyWeights(const std::string& format, uint64_t seed, bool fuse);
  // Prepares the Linears `parts` that read one input (q, k, v or gate, up). With fuse, they
  // are concatenated along N (ConcatLinearWeights) and prepared as one Linear into *fused;
  // the parts are then dropped (checkpoint pages released, host-built ones freed) since the
  // fused copy replaces them. When the concatenation or its preparation is refused, or
  // without fuse, each part is prepared into *separate[i] as before. stats counts the outcome.
  absl::Status PrepareProjections(std::vector<LinearWeights> parts, std::string fused_name,
                                  bool fuse, FusionStats* stats, std::unique_ptr<LinearOp>* fused,
                                  absl::Span<std::unique_ptr<LinearOp>* const> separate);
  // One INFO line per kind of fusion that some layer could not use.
  void LogFusion(const FusionStats& qkv, const FusionStats& gate_up) const;

  ModelConfig config_;
  QuantizationConfig quant_;
  Backend* backend_;
  Tensor embed_tokens_;               // [vocab, H]
  std::vector<Layer> layers_;
  Tensor final_norm_;                 // [H]
  std::unique_ptr<LinearOp> lm_head_; // [vocab, H] (the embedding when tied)
  WeightSummary summary_;
  StepMetadata meta_;                 // reused across steps
  std::vector<std::pair<float, float>> ckpt_kv_scales_;  // [layers] or empty
  CalibrationHooks hooks_;
  // Load only: bytes of host-built fused parts freed since memory was last returned to the
  // OS (PrepareProjections).
  int64_t freed_at_load_ = 0;
};

}  // namespace qshard

#endif  // QSHARD_RUNTIME_MODEL_LLAMA_MODEL_H_
