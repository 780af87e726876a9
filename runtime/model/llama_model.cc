#include "runtime/model/llama_model.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/base/log.h"
#include "runtime/base/status_macros.h"

namespace qshard {
namespace {

// Tracks which checkpoint tensors were used, so leftovers can be reported.
class TensorBinder {
 public:
  explicit TensorBinder(const Checkpoint& ckpt) : ckpt_(ckpt) {}

  // A required tensor of exactly `shape` in a floating-point dtype.
  absl::StatusOr<Tensor> Take(const std::string& name, const Shape& shape) {
    const TensorInfo* info = ckpt_.Find(name);
    if (info == nullptr) {
      return absl::NotFoundError(absl::StrCat("checkpoint ", ckpt_.dir(), ": missing tensor '",
                                              name, "' (expected shape ", ShapeToString(shape),
                                              ")"));
    }
    if (info->shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat("checkpoint ", ckpt_.dir(), ": tensor '", name, "' has shape ",
                       ShapeToString(info->shape), ", expected ", ShapeToString(shape)));
    }
    if (info->dtype != DType::kBF16 && info->dtype != DType::kF16 && info->dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", ckpt_.dir(), ": tensor '", name, "' has dtype ",
          std::string(DTypeName(info->dtype)),
          ", expected bfloat16, float16 or float32 (quantized checkpoints need their "
          "quantization_config)"));
    }
    used_.insert(name);
    return ckpt_.Get(name);
  }

  // Every tensor not taken, except buffers that carry no weights.
  std::vector<std::string> Unused() const {
    std::vector<std::string> out;
    for (const auto& name : ckpt_.Names()) {
      if (used_.count(name) || absl::EndsWith(name, ".rotary_emb.inv_freq")) continue;
      out.push_back(name);
    }
    return out;
  }

 private:
  const Checkpoint& ckpt_;
  std::set<std::string> used_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                             Backend* backend) {
  QSHARD_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  return Load(dir, config, backend);
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                             const ModelConfig& config,
                                                             Backend* backend) {
  QSHARD_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open(dir));
  std::unique_ptr<LlamaModel> model(new LlamaModel(config, backend));
  QSHARD_RETURN_IF_ERROR(model->LoadWeights(ckpt));
  return model;
}

absl::Status LlamaModel::LoadWeights(const Checkpoint& ckpt) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t q_out = c.num_heads * D, kv_out = c.num_kv_heads * D;
  TensorBinder bind(ckpt);

  auto account = [&](const Tensor& t) {
    summary_.num_parameters += t.numel();
    summary_.total_bytes += static_cast<int64_t>(t.nbytes());
    summary_.bytes_per_dtype[std::string(DTypeName(t.dtype()))] += static_cast<int64_t>(t.nbytes());
  };
  auto take_vector = [&](const std::string& name, int64_t n) -> absl::StatusOr<Tensor> {
    QSHARD_ASSIGN_OR_RETURN(Tensor t, bind.Take(name, {n}));
    account(t);
    return backend_->UploadWeight(t);
  };
  auto take_linear = [&](const std::string& prefix, int64_t out, int64_t in,
                         bool has_bias) -> absl::StatusOr<std::unique_ptr<LinearOp>> {
    LinearWeights w;
    w.name = prefix;
    w.in_features = in;
    w.out_features = out;
    QSHARD_ASSIGN_OR_RETURN(w.weight, bind.Take(prefix + ".weight", {out, in}));
    account(w.weight);
    if (has_bias) {
      QSHARD_ASSIGN_OR_RETURN(w.bias, bind.Take(prefix + ".bias", {out}));
      account(w.bias);
    }
    return backend_->PrepareLinear(w);
  };

  QSHARD_ASSIGN_OR_RETURN(Tensor embed, bind.Take("model.embed_tokens.weight", {c.vocab_size, H}));
  account(embed);
  QSHARD_ASSIGN_OR_RETURN(embed_tokens_, backend_->UploadWeight(embed));
  layers_.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    Layer& L = layers_[l];
    QSHARD_ASSIGN_OR_RETURN(L.input_norm, take_vector(p + "input_layernorm.weight", H));
    QSHARD_ASSIGN_OR_RETURN(L.post_norm, take_vector(p + "post_attention_layernorm.weight", H));
    QSHARD_ASSIGN_OR_RETURN(L.q_proj, take_linear(p + "self_attn.q_proj", q_out, H, c.attention_bias));
    QSHARD_ASSIGN_OR_RETURN(L.k_proj, take_linear(p + "self_attn.k_proj", kv_out, H, c.attention_bias));
    QSHARD_ASSIGN_OR_RETURN(L.v_proj, take_linear(p + "self_attn.v_proj", kv_out, H, c.attention_bias));
    QSHARD_ASSIGN_OR_RETURN(L.o_proj, take_linear(p + "self_attn.o_proj", H, q_out, c.attention_bias));
    QSHARD_ASSIGN_OR_RETURN(L.gate_proj, take_linear(p + "mlp.gate_proj", I, H, c.mlp_bias));
    QSHARD_ASSIGN_OR_RETURN(L.up_proj, take_linear(p + "mlp.up_proj", I, H, c.mlp_bias));
    QSHARD_ASSIGN_OR_RETURN(L.down_proj, take_linear(p + "mlp.down_proj", H, I, c.mlp_bias));
  }
  QSHARD_ASSIGN_OR_RETURN(final_norm_, take_vector("model.norm.weight", H));
  if (c.tie_word_embeddings && !ckpt.Has("lm_head.weight")) {
    LinearWeights w;
    w.name = "lm_head (tied to model.embed_tokens)";
    w.in_features = H;
    w.out_features = c.vocab_size;
    w.weight = embed;
    QSHARD_ASSIGN_OR_RETURN(lm_head_, backend_->PrepareLinear(w));
  } else {
    QSHARD_ASSIGN_OR_RETURN(lm_head_, take_linear("lm_head", c.vocab_size, H, false));
  }
  std::vector<std::string> unused = bind.Unused();
  if (!unused.empty()) {
    if (unused.size() > 5) {
      size_t more = unused.size() - 5;
      unused.resize(5);
      unused.push_back(absl::StrCat("... and ", more, " more"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "checkpoint ", ckpt.dir(), ": unexpected tensor(s) for ", c.architecture, ": ",
        absl::StrJoin(unused, ", ")));
  }
  summary_.linear_kernel = layers_.empty() ? lm_head_->kernel_name() : layers_[0].q_proj->kernel_name();
  return absl::OkStatus();
}

absl::Status LlamaModel::AllocateKvCache(const KvCacheSpec& spec) {
  if (spec.num_layers != config_.num_layers || spec.num_kv_heads != config_.num_kv_heads ||
      spec.head_dim != config_.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV cache spec ", spec.DebugString(), " does not match the model"));
  }
  return backend_->AllocateKvCache(spec);
}

absl::Status LlamaModel::Forward(absl::Span<const SequenceChunk> chunks,
                                 std::vector<float>* logits) {
  const ModelConfig& c = config_;
  const KvCacheSpec& kv = backend_->kv_cache_spec();
  if (kv.num_blocks == 0) return absl::FailedPreconditionError("KV cache not allocated");
  const int64_t bs = kv.block_size;

  // ---- Step layout: token positions, cache slots, per-sequence block tables. ----
  StepMetadata& m = meta_;
  m.positions.clear();
  m.slot_mapping.clear();
  m.query_start.assign(1, 0);
  m.context_lens.clear();
  std::vector<int32_t> ids;
  std::vector<int32_t> logit_rows;  // token indices whose logits are returned
  int32_t max_blocks = 1;
  for (const auto& ch : chunks) max_blocks = std::max<int32_t>(max_blocks, ch.block_table.size());
  m.max_blocks_per_seq = max_blocks;
  m.block_tables.assign(chunks.size() * max_blocks, -1);
  for (size_t s = 0; s < chunks.size(); ++s) {
    const SequenceChunk& ch = chunks[s];
    const int64_t end = ch.start_pos + static_cast<int64_t>(ch.tokens.size());
    if (ch.tokens.empty()) return absl::InvalidArgumentError("empty sequence chunk");
    if (end > static_cast<int64_t>(ch.block_table.size()) * bs) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence chunk ends at position ", end, " but its block table covers ",
                       ch.block_table.size() * bs, " positions"));
    }
    for (size_t i = 0; i < ch.tokens.size(); ++i) {
      const int32_t id = ch.tokens[i];
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " out of range [0, ", c.vocab_size, ")"));
      }
      const int32_t pos = ch.start_pos + static_cast<int32_t>(i);
      const int32_t block = ch.block_table[pos / bs];
      if (block < 0 || block >= kv.num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("block id ", block, " out of range"));
      }
      if (ch.logits == LogitsMode::kAll ||
          (ch.logits == LogitsMode::kLast && i + 1 == ch.tokens.size())) {
        logit_rows.push_back(static_cast<int32_t>(ids.size()));
      }
      ids.push_back(id);
      m.positions.push_back(pos);
      m.slot_mapping.push_back(static_cast<int32_t>(block * bs + pos % bs));
    }
    std::copy(ch.block_table.begin(), ch.block_table.end(), m.block_tables.begin() + s * max_blocks);
    m.query_start.push_back(static_cast<int32_t>(ids.size()));
    m.context_lens.push_back(static_cast<int32_t>(end));
  }
  QSHARD_RETURN_IF_ERROR(backend_->BeginStep(m));

  // ---- Decoder. Shapes: T tokens, H hidden, D head dim, I intermediate. ----
  const int64_t T = static_cast<int64_t>(ids.size());
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Backend& b = *backend_;
  Tensor residual = b.Allocate(T, H);                 // [T, H] the residual stream
  Tensor h = b.Allocate(T, H);                        // [T, H] normed input of a block
  Tensor q = b.Allocate(T, c.num_heads * D);          // [T, heads*D]
  Tensor k = b.Allocate(T, c.num_kv_heads * D);       // [T, kv_heads*D]
  Tensor v = b.Allocate(T, c.num_kv_heads * D);       // [T, kv_heads*D]
  Tensor attn = b.Allocate(T, c.num_heads * D);       // [T, heads*D]
  Tensor delta = b.Allocate(T, H);                    // [T, H] block output to add
  Tensor gate = b.Allocate(T, I);                     // [T, I]
  Tensor up = b.Allocate(T, I);                       // [T, I]

  b.Embedding(embed_tokens_, ids.data(), residual);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    Layer& L = layers_[l];
    if (l == 0) {
      b.RmsNorm(residual, L.input_norm, eps, h);
    } else {
      b.AddRmsNorm(residual, delta, L.input_norm, eps, h);  // adds the previous MLP output
    }
    b.Linear(h, *L.q_proj, q);
    b.Linear(h, *L.k_proj, k);
    b.Linear(h, *L.v_proj, v);
    b.Rope(q, k, D, c.rope);
    b.Attention(static_cast<int>(l), q, k, v, c.num_heads, c.num_kv_heads, D, scale, attn);
    b.Linear(attn, *L.o_proj, delta);
    b.AddRmsNorm(residual, delta, L.post_norm, eps, h);
    b.Linear(h, *L.gate_proj, gate);
    b.Linear(h, *L.up_proj, up);
    b.SiluMul(gate, up, gate);
    b.Linear(gate, *L.down_proj, delta);
  }
  b.Add(residual, delta);

  // Final norm and lm_head only on the rows whose logits are wanted.
  const int64_t R = static_cast<int64_t>(logit_rows.size());
  logits->resize(R * c.vocab_size);
  if (R == 0) return absl::OkStatus();
  Tensor picked = b.Allocate(R, H);
  b.GatherRows(residual, logit_rows, picked);
  Tensor normed = b.Allocate(R, H);
  b.RmsNorm(picked, final_norm_, eps, normed);
  Tensor out = b.Allocate(R, c.vocab_size);
  b.Linear(normed, *lm_head_, out);
  return b.CopyToHost(out, logits->data());
}

}  // namespace qshard
