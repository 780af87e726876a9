// File: backend.h
// The narrow op interface between model code and a compute device. Model code includes
// only this header; CPU and CUDA implementations live in backend/cpu and backend/cuda.
//
// Activations are [tokens, features] row-major in the backend's activation dtype (fp32 on
// the CPU). One forward step covers several sequences; StepMetadata tells attention which
// tokens belong to which sequence and where their K/V go in the paged cache.
//
//   auto backend = CreateBackend("cpu").value();
//   auto q_proj = backend->PrepareLinear(weights).value();
//   backend->Linear(x, *q_proj, q);
#ifndef QSHARD_RUNTIME_BACKEND_BACKEND_H_
#define QSHARD_RUNTIME_BACKEND_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kv/kv_cache_spec.h"
#include "quant/kernel_selection.h"
#include "quant/linear_weights.h"
#include "runtime/base/tensor.h"
#include "runtime/checkpoint/model_config.h"

namespace qshard {

// A linear layer prepared for one backend (weights uploaded / repacked as it needs).
class LinearOp {
 public:
  virtual ~LinearOp() = default;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  // Name of the kernel that runs it, e.g. "cpu-dense-bfloat16-avx512".
  virtual std::string kernel_name() const = 0;
  // Bytes of weight memory it holds or reads (packed size for quantized formats).
  virtual int64_t weight_bytes() const = 0;
};

// Where the tokens of one forward step go. T = total tokens, S = sequences.
struct StepMetadata {
  std::vector<int32_t> positions;     // [T] position of each token in its sequence
  std::vector<int32_t> slot_mapping;  // [T] cache slot (block * block_size + offset) per token
  std::vector<int32_t> query_start;   // [S + 1] token ranges of the sequences
  std::vector<int32_t> context_lens;  // [S] K/V length of each sequence after this step
  std::vector<int32_t> block_tables;  // [S, max_blocks_per_seq], padded with -1
  int32_t max_blocks_per_seq = 0;
  int32_t num_logit_rows = -1;  // rows of logits the step returns (-1: not known)
  int32_t num_tokens() const { return static_cast<int32_t>(positions.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(context_lens.size()); }
};

// One row of on-device sampling: the engine's SamplingParams of a request plus the
// state the draw depends on. Meanings and ranges as in runtime/engine/sampling.h.
struct SamplingRow {
  float temperature = 1.0f;         // < 1e-5: greedy
  int32_t top_k = 0;                // 0: off
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  uint64_t seed = 0;                // the request's seed (drawn at random when it had none)
  uint64_t step = 0;                // tokens generated so far: advances the random stream
  absl::Span<const int32_t> prompt;   // for the repetition penalty
  absl::Span<const int32_t> output;   // for all three penalties
  absl::Span<const int32_t> blocked;  // ids that must not be chosen (EOS before min_tokens)
  int32_t num_logprobs = 0;         // top-n raw logprobs to return, [0, 20]
};

// What on-device sampling returns per row.
struct SampledToken {
  int32_t token_id = -1;
  float logprob = 0.0f;                            // raw log-softmax of the chosen token
  std::vector<std::pair<int32_t, float>> top;      // num_logprobs (id, logprob), best first
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  // Human-readable name ("cpu (2 threads, avx2)", "cuda:0 NVIDIA H100 80GB HBM3").
  virtual std::string name() const = 0;
  virtual DType activation_dtype() const = 0;
  // What the kernel selection needs to know (compute capability, memory).
  virtual DeviceInfo device_info() const = 0;
  // Device memory not yet allocated by anyone (0 on the CPU, where the KV budget is a flag).
  virtual int64_t free_device_memory_bytes() const { return 0; }

  // --- memory -------------------------------------------------------------
  // Makes a (small) host weight usable by ops: norm weights, embedding table.
  virtual absl::StatusOr<Tensor> UploadWeight(const Tensor& host) = 0;
  virtual absl::StatusOr<std::unique_ptr<LinearOp>> PrepareLinear(const LinearWeights& w) = 0;
  // A new activation tensor [rows, cols] in activation_dtype(). On a GPU it lives until
  // the next BeginStep (a per-step arena), so a forward step allocates freely.
  virtual Tensor Allocate(int64_t rows, int64_t cols) = 0;
  // A new fp32 tensor [rows, cols] for values that must not lose precision between ops:
  // the residual stream (summed over every layer) and the logits. Same lifetime as
  // Allocate.
  virtual Tensor AllocateF32(int64_t rows, int64_t cols) = 0;
  // Allocates the paged K/V storage for every layer.
  virtual absl::Status AllocateKvCache(const KvCacheSpec& spec) = 0;
  virtual const KvCacheSpec& kv_cache_spec() const = 0;
  // Per-layer fp32 scales of an fp8 KV cache (value = code x scale), K and V separately.
  // Call after AllocateKvCache; they default to 1.0.
  virtual void SetKvScales(int layer, float k_scale, float v_scale) = 0;
  virtual std::pair<float, float> GetKvScales(int layer) const = 0;
  // The next step that reaches each layer first sets its scales from that step's
  // K / V absolute maximum (--calculate-kv-scales).
  virtual void CalculateKvScalesAtNextStep() = 0;
  // Copies activations (e.g. logits [rows, vocab]) into host fp32 memory.
  virtual absl::Status CopyToHost(const Tensor& src, float* dst) = 0;

  // --- sampling on the device ------------------------------------------------
  // Whether Sample() is available: the engine then samples where the logits are and only
  // the chosen ids (and requested logprobs) reach the host. The CPU backend samples with
  // the engine's host Sampler instead (the logits are already in host memory).
  virtual bool SupportsSampling() const { return false; }
  // Draws one token per row of logits [rows.size(), vocab] (fp32, this step's lm_head
  // output). Like CopyToHost it ends the step and returns its first error.
  virtual absl::Status Sample(const Tensor& logits, absl::Span<const SamplingRow> rows,
                              std::vector<SampledToken>* out) {
    return absl::UnimplementedError(
        "this backend does not sample on the device (SupportsSampling() is false): copy the "
        "logits to the host and use the engine's Sampler");
  }

  // --- per step -------------------------------------------------------------
  // Sets the token/sequence layout for the following ops (uploads indices on a GPU).
  virtual absl::Status BeginStep(const StepMetadata& meta) = 0;

  // --- ops (shapes: T tokens, H hidden) ---------------------------------------
  // out[T, H] = table[ids[t], :]; ids is host memory of length T.
  virtual void Embedding(const Tensor& table, const int32_t* ids, Tensor& out) = 0;
  // out = RMSNorm(x) * w.
  virtual void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) = 0;
  // residual += x; out = RMSNorm(residual) * w.
  virtual void AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& w, float eps,
                          Tensor& out) = 0;
  // y[T, out] = x[T, in] . W^T (+ bias).
  virtual void Linear(const Tensor& x, const LinearOp& op, Tensor& y) = 0;
  // Rotates q [T, heads*D] and k [T, kv_heads*D] in place at the step's positions
  // (HF rotate-half layout).
  virtual void Rope(Tensor& q, Tensor& k, int64_t head_dim, const RopeConfig& rope) = 0;
  // Writes k, v [T, kv_heads*D] into layer's cache slots, then causal GQA attention of
  // q [T, heads*D] over each sequence's cached K/V: out [T, heads*D].
  virtual void Attention(int layer, const Tensor& q, const Tensor& k, const Tensor& v,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                         float scale, Tensor& out) = 0;
  // out[T, F] = silu(gate) * up.
  virtual void SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // The output of a fused gate|up Linear: gate_up [T, 2F] holds gate [T, F] in columns
  // [0, F) and up in [F, 2F) of each row; out [T, F] = silu(gate) * up with SiluMul's
  // arithmetic (fp32, rounded once to out's dtype). out must not overlap gate_up.
  virtual void SiluMulPacked(const Tensor& gate_up, Tensor& out) = 0;
  // The output of a fused q|k|v Linear split into its parts: x [T, sum(C_i)] ->
  // outs[i] [T, C_i] = x[:, c_i : c_i + C_i] with c_i = C_0 + ... + C_(i-1). Every out has
  // x's dtype and row count and its own memory (no overlap with x or each other).
  virtual void SplitColumns(const Tensor& x, absl::Span<Tensor* const> outs) = 0;
  // The fused q|k|v Linear's output to attention's inputs: the same q, k, v as
  // SplitColumns(qkv, {&q, &k, &v}) followed by Rope(q, k, head_dim, rope) (the default
  // does exactly that). A backend may also write k and v into `layer`'s KV cache here, as
  // the Attention(layer, q, k, v, ...) that follows in the same step would; that Attention
  // then skips the write (the CUDA backend's one-launch fused kernel).
  // (Defined here, not in backend.cc: the backends' own libraries do not link that one.)
  virtual void SplitQkvRope(int /*layer*/, const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v,
                            int64_t head_dim, const RopeConfig& rope) {
    Tensor* parts[] = {&q, &k, &v};
    SplitColumns(qkv, parts);
    Rope(q, k, head_dim, rope);
  }
  // x += y.
  virtual void Add(Tensor& x, const Tensor& y) = 0;
  // Rows of src selected by host indices: out[i] = src[rows[i]].
  virtual void GatherRows(const Tensor& src, const std::vector<int32_t>& rows, Tensor& out) = 0;
};

// device: "cpu", "cuda" (first GPU), or "auto" (CUDA when built and a GPU is present).
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& device);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BACKEND_BACKEND_H_
