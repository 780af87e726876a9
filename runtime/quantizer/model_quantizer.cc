#include "runtime/quantizer/model_quantizer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kv/memory_planner.h"
#include "nlohmann/json.hpp"
#include "quant/awq.h"
#include "quant/gptq.h"
#include "quant/quant_config.h"
#include "quant/quantize_weights.h"
#include "runtime/backend/backend.h"
#include "runtime/base/half.h"
#include "runtime/base/log.h"
#include "runtime/base/mapped_file.h"
#include "runtime/base/status_macros.h"
#include "runtime/checkpoint/safetensors.h"
#include "runtime/engine/perplexity.h"
#include "runtime/model/llama_model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace qshard {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

enum class Method { kRtn, kGptq, kAwq, kFp8, kInt8 };

// The seven decoder linears of a layer, with the slot whose activations feed them.
struct ProjSpec {
  const char* module;  // under model.layers.N.
  const char* proj;    // LlamaModel::ReplaceLinear name
  LinearSlot slot;
};
constexpr ProjSpec kProjs[] = {
    {"self_attn.q_proj", "q_proj", LinearSlot::kQkv},
    {"self_attn.k_proj", "k_proj", LinearSlot::kQkv},
    {"self_attn.v_proj", "v_proj", LinearSlot::kQkv},
    {"self_attn.o_proj", "o_proj", LinearSlot::kO},
    {"mlp.gate_proj", "gate_proj", LinearSlot::kGateUp},
    {"mlp.up_proj", "up_proj", LinearSlot::kGateUp},
    {"mlp.down_proj", "down_proj", LinearSlot::kDown},
};
constexpr int kNumSlots = 4;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

absl::Status WriteTextFile(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  f.close();
  if (!f) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

// The quantization_config object the written checkpoint carries.
nlohmann::json QuantizationConfigJson(Method m, const QuantizeOptions& o, bool sym) {
  switch (m) {
    case Method::kRtn:
    case Method::kGptq:
      return {{"quant_method", "gptq"},
              {"bits", o.bits},
              {"group_size", o.group_size},
              {"desc_act", m == Method::kGptq && o.desc_act},
              {"sym", sym},
              {"checkpoint_format", sym ? "gptq" : "gptq_v2"},
              {"damp_percent", o.damp_percent},
              {"true_sequential", false},
              {"static_groups", false},
              {"pack_dtype", "int32"},
              {"quantizer", m == Method::kRtn ? "qshard rtn" : "qshard gptq"}};
    case Method::kAwq:
      return {{"quant_method", "awq"},
              {"bits", o.bits},
              {"group_size", o.group_size},
              {"zero_point", !sym},
              {"version", "gemm"},
              {"modules_to_not_convert", nullptr}};
    case Method::kFp8:
    case Method::kInt8: {
      const char* type = m == Method::kFp8 ? "float" : "int";
      nlohmann::json group = {
          {"targets", {"Linear"}},
          {"weights",
           {{"num_bits", 8}, {"type", type}, {"symmetric", true}, {"strategy", "channel"},
            {"dynamic", false}, {"observer", "minmax"}}},
          {"input_activations",
           {{"num_bits", 8}, {"type", type}, {"symmetric", true}, {"strategy", "token"},
            {"dynamic", true}, {"observer", nullptr}}}};
      return {{"quant_method", "compressed-tensors"},
              {"format", m == Method::kFp8 ? "float-quantized" : "int-quantized"},
              {"quantization_status", "compressed"},
              {"config_groups", {{"group_0", group}}},
              {"ignore", {"lm_head"}}};
    }
  }
  return {};
}

// Host bf16 copy of fp32 values (the folded AWQ norms are stored in the model's dtype, and
// the running model uses exactly the rounded values so its perplexity matches a reload).
Tensor RoundedNorm(const std::vector<float>& v, DType dtype) {
  Tensor t = Tensor::Empty(dtype, {static_cast<int64_t>(v.size())});
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::kBF16) {
      t.data<uint16_t>()[i] = F32ToBf16(v[i]);
    } else if (dtype == DType::kF16) {
      t.data<uint16_t>()[i] = F32ToF16(v[i]);
    } else {
      t.data<float>()[i] = v[i];
    }
  }
  return t;
}

// Activation samples of one slot for AWQ: [rows, K], at most `cap` rows, taken from every
// calibration batch (a deterministic stride so all sequences contribute).
struct ActivationSamples {
  int64_t k = 0;
  int64_t cap = 0;
  int64_t stride = 1;
  std::vector<float> rows;
  int64_t num_rows() const { return k == 0 ? 0 : static_cast<int64_t>(rows.size()) / k; }
  void Add(const float* x, int64_t t) {
    for (int64_t r = 0; r < t && num_rows() < cap; r += stride) {
      rows.insert(rows.end(), x + r * k, x + (r + 1) * k);
    }
  }
};

class Quantizer {
 public:
  Quantizer(const QuantizeOptions& o, Method m, bool sym) : o_(o), method_(m), sym_(sym) {}

  absl::StatusOr<QuantizeReport> Run();

 private:
  void Progress(const std::string& line) {
    if (o_.progress) o_.progress(line);
  }
  absl::Status LoadCalibration();
  // One calibration pass that stops after `layer`, feeding its linear inputs to `observe`.
  absl::Status CalibrationPass(int layer,
                               const std::function<void(LinearSlot, const Tensor&)>& observe);
  // W [N, K] fp32 of a decoder linear as in the checkpoint.
  absl::StatusOr<std::vector<float>> DenseWeight(const std::string& name, int64_t n, int64_t k);
  // Records the packed layer, prepares it on the backend and swaps it into the model.
  absl::Status Install(int layer, const ProjSpec& p, LinearWeights packed);
  absl::Status QuantizeLayerRtnLike(int layer);
  absl::Status QuantizeLayerGptq(int layer);
  absl::Status QuantizeLayerAwq(int layer);
  absl::Status Write(const fs::path& dir);

  const QuantizeOptions& o_;
  const Method method_;
  const bool sym_;
  ModelConfig config_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::vector<std::vector<int32_t>> calib_;  // calibration sequences
  int64_t calib_tokens_ = 0;
  // Tensors that replace checkpoint tensors in the output: packed linears (by module
  // prefix) and folded norms (by full tensor name).
  std::map<std::string, LinearWeights> packed_;
  std::map<std::string, Tensor> replaced_;
  double quality_ = 0;
  int64_t quality_terms_ = 0;
};

absl::StatusOr<std::vector<float>> Quantizer::DenseWeight(const std::string& name, int64_t n,
                                                          int64_t k) {
  QSHARD_ASSIGN_OR_RETURN(Tensor t, ckpt_->Get(name));
  if (t.shape() != Shape{n, k}) {
    return absl::InvalidArgumentError(absl::StrCat("checkpoint ", o_.model_dir, ": tensor '",
                                                   name, "' has shape ", ShapeToString(t.shape()),
                                                   ", expected [", n, ", ", k, "]"));
  }
  std::vector<float> w = ToFloatVector(t);
  if (w.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint ", o_.model_dir, ": tensor '", name, "' has dtype ",
                     std::string(DTypeName(t.dtype())),
                     ", expected bfloat16, float16 or float32 (quantize a 16-bit checkpoint)"));
  }
  return w;
}

absl::Status Quantizer::LoadCalibration() {
  QSHARD_ASSIGN_OR_RETURN(std::string text, ReadTextFile(o_.calib_file));
  std::vector<int32_t> stream = PerplexityTokenStream(*tokenizer_, text);
  const int64_t len = std::min<int64_t>(o_.calib_seq_len, config_.max_position_embeddings);
  const int64_t usable = std::min<int64_t>(stream.size(), o_.calib_tokens);
  // Full-length sequences; a shorter tail is kept when it is the only data there is.
  for (int64_t s = 0; s < usable; s += len) {
    const int64_t e = std::min(usable, s + len);
    if (e - s < 16 && !calib_.empty()) break;
    calib_.emplace_back(stream.begin() + s, stream.begin() + e);
    calib_tokens_ += e - s;
  }
  if (calib_tokens_ < 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calib ", o_.calib_file, ": only ", calib_tokens_,
                     " tokens of calibration text; expected at least 256"));
  }
  Progress(absl::StrFormat("calibration: %d tokens in %d sequences of up to %d from %s",
                           calib_tokens_, calib_.size(), len, o_.calib_file));
  // One sequence per step; the cache holds the longest.
  KvCacheSpec spec = KvCacheSpecFor(config_, DType::kF32, 16);
  spec.num_blocks = (len + spec.block_size - 1) / spec.block_size;
  return model_->AllocateKvCache(spec);
}

absl::Status Quantizer::CalibrationPass(
    int layer, const std::function<void(LinearSlot, const Tensor&)>& observe) {
  CalibrationHooks hooks;
  hooks.stop_after_layer = layer;
  hooks.on_linear_input = [&](int l, LinearSlot slot, const Tensor& x) {
    if (l == layer) observe(slot, x);
  };
  model_->SetCalibrationHooks(hooks);
  const int64_t bs = model_->kv_cache_spec().block_size;
  std::vector<float> no_logits;
  absl::Status status;
  for (const auto& seq : calib_) {
    std::vector<int32_t> blocks((seq.size() + bs - 1) / bs);
    for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = static_cast<int32_t>(i);
    SequenceChunk chunk{seq, 0, blocks, LogitsMode::kNone};
    status = model_->Forward({&chunk, 1}, &no_logits);
    if (!status.ok()) break;
  }
  model_->SetCalibrationHooks(CalibrationHooks());
  return status;
}

absl::Status Quantizer::Install(int layer, const ProjSpec& p, LinearWeights packed) {
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<LinearOp> op, backend_->PrepareLinear(packed));
  QSHARD_RETURN_IF_ERROR(model_->ReplaceLinear(layer, p.proj, std::move(op)));
  packed_[packed.name] = std::move(packed);
  return absl::OkStatus();
}

// rtn, fp8, int8: no calibration, every linear on its own.
absl::Status Quantizer::QuantizeLayerRtnLike(int layer) {
  for (const ProjSpec& p : kProjs) {
    const std::string name = absl::StrCat("model.layers.", layer, ".", p.module);
    const Shape shape = ckpt_->Find(name + ".weight") != nullptr
                            ? ckpt_->Find(name + ".weight")->shape
                            : Shape{};
    if (shape.size() != 2) {
      return absl::NotFoundError(absl::StrCat("checkpoint ", o_.model_dir, ": missing 2-D tensor '",
                                              name, ".weight'"));
    }
    QSHARD_ASSIGN_OR_RETURN(std::vector<float> w, DenseWeight(name + ".weight", shape[0], shape[1]));
    LinearWeights packed;
    if (method_ == Method::kFp8) {
      packed = QuantizeFp8PerChannel(w.data(), shape[0], shape[1], name, /*dynamic_act=*/true);
    } else if (method_ == Method::kInt8) {
      packed = QuantizeInt8PerChannel(w.data(), shape[0], shape[1], name, /*dynamic_act=*/true);
    } else {
      IntQuantParams qp{o_.bits, o_.group_size, sym_};
      IntQuantMatrix m = QuantizeRtn(w.data(), shape[0], shape[1], qp);
      QSHARD_ASSIGN_OR_RETURN(packed, PackGptq(m, name, sym_, /*v1=*/sym_));
    }
    QSHARD_RETURN_IF_ERROR(Install(layer, p, std::move(packed)));
  }
  return absl::OkStatus();
}

absl::Status Quantizer::QuantizeLayerGptq(int layer) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, A = c.num_heads * c.head_dim;
  const int64_t slot_k[kNumSlots] = {H, A, H, I};
  std::vector<std::unique_ptr<HessianAccumulator>> hs;
  for (int s = 0; s < kNumSlots; ++s) hs.push_back(std::make_unique<HessianAccumulator>(slot_k[s]));
  QSHARD_RETURN_IF_ERROR(CalibrationPass(layer, [&](LinearSlot slot, const Tensor& x) {
    hs[static_cast<int>(slot)]->Add(x.data<float>(), x.dim(0));
  }));
  GptqOptions go;
  go.bits = o_.bits;
  go.group_size = o_.group_size;
  go.sym = sym_;
  go.desc_act = o_.desc_act;
  go.damp_percent = o_.damp_percent;
  const bool fp8 = method_ == Method::kFp8;  // GPTQ on the e4m3 grid, per-channel scales
  if (fp8) {
    go.grid = GptqGrid::kFp8E4M3;
    go.bits = 8;
    go.group_size = -1;
    go.desc_act = false;
  }
  for (const ProjSpec& p : kProjs) {
    const std::string name = absl::StrCat("model.layers.", layer, ".", p.module);
    const HessianAccumulator& h = *hs[static_cast<int>(p.slot)];
    const TensorInfo* info = ckpt_->Find(name + ".weight");
    if (info == nullptr || info->shape.size() != 2 || info->shape[1] != h.k()) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint ", o_.model_dir, ": tensor '",
                                                     name, ".weight' missing or not [N, ", h.k(),
                                                     "]"));
    }
    const int64_t n = info->shape[0], k = info->shape[1];
    QSHARD_ASSIGN_OR_RETURN(std::vector<float> w, DenseWeight(name + ".weight", n, k));
    go.name = name;
    auto r = GptqQuantize(w.data(), n, k, h, go);
    if (!r.ok()) return r.status();
    if (!r->warning.empty()) {
      QSHARD_LOG(WARNING) << r->warning;
    }
    quality_ += r->loss;
    ++quality_terms_;
    LinearWeights packed;
    if (fp8) {
      QSHARD_ASSIGN_OR_RETURN(packed, PackFp8PerChannel(r->q, name, /*dynamic_act=*/true));
    } else {
      QSHARD_ASSIGN_OR_RETURN(packed, PackGptq(r->q, name, sym_, /*v1=*/sym_));
    }
    QSHARD_RETURN_IF_ERROR(Install(layer, p, std::move(packed)));
  }
  return absl::OkStatus();
}

absl::Status Quantizer::QuantizeLayerAwq(int layer) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, A = c.num_heads * c.head_dim;
  const int64_t slot_k[kNumSlots] = {H, A, H, I};
  ActivationSamples xs[kNumSlots];
  // Spread the samples over all calibration sequences.
  const int64_t stride = std::max<int64_t>(1, calib_tokens_ / std::max<int64_t>(1, o_.awq_max_tokens));
  for (int s = 0; s < kNumSlots; ++s) {
    xs[s].k = slot_k[s];
    xs[s].cap = o_.awq_max_tokens;
    xs[s].stride = stride;
  }
  QSHARD_RETURN_IF_ERROR(CalibrationPass(layer, [&](LinearSlot slot, const Tensor& x) {
    xs[static_cast<int>(slot)].Add(x.data<float>(), x.dim(0));
  }));

  // fp32 weights of the layer: [N, K] each.
  std::map<std::string, std::vector<float>> w;
  std::map<std::string, int64_t> rows;
  for (const ProjSpec& p : kProjs) {
    const std::string name = absl::StrCat("model.layers.", layer, ".", p.module);
    const TensorInfo* info = ckpt_->Find(name + ".weight");
    if (info == nullptr || info->shape.size() != 2 ||
        info->shape[1] != slot_k[static_cast<int>(p.slot)]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint ", o_.model_dir, ": tensor '", name, ".weight' missing or not [N, ",
          slot_k[static_cast<int>(p.slot)], "]"));
    }
    QSHARD_ASSIGN_OR_RETURN(w[p.proj], DenseWeight(name + ".weight", info->shape[0], info->shape[1]));
    rows[p.proj] = info->shape[0];
  }
  const std::string pre = absl::StrCat("model.layers.", layer, ".");
  QSHARD_ASSIGN_OR_RETURN(Tensor in_norm_t, ckpt_->Get(pre + "input_layernorm.weight"));
  QSHARD_ASSIGN_OR_RETURN(Tensor post_norm_t, ckpt_->Get(pre + "post_attention_layernorm.weight"));
  std::vector<float> in_norm = ToFloatVector(in_norm_t), post_norm = ToFloatVector(post_norm_t);
  if (static_cast<int64_t>(in_norm.size()) != H || static_cast<int64_t>(post_norm.size()) != H) {
    return absl::InvalidArgumentError(absl::StrCat(pre, "*_layernorm.weight: expected [", H,
                                                   "] float tensors"));
  }

  AwqOptions ao;
  ao.bits = o_.bits;
  ao.group_size = o_.group_size;
  ao.zero_point = !sym_;
  auto search = [&](std::vector<const char*> projs, int slot) {
    std::vector<const float*> ws;
    std::vector<int64_t> ns;
    for (const char* p : projs) {
      ws.push_back(w[p].data());
      ns.push_back(rows[p]);
    }
    AwqScaleResult r = AwqSearchScales(ws, ns, slot_k[slot], xs[slot].rows.data(),
                                       xs[slot].num_rows(), ao);
    if (r.loss_unscaled > 0) {
      quality_ += 1.0 - r.loss / r.loss_unscaled;
      ++quality_terms_;
    }
    return r;
  };
  // Scales are searched on the unmodified layer (all four inputs as observed), then folded.
  const AwqScaleResult s_qkv = search({"q_proj", "k_proj", "v_proj"}, 0);
  // v_proj -> o_proj folding needs one attention output channel per v_proj row (no GQA).
  const bool fold_vo = c.num_heads == c.num_kv_heads;
  AwqScaleResult s_o;
  if (fold_vo) s_o = search({"o_proj"}, 1);
  const AwqScaleResult s_gu = search({"gate_proj", "up_proj"}, 2);
  const AwqScaleResult s_down = search({"down_proj"}, 3);

  // x' = x / s feeds W' = W diag(s): the product is unchanged in exact arithmetic.
  auto scale_cols = [&](const char* p, const std::vector<float>& s) {
    const int64_t k = static_cast<int64_t>(s.size());
    std::vector<float>& m = w[p];
    for (int64_t n = 0; n < rows[p]; ++n) {
      for (int64_t j = 0; j < k; ++j) m[n * k + j] *= s[j];
    }
  };
  auto scale_samples = [&](int slot, const std::vector<float>& s) {
    const int64_t k = slot_k[slot];
    for (int64_t r = 0; r < xs[slot].num_rows(); ++r) {
      for (int64_t j = 0; j < k; ++j) xs[slot].rows[r * k + j] /= s[j];
    }
  };
  // The producer of the input divides by s: a norm weight, or the rows of a linear.
  for (int64_t j = 0; j < H; ++j) in_norm[j] /= s_qkv.scales[j];
  for (int64_t j = 0; j < H; ++j) post_norm[j] /= s_gu.scales[j];
  const DType norm_dtype = in_norm_t.dtype();
  Tensor in_norm_q = RoundedNorm(in_norm, norm_dtype), post_norm_q = RoundedNorm(post_norm, norm_dtype);
  // The model runs with the rounded norms: s_eff = original norm / rounded norm is the
  // scale actually applied to the inputs.
  const std::vector<float> in_eff = ToFloatVector(in_norm_q), post_eff = ToFloatVector(post_norm_q);
  std::vector<float> s_qkv_eff(H), s_gu_eff(H);
  for (int64_t j = 0; j < H; ++j) {
    const float orig_in = in_norm[j] * s_qkv.scales[j];
    const float orig_post = post_norm[j] * s_gu.scales[j];
    s_qkv_eff[j] = in_eff[j] != 0.0f ? orig_in / in_eff[j] : s_qkv.scales[j];
    s_gu_eff[j] = post_eff[j] != 0.0f ? orig_post / post_eff[j] : s_gu.scales[j];
  }
  // Scaling the columns by the effective s keeps (W s)(x / s) == W x exactly.
  for (const char* p : {"q_proj", "k_proj", "v_proj"}) scale_cols(p, s_qkv_eff);
  scale_samples(0, s_qkv_eff);
  for (const char* p : {"gate_proj", "up_proj"}) scale_cols(p, s_gu_eff);
  scale_samples(2, s_gu_eff);
  if (fold_vo) {
    for (int64_t n = 0; n < rows["v_proj"]; ++n) {
      for (int64_t j = 0; j < H; ++j) w["v_proj"][n * H + j] /= s_o.scales[n];
    }
    scale_cols("o_proj", s_o.scales);
    scale_samples(1, s_o.scales);
  }
  for (int64_t n = 0; n < I; ++n) {
    for (int64_t j = 0; j < H; ++j) w["up_proj"][n * H + j] /= s_down.scales[n];
  }
  scale_cols("down_proj", s_down.scales);
  scale_samples(3, s_down.scales);

  // Clipping search (not for q / k, whose errors are squashed by the softmax), then
  // round-to-nearest with the zero-point quantizer.
  IntQuantParams qp{o_.bits, o_.group_size, sym_};
  for (const ProjSpec& p : kProjs) {
    const std::string name = pre + p.module;
    const int slot = static_cast<int>(p.slot);
    const std::vector<float>& m = w[p.proj];
    std::vector<float> clip;
    const bool qk = std::string(p.proj) == "q_proj" || std::string(p.proj) == "k_proj";
    if (!qk) {
      clip = AwqSearchClip(m.data(), rows[p.proj], slot_k[slot], xs[slot].rows.data(),
                           xs[slot].num_rows(), ao);
    }
    IntQuantMatrix q = QuantizeRtn(m.data(), rows[p.proj], slot_k[slot], qp,
                                   clip.empty() ? nullptr : clip.data());
    QSHARD_ASSIGN_OR_RETURN(LinearWeights packed, PackAwq(q, name));
    QSHARD_RETURN_IF_ERROR(Install(layer, p, std::move(packed)));
  }
  QSHARD_RETURN_IF_ERROR(model_->ReplaceNorms(layer, in_norm_q, post_norm_q));
  replaced_[pre + "input_layernorm.weight"] = in_norm_q;
  replaced_[pre + "post_attention_layernorm.weight"] = post_norm_q;
  return absl::OkStatus();
}

absl::Status Quantizer::Write(const fs::path& dir) {
  // Tensors: the checkpoint's own, with every quantized linear's .weight replaced by its
  // packed tensors and folded norms by their new values.
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::set<std::string> packed_weights;
  for (const auto& [prefix, lw] : packed_) {
    packed_weights.insert(prefix + ".weight");
    for (auto& [name, t] : CheckpointTensors(lw)) tensors.emplace_back(name, t);  // full names
  }
  for (const std::string& name : ckpt_->Names()) {
    if (packed_weights.count(name)) continue;
    if (absl::EndsWith(name, ".rotary_emb.inv_freq")) continue;
    auto it = replaced_.find(name);
    if (it != replaced_.end()) {
      tensors.emplace_back(name, it->second);
      continue;
    }
    QSHARD_ASSIGN_OR_RETURN(Tensor t, ckpt_->Get(name));
    tensors.emplace_back(name, t);
  }
  QSHARD_RETURN_IF_ERROR(WriteSafetensors((dir / "model.safetensors").string(), tensors,
                                          {{"format", "pt"}}));

  // config.json: the original with quantization_config added.
  QSHARD_ASSIGN_OR_RETURN(std::string cfg_text,
                          ReadTextFile((fs::path(o_.model_dir) / "config.json").string()));
  nlohmann::json cfg = nlohmann::json::parse(cfg_text, nullptr, /*allow_exceptions=*/false);
  if (!cfg.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(o_.model_dir, "/config.json: invalid JSON"));
  }
  cfg["quantization_config"] = QuantizationConfigJson(method_, o_, sym_);
  QSHARD_RETURN_IF_ERROR(WriteTextFile(dir / "config.json", cfg.dump(2) + "\n"));

  // Tokenizer and generation settings as they are.
  std::error_code ec;
  for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "added_tokens.json",
                        "generation_config.json"}) {
    const fs::path src = fs::path(o_.model_dir) / f;
    if (!fs::exists(src)) continue;
    fs::copy_file(src, dir / f, fs::copy_options::overwrite_existing, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot copy ", src.string(), ": ", ec.message()));
    // Sources may be read-only (a shared fixture); the copy belongs to the user.
    fs::permissions(dir / f, fs::perms::owner_write, fs::perm_options::add, ec);
  }
  return absl::OkStatus();
}

absl::StatusOr<QuantizeReport> Quantizer::Run() {
  const auto t0 = Clock::now();
  QSHARD_ASSIGN_OR_RETURN(config_, LoadModelConfig(o_.model_dir));
  QSHARD_ASSIGN_OR_RETURN(QuantizationConfig held,
                          LoadQuantizationConfig(o_.model_dir, config_.quantization_config_json));
  if (held.quantized()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--model ", o_.model_dir, " is already quantized (", held.Describe(),
        "); qshard quantize needs a bf16 / fp16 / fp32 checkpoint"));
  }
  QSHARD_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open(o_.model_dir));
  ckpt_ = std::make_unique<Checkpoint>(std::move(ckpt));
  QSHARD_ASSIGN_OR_RETURN(backend_, CreateBackend("cpu"));
  // Layers are quantized one Linear at a time (ReplaceLinear of q_proj, k_proj, ...): keep
  // q/k/v and gate/up as separate Linears.
  ModelLoadOptions load;
  load.fuse_projections = false;
  QSHARD_ASSIGN_OR_RETURN(model_, LlamaModel::Load(o_.model_dir, config_, backend_.get(), load));
  QSHARD_ASSIGN_OR_RETURN(tokenizer_, LoadTokenizer(o_.model_dir));
  // fp8 with calibration text: GPTQ's error feedback on the e4m3 grid; without, RTN (the
  // same codes as --quantization fp8 at load).
  const bool fp8_gptq = method_ == Method::kFp8 && !o_.calib_file.empty();
  const bool calibrated = method_ == Method::kGptq || method_ == Method::kAwq || fp8_gptq;
  if (calibrated) QSHARD_RETURN_IF_ERROR(LoadCalibration());

  const int layers = static_cast<int>(config_.num_layers);
  const auto tq = Clock::now();
  for (int l = 0; l < layers; ++l) {
    switch (method_) {
      case Method::kGptq:
        QSHARD_RETURN_IF_ERROR(QuantizeLayerGptq(l));
        break;
      case Method::kFp8:
        QSHARD_RETURN_IF_ERROR(fp8_gptq ? QuantizeLayerGptq(l) : QuantizeLayerRtnLike(l));
        break;
      case Method::kAwq:
        QSHARD_RETURN_IF_ERROR(QuantizeLayerAwq(l));
        break;
      default:
        QSHARD_RETURN_IF_ERROR(QuantizeLayerRtnLike(l));
    }
    const double el = Seconds(tq);
    Progress(absl::StrFormat("layer %d of %d quantized (%s)  elapsed %.1f s  ETA %.1f s", l + 1,
                             layers, o_.method, el, el / (l + 1) * (layers - l - 1)));
  }

  // Write into a temporary sibling and rename, so a failure never leaves a half checkpoint.
  const fs::path out = fs::path(o_.out_dir).lexically_normal();
  const fs::path tmp = out.parent_path() / (out.filename().string() + ".tmp-qshard");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", tmp.string(), ": ", ec.message()));
  absl::Status written = Write(tmp);
  if (written.ok()) {
    fs::remove(out, ec);  // an empty directory (checked up front)
    fs::rename(tmp, out, ec);
    if (ec) written = absl::InternalError(absl::StrCat("cannot rename ", tmp.string(), " to ",
                                                       out.string(), ": ", ec.message()));
  }
  if (!written.ok()) {
    fs::remove_all(tmp, ec);
    return written;
  }

  QuantizeReport report;
  QSHARD_ASSIGN_OR_RETURN(
      QuantizationConfig qc,
      ParseQuantizationConfig(QuantizationConfigJson(method_, o_, sym_).dump(), "written"));
  report.method_description = qc.Describe();
  report.calib_tokens = calib_tokens_;
  report.bytes_written = static_cast<int64_t>(fs::file_size(out / "model.safetensors", ec));
  report.linears_quantized = static_cast<int64_t>(packed_.size());
  report.quality_metric = method_ == Method::kAwq && quality_terms_ > 0
                              ? quality_ / quality_terms_
                              : quality_;
  Progress(absl::StrFormat("wrote %s (%s, %.2f MiB) in %.1f s", out.string(),
                           report.method_description, report.bytes_written / 1048576.0,
                           Seconds(t0)));

  if (!o_.eval_text_file.empty()) {
    QSHARD_ASSIGN_OR_RETURN(std::string text, ReadTextFile(o_.eval_text_file));
    PerplexityOptions po;
    KvCacheSpec spec = KvCacheSpecFor(config_, DType::kF32, po.block_size);
    spec.num_blocks = po.windows_per_step * ((po.window + po.block_size - 1) / po.block_size);
    QSHARD_RETURN_IF_ERROR(model_->AllocateKvCache(spec));
    QSHARD_ASSIGN_OR_RETURN(PerplexityResult r,
                            EvaluatePerplexity(*model_, *tokenizer_, text, po));
    report.perplexity = r.perplexity;
  }
  report.seconds = Seconds(t0);
  return report;
}

}  // namespace

absl::StatusOr<QuantizeReport> QuantizeModel(const QuantizeOptions& o) {
  Method m;
  if (o.method == "rtn") {
    m = Method::kRtn;
  } else if (o.method == "gptq") {
    m = Method::kGptq;
  } else if (o.method == "awq") {
    m = Method::kAwq;
  } else if (o.method == "fp8") {
    m = Method::kFp8;
  } else if (o.method == "int8") {
    m = Method::kInt8;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "--method: unknown value '", o.method, "'; expected rtn, gptq, awq, fp8 or int8"));
  }
  const bool integer = m == Method::kRtn || m == Method::kGptq || m == Method::kAwq;
  const bool sym = o.sym.value_or(m != Method::kAwq);
  if (integer) {
    if (m == Method::kAwq && o.bits != 4) {
      return absl::InvalidArgumentError(
          absl::StrCat("--bits ", o.bits, ": the AutoAWQ GEMM layout holds 4-bit weights only"));
    }
    if (o.bits != 4 && o.bits != 8) {
      return absl::InvalidArgumentError(absl::StrCat("--bits ", o.bits, ": expected 4 or 8"));
    }
    if (o.group_size != -1 && o.group_size != 32 && o.group_size != 64 && o.group_size != 128) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--group-size ", o.group_size, ": expected -1 (per channel), 32, 64 or 128"));
    }
    if (m == Method::kAwq && o.group_size == -1) {
      return absl::InvalidArgumentError("--group-size -1: AWQ needs groups (64 or 128)");
    }
  } else if (o.sym.has_value() && !*o.sym) {
    return absl::InvalidArgumentError(
        absl::StrCat("--asym: ", o.method, " weights are symmetric per channel"));
  }
  if (o.desc_act && m != Method::kGptq) {
    return absl::InvalidArgumentError("--desc-act applies to --method gptq only");
  }
  if ((m == Method::kGptq || m == Method::kAwq) && o.calib_file.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--method ", o.method, " needs --calib FILE (calibration text, one passage per line)"));
  }
  if (o.calib_tokens < 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calib-tokens ", o.calib_tokens, ": expected at least 256"));
  }
  if (o.calib_seq_len < 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calib-seq-len ", o.calib_seq_len, ": expected at least 16"));
  }
  if (!(o.damp_percent > 0.0 && o.damp_percent < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--damp-percent ", o.damp_percent, ": expected a value in (0, 1)"));
  }
  if (o.out_dir.empty()) return absl::InvalidArgumentError("--out: required");
  std::error_code ec;
  if (fs::exists(o.out_dir, ec) &&
      (!fs::is_directory(o.out_dir, ec) || !fs::is_empty(o.out_dir, ec))) {
    return absl::AlreadyExistsError(absl::StrCat(
        "--out ", o.out_dir, " exists and is not an empty directory (refusing to overwrite)"));
  }
  if (fs::exists(o.model_dir, ec) && fs::exists(o.out_dir, ec) &&
      fs::equivalent(o.model_dir, o.out_dir, ec)) {
    return absl::InvalidArgumentError("--out must differ from --model");
  }
  Quantizer q(o, m, sym);
  return q.Run();
}

}  // namespace qshard
