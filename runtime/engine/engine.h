// File: engine.h
// The inference engine: a model, its paged KV cache, a continuous-batching scheduler and
// per-request sampling / incremental detokenization / stop handling. Single-threaded:
// the server runs Step() on its own engine thread and feeds requests through a queue.
//
//   auto engine = Engine::Create(options).value();
//   engine->AddRequest({.id = "a", .prompt = ids, .params = params});
//   while (engine->HasWork()) {
//     for (const RequestOutput& out : engine->Step().value()) { ... stream out.text ... }
//   }
#ifndef QSHARD_RUNTIME_ENGINE_ENGINE_H_
#define QSHARD_RUNTIME_ENGINE_ENGINE_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kv/block_allocator.h"
#include "kv/kv_cache_spec.h"
#include "quant/kernel_selection.h"
#include "runtime/backend/backend.h"
#include "runtime/engine/sampling.h"
#include "runtime/model/llama_model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace qshard {

struct EngineOptions {
  std::string model_dir;
  std::string device = "auto";  // cpu | cuda | auto
  int32_t max_num_seqs = 64;
  int32_t max_num_batched_tokens = 2048;
  int64_t max_model_len = 0;    // 0: the model's max_position_embeddings
  int64_t block_size = 16;
  // Fraction of device memory for weights + KV + workspace on a GPU (the planner sizes the
  // KV pool from it); the CPU uses kv_cache_memory_bytes.
  double gpu_memory_utilization = 0.9;
  // KV pool size; 0 picks a default (512 MiB on the CPU).
  int64_t kv_cache_memory_bytes = 0;
  // On the CPU "auto" means float32, matching the fp32 math of the reference.
  KvCacheDType kv_cache_dtype = KvCacheDType::kAuto;
  // fp8 KV caches without scales in the checkpoint: compute them from the first prefill.
  bool calculate_kv_scales = false;
  // --quantization: auto | none | fp8 | int8 | gptq | awq | compressed-tensors.
  std::string quantization = "auto";
  // Run W8A8 checkpoints (and --quantization fp8|int8) weight-only: activations stay in
  // float (--weight-only-activations).
  bool weight_only_activations = false;
  // Reuse the K/V of full blocks whose token prefix was seen before.
  bool enable_prefix_caching = true;
  // One fused Linear for q|k|v and one for gate|up per layer where the checkpoint's
  // formats allow it (ModelLoadOptions::fuse_projections).
  bool fuse_projections = true;
};

enum class FinishReason { kNone, kStop, kLength, kAbort, kError };
std::string FinishReasonName(FinishReason r);

struct Request {
  std::string id;
  std::vector<int32_t> prompt;  // token ids (BOS included when wanted)
  SamplingParams params;
};

// What one step produced for one request.
struct RequestOutput {
  std::string id;
  std::vector<int32_t> token_ids;  // new tokens this step (stop strings' tokens included)
  std::string text;                // new text (held back while it may start a stop string)
  std::vector<SampleResult> logprobs;  // per new token when params.logprobs > 0
  bool finished = false;
  FinishReason finish_reason = FinishReason::kNone;
  absl::Status error;              // set when finish_reason == kError
  int32_t prompt_tokens = 0;
  int32_t completion_tokens = 0;
  int32_t cached_prompt_tokens = 0;
};

struct EngineStats {
  int32_t num_running = 0;
  int32_t num_waiting = 0;
  int32_t kv_blocks_total = 0;
  int32_t kv_blocks_used = 0;
  int64_t num_preemptions = 0;
  int64_t prefix_cache_queries = 0;  // prompt tokens looked up in the prefix cache
  int64_t prefix_cache_hits = 0;     // of which found cached
  int32_t kv_blocks_cached = 0;      // blocks registered in the prefix cache
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options);
  // Same on a backend the caller made (options.device is then not used), e.g. one
  // configured beyond what the flags offer, or a test double.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const EngineOptions& options,
                                                        std::unique_ptr<Backend> backend);
  ~Engine();

  // Validates and queues a request. InvalidArgument for a bad field or an over-long
  // prompt, AlreadyExists for a duplicate id.
  absl::Status AddRequest(Request request);
  // Marks a request aborted; its blocks are freed and it reports kAbort at the next Step.
  // Returns false when the id is unknown (already finished).
  bool Abort(const std::string& id);
  bool HasWork() const { return !running_.empty() || !waiting_.empty() || !finished_.empty(); }
  // Runs one scheduler step + forward; returns outputs of the requests that progressed.
  absl::StatusOr<std::vector<RequestOutput>> Step();

  const ModelConfig& config() const { return model_->config(); }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  LlamaModel& model() { return *model_; }
  const EngineOptions& options() const { return options_; }
  const KvCacheSpec& kv_cache_spec() const { return model_->kv_cache_spec(); }
  int64_t max_model_len() const { return max_model_len_; }
  EngineStats stats() const;
  // The linear kernel chosen at load and why (see quant/kernel_selection.h).
  const KernelChoice& kernel_choice() const { return kernel_choice_; }

 private:
  struct Sequence;
  Engine() = default;
  void FinishSequence(Sequence& s, FinishReason reason, std::vector<RequestOutput>* out);
  void Preempt(Sequence& s);
  // Prefix cache: reuse leading cached blocks of a sequence about to be admitted, and
  // register the blocks a step has filled.
  void MatchPrefix(Sequence& s);
  void RegisterFullBlocks(Sequence& s);
  // Appends the sampled token, detokenizes, checks stop conditions.
  void Advance(Sequence& s, const SampleResult& r, std::vector<RequestOutput>* out);

  EngineOptions options_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<BlockAllocator> allocator_;
  int64_t max_model_len_ = 0;
  KernelChoice kernel_choice_;
  std::map<std::string, std::unique_ptr<Sequence>> seqs_;
  std::deque<Sequence*> waiting_;   // FCFS; preempted sequences go back to the front
  std::vector<Sequence*> running_;  // in admission order
  std::vector<Sequence*> finished_;  // aborted between steps, reported at the next Step
  int64_t num_preemptions_ = 0;
  int64_t prefix_queries_ = 0;
  int64_t prefix_hits_ = 0;
  std::vector<float> logits_;
};

}  // namespace qshard

#endif  // QSHARD_RUNTIME_ENGINE_ENGINE_H_
