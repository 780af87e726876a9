#include "runtime/model/llama_model.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "quant/concat_weights.h"
#include "quant/quantize_weights.h"
#include "runtime/base/half.h"
#include "runtime/base/log.h"
#include "runtime/base/mapped_file.h"
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

  // A tensor of any dtype and shape (quantized formats: the format reader checks both and
  // names the tensor in its errors).
  absl::StatusOr<Tensor> TakeRaw(const std::string& name) {
    if (ckpt_.Find(name) == nullptr) {
      return absl::NotFoundError(
          absl::StrCat("checkpoint ", ckpt_.dir(), ": missing tensor '", name, "'"));
    }
    used_.insert(name);
    return ckpt_.Get(name);
  }
  // Empty when absent.
  absl::StatusOr<Tensor> TakeOptional(const std::string& name) {
    if (ckpt_.Find(name) == nullptr) return Tensor();
    return TakeRaw(name);
  }
  bool Has(const std::string& name) const { return ckpt_.Find(name) != nullptr; }
  const TensorInfo* Find(const std::string& name) const { return ckpt_.Find(name); }

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

// Value of a one-element float tensor in host memory.
void ScalarAsFloat(const Tensor& t, float* out) {
  switch (t.dtype()) {
    case DType::kBF16:
      *out = Bf16ToF32(*t.data<uint16_t>());
      break;
    case DType::kF16:
      *out = F16ToF32(*t.data<uint16_t>());
      break;
    default:
      *out = *t.data<float>();
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                             Backend* backend) {
  QSHARD_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  return Load(dir, config, backend);
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                             const ModelConfig& config,
                                                             Backend* backend) {
  return Load(dir, config, backend, ModelLoadOptions());
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                             const ModelConfig& config,
                                                             Backend* backend,
                                                             const ModelLoadOptions& options) {
  QSHARD_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open(dir));
  std::unique_ptr<LlamaModel> model(new LlamaModel(config, backend));
  QSHARD_ASSIGN_OR_RETURN(model->quant_,
                          LoadQuantizationConfig(dir, config.quantization_config_json));
  QSHARD_RETURN_IF_ERROR(model->LoadWeights(ckpt, options));
  return model;
}

absl::Status LlamaModel::LoadWeights(const Checkpoint& ckpt, const ModelLoadOptions& options) {
  const ModelConfig& c = config_;
  const QuantizationConfig& qc = quant_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t q_out = c.num_heads * D, kv_out = c.num_kv_heads * D;
  TensorBinder bind(ckpt);
  const bool online = options.online_quantization != QuantMethod::kNone;
  if (online) {
    if (options.online_quantization != QuantMethod::kFp8 &&
        options.online_quantization != QuantMethod::kInt8) {
      return absl::InvalidArgumentError(
          absl::StrCat("online quantization supports fp8 and int8, not ",
                       std::string(QuantMethodName(options.online_quantization))));
    }
    if (qc.quantized()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--quantization ", std::string(QuantMethodName(options.online_quantization)),
          " quantizes 16-bit checkpoints at load, but this one already holds ", qc.Describe()));
    }
  }
  summary_.quantization = qc.Describe();

  // format: the bytes_per_format key ("" = "dense <dtype>"); count_params: false for
  // packed tensors, whose element count is not the parameter count.
  auto account_as = [&](const Tensor& t, const std::string& format, bool count_params) {
    if (t.empty()) return;
    if (count_params) summary_.num_parameters += t.numel();
    const int64_t bytes = static_cast<int64_t>(t.nbytes());
    summary_.total_bytes += bytes;
    summary_.bytes_per_dtype[std::string(DTypeName(t.dtype()))] += bytes;
    summary_.bytes_per_format[format.empty() ? "dense " + std::string(DTypeName(t.dtype()))
                                             : format] += bytes;
  };
  auto account = [&](const Tensor& t) { account_as(t, "", true); };
  auto take_vector = [&](const std::string& name, int64_t n) -> absl::StatusOr<Tensor> {
    QSHARD_ASSIGN_OR_RETURN(Tensor t, bind.Take(name, {n}));
    account(t);
    return backend_->UploadWeight(t);
  };
  // Whether the checkpoint stores `prefix` quantized: an ignored module (ignore /
  // modules_to_not_convert) never is; an lm_head is when its quantized tensors are there
  // (most quantizers leave it dense); every other Linear must be.
  auto is_quantized = [&](const std::string& prefix, bool optional) {
    if (!qc.quantized() || qc.IsIgnored(prefix)) return false;
    if (!optional) return true;
    switch (qc.method) {
      case QuantMethod::kGptq:
      case QuantMethod::kAwq:
        return bind.Has(prefix + ".qweight");
      case QuantMethod::kCompressedTensors:
        if (qc.compressed_format == CompressedFormat::kPackQuantized) {
          return bind.Has(prefix + ".weight_packed");
        }
        [[fallthrough]];
      default: {
        const TensorInfo* info = bind.Find(prefix + ".weight");
        return info != nullptr && (info->dtype == DType::kF8E4M3 || info->dtype == DType::kI8);
      }
    }
  };
  // Fills the format's tensors of one quantized Linear.
  auto take_quantized = [&](LinearWeights& w) -> absl::Status {
    const std::string& p = w.name;
    w.bits = qc.bits;
    w.group_size = qc.group_size;
    w.has_zero_point = !qc.sym;
    std::string label;
    const bool w8a8 = !options.weight_only_activations;
    const bool packed = qc.method == QuantMethod::kCompressedTensors &&
                        qc.compressed_format == CompressedFormat::kPackQuantized;
    const bool int8 = qc.method == QuantMethod::kCompressedTensors &&
                      qc.compressed_format == CompressedFormat::kIntQuantized;
    if (qc.method == QuantMethod::kGptq) {
      w.format = WeightFormat::kGptq;
      w.gptq_zeros_minus_one = qc.checkpoint_format == GptqCheckpointFormat::kGptq;
      QSHARD_ASSIGN_OR_RETURN(w.qweight, bind.TakeRaw(p + ".qweight"));
      QSHARD_ASSIGN_OR_RETURN(w.qzeros, bind.TakeRaw(p + ".qzeros"));
      QSHARD_ASSIGN_OR_RETURN(w.scales, bind.TakeRaw(p + ".scales"));
      QSHARD_ASSIGN_OR_RETURN(w.g_idx, bind.TakeOptional(p + ".g_idx"));
      label = absl::StrCat("gptq-w", qc.bits);
    } else if (qc.method == QuantMethod::kAwq) {
      w.format = WeightFormat::kAwq;
      QSHARD_ASSIGN_OR_RETURN(w.qweight, bind.TakeRaw(p + ".qweight"));
      QSHARD_ASSIGN_OR_RETURN(w.qzeros, bind.TakeOptional(p + ".qzeros"));
      QSHARD_ASSIGN_OR_RETURN(w.scales, bind.TakeRaw(p + ".scales"));
      label = "awq-w4";
    } else if (packed) {
      w.format = WeightFormat::kPacked;
      if (qc.weight_strategy == WeightStrategy::kChannel) w.group_size = -1;
      QSHARD_ASSIGN_OR_RETURN(w.qweight, bind.TakeRaw(p + ".weight_packed"));
      QSHARD_ASSIGN_OR_RETURN(w.scales, bind.TakeRaw(p + ".weight_scale"));
      QSHARD_ASSIGN_OR_RETURN(w.qzeros, bind.TakeOptional(p + ".weight_zero_point"));
      QSHARD_ASSIGN_OR_RETURN(w.g_idx, bind.TakeOptional(p + ".weight_g_idx"));
      if (qc.sym) w.qzeros = Tensor();  // a symmetric zero point is implicit
      QSHARD_ASSIGN_OR_RETURN(Tensor shape, bind.TakeOptional(p + ".weight_shape"));
      if (!shape.empty()) {
        bool ok = shape.numel() == 2;
        if (ok && shape.dtype() == DType::kI64) {
          ok = shape.data<int64_t>()[0] == w.out_features &&
               shape.data<int64_t>()[1] == w.in_features;
        } else if (ok && shape.dtype() == DType::kI32) {
          ok = shape.data<int32_t>()[0] == w.out_features &&
               shape.data<int32_t>()[1] == w.in_features;
        } else {
          ok = false;
        }
        if (!ok) {
          return absl::InvalidArgumentError(absl::StrCat(
              p, ".weight_shape: expected [", w.out_features, ", ", w.in_features, "] as int64"));
        }
      }
      label = absl::StrCat("packed-w", qc.bits);
    } else if (int8) {
      w.format = WeightFormat::kInt8;
      QSHARD_ASSIGN_OR_RETURN(w.weight, bind.TakeRaw(p + ".weight"));
      QSHARD_ASSIGN_OR_RETURN(w.weight_scale, bind.TakeRaw(p + ".weight_scale"));
      if (qc.activation == ActivationScheme::kDynamicPerToken && w8a8) {
        w.act_quant = ActQuant::kInt8PerToken;
      }
      label = "int8";
    } else if (qc.method == QuantMethod::kFp8 || qc.method == QuantMethod::kCompressedTensors) {
      w.format = WeightFormat::kFp8;
      QSHARD_ASSIGN_OR_RETURN(w.weight, bind.TakeRaw(p + ".weight"));
      if (qc.weight_strategy == WeightStrategy::kBlock) w.block_size = qc.weight_block_size;
      // vLLM block-wise checkpoints name the (multiplied) scale weight_scale_inv.
      const std::string scale_name = qc.method == QuantMethod::kFp8 &&
                                             !bind.Has(p + ".weight_scale")
                                         ? p + ".weight_scale_inv"
                                         : p + ".weight_scale";
      QSHARD_ASSIGN_OR_RETURN(w.weight_scale, bind.TakeRaw(scale_name));
      if (qc.activation == ActivationScheme::kStatic) {
        QSHARD_ASSIGN_OR_RETURN(w.input_scale, bind.TakeRaw(p + ".input_scale"));
      } else {
        QSHARD_ASSIGN_OR_RETURN(w.input_scale, bind.TakeOptional(p + ".input_scale"));
      }
      if (w8a8 && qc.activation == ActivationScheme::kDynamicPerToken) {
        w.act_quant = ActQuant::kFp8PerToken;
      } else if (w8a8 && qc.activation == ActivationScheme::kStatic) {
        w.act_quant = ActQuant::kFp8Static;
      } else if (w8a8 && qc.activation == ActivationScheme::kDynamicPerTokenGroup) {
        w.act_quant = ActQuant::kFp8PerTokenGroup;
        w.act_group_size = qc.group_size;
      }
      label = "fp8-e4m3";
    } else {
      return absl::UnimplementedError(absl::StrCat(p, ": quantization method ",
                                                   std::string(QuantMethodName(qc.method)),
                                                   " is not loadable from a checkpoint"));
    }
    for (const Tensor* t : {&w.weight, &w.qweight, &w.qzeros, &w.scales, &w.g_idx,
                            &w.weight_scale, &w.input_scale}) {
      account_as(*t, label, false);
    }
    summary_.num_parameters += w.in_features * w.out_features;
    return absl::OkStatus();
  };
  // The checkpoint tensors of one Linear (accounted in the summary), not yet prepared.
  auto take_linear_weights = [&](const std::string& prefix, int64_t out, int64_t in, bool has_bias,
                                 bool optional_quant) -> absl::StatusOr<LinearWeights> {
    LinearWeights w;
    w.name = prefix;
    w.in_features = in;
    w.out_features = out;
    if (is_quantized(prefix, optional_quant)) {
      QSHARD_RETURN_IF_ERROR(take_quantized(w));
    } else if (online && !optional_quant && !qc.IsIgnored(prefix)) {
      // --quantization fp8|int8 on a 16-bit checkpoint: per-channel weights now, dynamic
      // per-token activations at run time (the layout of a compressed-tensors checkpoint).
      QSHARD_ASSIGN_OR_RETURN(Tensor dense, bind.Take(prefix + ".weight", {out, in}));
      const std::vector<float> f = ToFloatVector(dense);
      const bool dynamic = !options.weight_only_activations;
      w = options.online_quantization == QuantMethod::kFp8
              ? QuantizeFp8PerChannel(f.data(), out, in, prefix, dynamic)
              : QuantizeInt8PerChannel(f.data(), out, in, prefix, dynamic);
      const std::string label = options.online_quantization == QuantMethod::kFp8
                                    ? "fp8-e4m3 (quantized at load)"
                                    : "int8 (quantized at load)";
      account_as(w.weight, label, false);
      account_as(w.weight_scale, label, false);
      summary_.num_parameters += out * in;
    } else {
      QSHARD_ASSIGN_OR_RETURN(w.weight, bind.Take(prefix + ".weight", {out, in}));
      account(w.weight);
    }
    if (has_bias) {
      QSHARD_ASSIGN_OR_RETURN(w.bias, bind.Take(prefix + ".bias", {out}));
      account(w.bias);
    }
    return w;
  };
  auto take_linear_impl = [&](const std::string& prefix, int64_t out, int64_t in, bool has_bias,
                              bool optional_quant) -> absl::StatusOr<std::unique_ptr<LinearOp>> {
    QSHARD_ASSIGN_OR_RETURN(LinearWeights w,
                            take_linear_weights(prefix, out, in, has_bias, optional_quant));
    return backend_->PrepareLinear(w);
  };
  auto take_linear = [&](const std::string& prefix, int64_t out, int64_t in,
                         bool has_bias) -> absl::StatusOr<std::unique_ptr<LinearOp>> {
    return take_linear_impl(prefix, out, in, has_bias, /*optional_quant=*/false);
  };
  // Linears sharing an input, fused when options.fuse_projections and the format allow.
  FusionStats qkv_stats, gate_up_stats;
  auto take_projections = [&](const std::string& prefix, const std::string& fused_name,
                              std::vector<std::pair<std::string, int64_t>> names_out, int64_t in,
                              bool has_bias, FusionStats* stats, std::unique_ptr<LinearOp>* fused,
                              std::vector<std::unique_ptr<LinearOp>*> separate) -> absl::Status {
    std::vector<LinearWeights> parts;
    for (const auto& [name, out] : names_out) {
      QSHARD_ASSIGN_OR_RETURN(LinearWeights w,
                              take_linear_weights(prefix + name, out, in, has_bias, false));
      parts.push_back(std::move(w));
    }
    return PrepareProjections(std::move(parts), prefix + fused_name, options.fuse_projections,
                              stats, fused, separate);
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
    QSHARD_RETURN_IF_ERROR(take_projections(
        p + "self_attn.", "qkv_proj", {{"q_proj", q_out}, {"k_proj", kv_out}, {"v_proj", kv_out}},
        H, c.attention_bias, &qkv_stats, &L.qkv_proj, {&L.q_proj, &L.k_proj, &L.v_proj}));
    QSHARD_ASSIGN_OR_RETURN(L.o_proj, take_linear(p + "self_attn.o_proj", H, q_out, c.attention_bias));
    QSHARD_RETURN_IF_ERROR(
        take_projections(p + "mlp.", "gate_up_proj", {{"gate_proj", I}, {"up_proj", I}}, H,
                         c.mlp_bias, &gate_up_stats, &L.gate_up_proj, {&L.gate_proj, &L.up_proj}));
    QSHARD_ASSIGN_OR_RETURN(L.down_proj, take_linear(p + "mlp.down_proj", H, I, c.mlp_bias));
    // fp8 KV cache scales, under any of the names checkpoints use for them.
    float scales[2] = {0.0f, 0.0f};
    const char* names[3][2] = {{"self_attn.k_scale", "self_attn.v_scale"},
                               {"self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"},
                               {"self_attn.kv_scale", "self_attn.kv_scale"}};
    for (const auto& pair : names) {
      for (int kv = 0; kv < 2; ++kv) {
        QSHARD_ASSIGN_OR_RETURN(Tensor t, bind.TakeOptional(p + pair[kv]));
        if (t.empty() || scales[kv] != 0.0f) continue;
        if (t.numel() != 1 || (t.dtype() != DType::kF32 && t.dtype() != DType::kBF16 &&
                               t.dtype() != DType::kF16)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "checkpoint ", ckpt.dir(), ": tensor '", p, pair[kv], "' has shape ",
              ShapeToString(t.shape()), " ", std::string(DTypeName(t.dtype())),
              ", expected one float (a per-tensor KV cache scale)"));
        }
        float v;
        ScalarAsFloat(t, &v);
        scales[kv] = v;
      }
    }
    if (scales[0] > 0.0f || scales[1] > 0.0f) {
      ckpt_kv_scales_.resize(c.num_layers, {0.0f, 0.0f});
      ckpt_kv_scales_[l] = {scales[0], scales[1]};
    }
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
    QSHARD_ASSIGN_OR_RETURN(lm_head_, take_linear_impl("lm_head", c.vocab_size, H, false,
                                                       /*optional_quant=*/true));
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
  if (online) {
    // What the model now runs, for logs, `qshard inspect` and the service's model info.
    QuantizationConfig& eff = quant_;
    eff.method = options.online_quantization;
    eff.bits = 8;
    eff.weight_is_float = options.online_quantization == QuantMethod::kFp8;
    eff.weight_strategy = WeightStrategy::kChannel;
    eff.activation = options.weight_only_activations ? ActivationScheme::kNone
                                                     : ActivationScheme::kDynamicPerToken;
    eff.activation_bits = options.weight_only_activations ? 16 : 8;
    eff.activation_is_float = eff.weight_is_float && !options.weight_only_activations;
    eff.ignore = {"lm_head"};
    eff.source = absl::StrCat("--quantization ",
                              std::string(QuantMethodName(options.online_quantization)),
                              " (quantized at load)");
    summary_.quantization = quant_.Describe();
  }
  summary_.linear_kernel = layers_.empty()       ? lm_head_->kernel_name()
                           : layers_[0].qkv_proj ? layers_[0].qkv_proj->kernel_name()
                                                 : layers_[0].q_proj->kernel_name();
  summary_.lm_head_kernel = lm_head_->kernel_name();
  LogFusion(qkv_stats, gate_up_stats);
  // Concatenated and unpacked weights were freed layer by layer between kept ones.
  ReleaseFreedHostMemory();
  if (qc.quantized()) {
    QSHARD_LOG(INFO) << "quantization: " << qc.Describe() << " (from " << qc.source
                     << "); linear kernel " << summary_.linear_kernel << ", lm_head "
                     << summary_.lm_head_kernel;
  }
  return absl::OkStatus();
}

absl::Status LlamaModel::PrepareProjections(std::vector<LinearWeights> parts,
                                            std::string fused_name, bool fuse, FusionStats* stats,
                                            std::unique_ptr<LinearOp>* fused,
                                            absl::Span<std::unique_ptr<LinearOp>* const> separate) {
  if (fuse) {
    std::vector<const LinearWeights*> ptrs;
    for (const LinearWeights& w : parts) ptrs.push_back(&w);
    absl::Status why;
    {
      // The concatenated host tensors live only in this scope: once prepared, the op holds
      // what it needs (a device copy, a repacked copy, or on the CPU a reference that keeps
      // them alive in place of the parts').
      absl::StatusOr<LinearWeights> cat = ConcatLinearWeights(ptrs, fused_name);
      if (cat.ok()) {
        absl::StatusOr<std::unique_ptr<LinearOp>> op = backend_->PrepareLinear(*cat);
        if (op.ok()) {
          *fused = std::move(op).value();
          ++stats->fused;
        } else {
          why = op.status();
        }
      } else {
        why = cat.status();
      }
    }
    if (why.ok()) {
      // The parts were copied into the fused tensors and are not read again: drop their
      // checkpoint pages, or free them when they were built in memory (dummy weights,
      // quantization at load), so resident memory holds the weights once, not twice. Freed
      // parts leave holes in the heap between kept weights; returning them to the OS every
      // 64 MiB bounds what the load holds on top (each return costs page faults later, so
      // not after every layer).
      for (const LinearWeights& w : parts) {
        for (const Tensor* t :
             {&w.weight, &w.qweight, &w.qzeros, &w.scales, &w.g_idx, &w.weight_scale, &w.bias}) {
          if (!t->empty() && !ReleaseMappedPages(t->raw(), t->nbytes())) {
            freed_at_load_ += static_cast<int64_t>(t->nbytes());
          }
        }
      }
      parts.clear();
      if (freed_at_load_ >= (int64_t{64} << 20)) {
        ReleaseFreedHostMemory();
        freed_at_load_ = 0;
      }
      return absl::OkStatus();
    }
    ++stats->separate;
    if (stats->first_reason.empty()) {
      stats->first_reason = absl::StrCat(fused_name, ": ", why.message());
    }
  }
  for (size_t i = 0; i < parts.size(); ++i) {
    QSHARD_ASSIGN_OR_RETURN(*separate[i], backend_->PrepareLinear(parts[i]));
  }
  return absl::OkStatus();
}

void LlamaModel::LogFusion(const FusionStats& qkv, const FusionStats& gate_up) const {
  const std::pair<const char*, const FusionStats*> kinds[] = {{"q|k|v", &qkv},
                                                              {"gate|up", &gate_up}};
  for (const auto& [what, st] : kinds) {
    if (st->separate == 0) continue;
    QSHARD_LOG(INFO) << "fused projections: " << what << " kept as separate linears in "
                     << st->separate << " of " << st->fused + st->separate
                     << " layers; first refusal: " << st->first_reason;
  }
}

absl::Status LlamaModel::ApplyKvScales(bool calculate) {
  const KvCacheSpec& spec = backend_->kv_cache_spec();
  const bool from_checkpoint = !ckpt_kv_scales_.empty();
  for (int64_t l = 0; l < config_.num_layers && from_checkpoint; ++l) {
    auto [k, v] = ckpt_kv_scales_[l];
    if (k <= 0.0f || v <= 0.0f) {
      return absl::InvalidArgumentError(absl::StrCat(
          "checkpoint has KV cache scales for some layers but not for layer ", l,
          " (expected k_scale and v_scale > 0 in every layer)"));
    }
    backend_->SetKvScales(static_cast<int>(l), k, v);
  }
  if (from_checkpoint) {
    QSHARD_LOG(INFO) << "fp8 KV cache (" << DTypeName(spec.dtype)
                     << "): per-layer K/V scales from the checkpoint";
  } else if (calculate) {
    backend_->CalculateKvScalesAtNextStep();
    QSHARD_LOG(INFO) << "fp8 KV cache (" << DTypeName(spec.dtype)
                     << "): K/V scales will be computed from the first prefill";
  } else {
    QSHARD_LOG(WARNING) << "fp8 KV cache (" << DTypeName(spec.dtype)
                        << ") without scales in the checkpoint: using 1.0 (pass "
                           "--calculate-kv-scales to derive them from the first prefill)";
  }
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
  QSHARD_ASSIGN_OR_RETURN(Tensor out, ForwardLogits(chunks));
  if (out.rank() == 0) {  // no logit rows (or a calibration pass that stopped early)
    logits->clear();
    return absl::OkStatus();
  }
  logits->resize(static_cast<size_t>(out.numel()));
  return backend_->CopyToHost(out, logits->data());
}

absl::StatusOr<Tensor> LlamaModel::ForwardLogits(absl::Span<const SequenceChunk> chunks) {
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
  m.num_logit_rows = static_cast<int32_t>(logit_rows.size());
  QSHARD_RETURN_IF_ERROR(backend_->BeginStep(m));

  // ---- Decoder. Shapes: T tokens, H hidden, D head dim, I intermediate. ----
  const int64_t T = static_cast<int64_t>(ids.size());
  const int64_t H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Backend& b = *backend_;
  Tensor residual = b.AllocateF32(T, H);              // [T, H] the residual stream (fp32)
  Tensor h = b.Allocate(T, H);                        // [T, H] normed input of a block
  Tensor q = b.Allocate(T, c.num_heads * D);          // [T, heads*D]
  Tensor k = b.Allocate(T, c.num_kv_heads * D);       // [T, kv_heads*D]
  Tensor v = b.Allocate(T, c.num_kv_heads * D);       // [T, kv_heads*D]
  Tensor attn = b.Allocate(T, c.num_heads * D);       // [T, heads*D]
  Tensor delta = b.Allocate(T, H);                    // [T, H] block output to add
  Tensor gate = b.Allocate(T, I);                     // [T, I]
  // Outputs of the fused Linears (and `up` for separate ones), only what some layer uses.
  // qkv is consumed by SplitQkvRope before gate_up is written, so the two share one buffer:
  // a fused step allocates no more than a separate one (on the CPU every new buffer costs
  // page faults).
  bool any_fused = false, any_separate_gate_up = false;
  for (const Layer& L : layers_) {
    any_fused |= L.qkv_proj != nullptr || L.gate_up_proj != nullptr;
    any_separate_gate_up |= L.gate_up_proj == nullptr;
  }
  const int64_t qkv_cols = (c.num_heads + 2 * c.num_kv_heads) * D;
  Tensor qkv, gate_up, up;
  if (any_fused) {
    Tensor fused_out = b.Allocate(T, std::max(qkv_cols, 2 * I));
    auto view = [&](int64_t cols) {  // the first T * cols elements as [T, cols]
      return Tensor(fused_out.dtype(), {T, cols}, fused_out.raw(), fused_out.owner(),
                    fused_out.device());
    };
    qkv = view(qkv_cols);   // [T, q|k|v]
    gate_up = view(2 * I);  // [T, 2I] = [gate | up] per row
  }
  if (any_separate_gate_up) up = b.Allocate(T, I);  // [T, I]

  // Calibration passes of the offline quantizer observe the linear inputs.
  const auto& observe = hooks_.on_linear_input;
  auto observed = [&](int64_t l, LinearSlot slot, const Tensor& x) {
    if (observe) observe(static_cast<int>(l), slot, x);
  };

  b.Embedding(embed_tokens_, ids.data(), residual);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    Layer& L = layers_[l];
    if (l == 0) {
      b.RmsNorm(residual, L.input_norm, eps, h);
    } else {
      b.AddRmsNorm(residual, delta, L.input_norm, eps, h);  // adds the previous MLP output
    }
    observed(l, LinearSlot::kQkv, h);
    if (L.qkv_proj != nullptr) {
      b.Linear(h, *L.qkv_proj, qkv);
      b.SplitQkvRope(static_cast<int>(l), qkv, q, k, v, D, c.rope);
    } else {
      b.Linear(h, *L.q_proj, q);
      b.Linear(h, *L.k_proj, k);
      b.Linear(h, *L.v_proj, v);
      b.Rope(q, k, D, c.rope);
    }
    b.Attention(static_cast<int>(l), q, k, v, c.num_heads, c.num_kv_heads, D, scale, attn);
    observed(l, LinearSlot::kO, attn);
    b.Linear(attn, *L.o_proj, delta);
    b.AddRmsNorm(residual, delta, L.post_norm, eps, h);
    observed(l, LinearSlot::kGateUp, h);
    if (L.gate_up_proj != nullptr) {
      b.Linear(h, *L.gate_up_proj, gate_up);
      b.SiluMulPacked(gate_up, gate);
    } else {
      b.Linear(h, *L.gate_proj, gate);
      b.Linear(h, *L.up_proj, up);
      b.SiluMul(gate, up, gate);
    }
    observed(l, LinearSlot::kDown, gate);
    b.Linear(gate, *L.down_proj, delta);
    if (hooks_.stop_after_layer == l) return Tensor();
  }
  b.Add(residual, delta);

  // Final norm and lm_head only on the rows whose logits are wanted.
  const int64_t R = static_cast<int64_t>(logit_rows.size());
  if (R == 0) return Tensor();
  Tensor picked = b.AllocateF32(R, H);
  b.GatherRows(residual, logit_rows, picked);
  Tensor normed = b.Allocate(R, H);
  b.RmsNorm(picked, final_norm_, eps, normed);
  Tensor out = b.AllocateF32(R, c.vocab_size);
  b.Linear(normed, *lm_head_, out);
  return out;
}

}  // namespace qshard

namespace qshard {

absl::Status LlamaModel::ReplaceLinear(int layer, const std::string& proj,
                                       std::unique_ptr<LinearOp> op) {
  if (layer < 0 || layer >= static_cast<int>(layers_.size())) {
    return absl::OutOfRangeError(
        absl::StrCat("ReplaceLinear: layer ", layer, " not in [0, ", layers_.size(), ")"));
  }
  Layer& L = layers_[layer];
  const bool in_qkv = proj == "q_proj" || proj == "k_proj" || proj == "v_proj";
  const bool in_gate_up = proj == "gate_proj" || proj == "up_proj";
  if ((in_qkv && L.qkv_proj != nullptr) || (in_gate_up && L.gate_up_proj != nullptr)) {
    return absl::FailedPreconditionError(
        absl::StrCat("ReplaceLinear: layer ", layer, " ", proj, " is part of the fused ",
                     in_qkv ? "qkv_proj" : "gate_up_proj",
                     " Linear; load the model with ModelLoadOptions::fuse_projections = false to "
                     "replace its parts one by one"));
  }
  std::unique_ptr<LinearOp>* slot = nullptr;
  if (proj == "q_proj") slot = &L.q_proj;
  if (proj == "k_proj") slot = &L.k_proj;
  if (proj == "v_proj") slot = &L.v_proj;
  if (proj == "o_proj") slot = &L.o_proj;
  if (proj == "gate_proj") slot = &L.gate_proj;
  if (proj == "up_proj") slot = &L.up_proj;
  if (proj == "down_proj") slot = &L.down_proj;
  if (slot == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ReplaceLinear: unknown projection '", proj,
        "' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj)"));
  }
  if (op == nullptr || op->in_features() != (*slot)->in_features() ||
      op->out_features() != (*slot)->out_features()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ReplaceLinear: layer ", layer, " ", proj, " is [", (*slot)->out_features(), ", ",
        (*slot)->in_features(), "], the replacement is not"));
  }
  *slot = std::move(op);
  return absl::OkStatus();
}

std::vector<const LinearOp*> LlamaModel::DecoderLinears(int layer) const {
  if (layer < 0 || layer >= static_cast<int>(layers_.size())) return {};
  const Layer& L = layers_[layer];
  std::vector<const LinearOp*> out;
  if (L.qkv_proj != nullptr) {
    out.push_back(L.qkv_proj.get());
  } else {
    out.insert(out.end(), {L.q_proj.get(), L.k_proj.get(), L.v_proj.get()});
  }
  out.push_back(L.o_proj.get());
  if (L.gate_up_proj != nullptr) {
    out.push_back(L.gate_up_proj.get());
  } else {
    out.insert(out.end(), {L.gate_proj.get(), L.up_proj.get()});
  }
  out.push_back(L.down_proj.get());
  return out;
}

bool LlamaModel::qkv_fused(int layer) const {
  return layer >= 0 && layer < static_cast<int>(layers_.size()) &&
         layers_[layer].qkv_proj != nullptr;
}

bool LlamaModel::gate_up_fused(int layer) const {
  return layer >= 0 && layer < static_cast<int>(layers_.size()) &&
         layers_[layer].gate_up_proj != nullptr;
}

absl::Status LlamaModel::ReplaceNorms(int layer, const Tensor& input_norm,
                                      const Tensor& post_norm) {
  if (layer < 0 || layer >= static_cast<int>(layers_.size())) {
    return absl::OutOfRangeError(
        absl::StrCat("ReplaceNorms: layer ", layer, " not in [0, ", layers_.size(), ")"));
  }
  const Shape want = {config_.hidden_size};
  if (input_norm.shape() != want || post_norm.shape() != want) {
    return absl::InvalidArgumentError(absl::StrCat("ReplaceNorms: layer ", layer,
                                                   ": norm weights must be [",
                                                   config_.hidden_size, "]"));
  }
  QSHARD_ASSIGN_OR_RETURN(layers_[layer].input_norm, backend_->UploadWeight(input_norm));
  QSHARD_ASSIGN_OR_RETURN(layers_[layer].post_norm, backend_->UploadWeight(post_norm));
  return absl::OkStatus();
}

}  // namespace qshard
