// LlamaModel::CreateDummy: random weights of a model shape in any supported storage format,
// built in host memory and prepared through the same LinearWeights -> Backend::PrepareLinear
// path as a checkpoint, so benchmarks measure the real kernels without downloading weights.
//
// Every decoder Linear is drawn as N(0, 0.02) in fp32 from a counter-based generator (the
// value of element i depends only on the seed, the tensor and i, so threading does not
// change it), then rounded to nearest into the format's tensors:
//   bf16 / fp16  weight [N, K]
//   fp8          weight [N, K] e4m3fn, weight_scale f32 [N, 1] = amax(row) / 448
//   int8         weight [N, K] int8, weight_scale f32 [N, 1] = amax(row) / 127
//   gptq-4bit    AutoGPTQ v1: qweight i32 [K/8, N], qzeros i32 [G, N/8] (zero - 1 = 7),
//                scales f16 [G, N] = 2 * amax / 15 (symmetric, zero 8), g_idx [K], g128
//   awq-4bit     AutoAWQ GEMM: qweight i32 [K, N/8], qzeros i32 [G, N/8] (interleaved
//                nibbles), scales f16 [G, N] = (max - min) / 15, g128
// (the quantizers and packers of quant/quantize_weights.h; ranges include 0 as in GPTQ).
#include <algorithm>
#include <cmath>
#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "quant/quantize_weights.h"
#include "runtime/base/half.h"
#include "runtime/base/log.h"
#include "runtime/base/status_macros.h"
#include "runtime/base/thread_pool.h"
#include "runtime/model/llama_model.h"

namespace qshard {
namespace {

constexpr float kWeightStd = 0.02f;
constexpr int64_t kGroupSize = 128;

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Approximately N(0, 1) from one 64-bit draw: the sum of four 16-bit uniforms (Irwin-Hall,
// mean 2, variance 1/3), centred and scaled. Bounded by +-2*sqrt(3), which keeps random
// activations tame.
inline float NormalFromBits(uint64_t r) {
  const float s = static_cast<float>((r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) +
                                     (r >> 48));
  constexpr float kInv = 1.0f / 65536.0f;
  return (s * kInv - 2.0f) * 1.7320508f;
}

// Parallel over [0, n) in chunks of at least min_chunk.
void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  ThreadPool::Global().ParallelFor(n, fn, min_chunk);
}

// out[i] = std * N(0, 1) drawn from (key, i).
void FillNormal(float* out, int64_t n, uint64_t key, float std) {
  ParallelFor(n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = std * NormalFromBits(SplitMix64(key + i));
  });
}

constexpr const char* kFormats[] = {"bf16", "fp16", "fp8", "int8", "gptq-4bit", "awq-4bit"};

// The QuantizationConfig a checkpoint of the format would carry.
QuantizationConfig DummyQuantConfig(const std::string& format) {
  QuantizationConfig q;
  q.source = "dummy weights";
  if (format == "fp8") {
    q.method = QuantMethod::kCompressedTensors;
    q.compressed_format = CompressedFormat::kFloatQuantized;
    q.bits = 8;
    q.weight_is_float = true;
    q.weight_strategy = WeightStrategy::kChannel;
    q.activation = ActivationScheme::kDynamicPerToken;
    q.activation_bits = 8;
    q.activation_is_float = true;
    q.ignore = {"lm_head"};
  } else if (format == "int8") {
    q.method = QuantMethod::kCompressedTensors;
    q.compressed_format = CompressedFormat::kIntQuantized;
    q.bits = 8;
    q.weight_strategy = WeightStrategy::kChannel;
    q.activation = ActivationScheme::kDynamicPerToken;
    q.activation_bits = 8;
    q.ignore = {"lm_head"};
  } else if (format == "gptq-4bit") {
    q.method = QuantMethod::kGptq;
    q.bits = 4;
    q.group_size = kGroupSize;
    q.sym = true;
    q.checkpoint_format = GptqCheckpointFormat::kGptq;
  } else if (format == "awq-4bit") {
    q.method = QuantMethod::kAwq;
    q.bits = 4;
    q.group_size = kGroupSize;
    q.sym = false;
    q.awq_version = "gemm";
  }
  return q;
}

}  // namespace

std::vector<std::string> LlamaModel::DummyFormats() {
  std::vector<std::string> out;
  for (const char* f : kFormats) out.push_back(f);
  return out;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::CreateDummy(const ModelConfig& shape,
                                                                    const std::string& format,
                                                                    Backend* backend,
                                                                    uint64_t seed) {
  return CreateDummy(shape, format, backend, seed, ModelLoadOptions());
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::CreateDummy(
    const ModelConfig& shape, const std::string& format, Backend* backend, uint64_t seed,
    const ModelLoadOptions& options) {
  const std::vector<std::string> formats = DummyFormats();
  if (std::find(formats.begin(), formats.end(), format) == formats.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown dummy weight format '", format,
                                                   "'; expected one of ",
                                                   absl::StrJoin(formats, ", ")));
  }
  if (shape.hidden_size <= 0 || shape.intermediate_size <= 0 || shape.num_layers <= 0 ||
      shape.num_heads <= 0 || shape.num_kv_heads <= 0 || shape.head_dim <= 0 ||
      shape.vocab_size <= 0) {
    return absl::InvalidArgumentError("dummy weights: the model shape has a zero dimension");
  }
  ModelConfig config = shape;
  if (format == "fp16") config.dtype = DType::kF16;
  std::unique_ptr<LlamaModel> model(new LlamaModel(config, backend));
  model->quant_ = DummyQuantConfig(format);
  QSHARD_RETURN_IF_ERROR(model->BuildDummyWeights(format, seed, options.fuse_projections));
  return model;
}

absl::Status LlamaModel::BuildDummyWeights(const std::string& format, uint64_t seed, bool fuse) {
  const ModelConfig& c = config_;
  const QuantizationConfig& qc = quant_;
  const int64_t H = c.hidden_size, I = c.intermediate_size, D = c.head_dim;
  const int64_t q_out = c.num_heads * D, kv_out = c.num_kv_heads * D;
  summary_.quantization = qc.Describe();
  const DType dense_dtype = format == "fp16" ? DType::kF16 : DType::kBF16;
  const uint64_t base = SplitMix64(seed);
  // Tensor t of the model gets the element stream starting at key(t) (2^40 apart).
  auto key = [&](uint64_t tensor) { return SplitMix64(base ^ (tensor * 0x100000001B3ull)) << 20; };
  uint64_t next_tensor = 0;
  std::vector<float> scratch;

  auto account_as = [&](const Tensor& t, const std::string& label, bool count_params) {
    if (t.empty()) return;
    if (count_params) summary_.num_parameters += t.numel();
    const int64_t bytes = static_cast<int64_t>(t.nbytes());
    summary_.total_bytes += bytes;
    summary_.bytes_per_dtype[std::string(DTypeName(t.dtype()))] += bytes;
    summary_.bytes_per_format[label.empty() ? "dense " + std::string(DTypeName(t.dtype()))
                                            : label] += bytes;
  };
  // A bf16 / f16 tensor drawn directly in its dtype (no fp32 copy: the embedding is large).
  auto random_dense = [&](const Shape& shp, DType dt, float std) {
    Tensor t = Tensor::Empty(dt, shp, /*zero=*/false);
    const uint64_t k = key(next_tensor++);
    uint16_t* out = t.data<uint16_t>();
    const bool bf16 = dt == DType::kBF16;
    ParallelFor(t.numel(), 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float v = std * NormalFromBits(SplitMix64(k + i));
        out[i] = bf16 ? F32ToBf16(v) : F32ToF16(v);
      }
    });
    account_as(t, "", true);
    return t;
  };
  auto ones = [&](int64_t n) -> absl::StatusOr<Tensor> {
    Tensor t = Tensor::Empty(DType::kBF16, {n}, /*zero=*/false);
    std::fill_n(t.data<uint16_t>(), n, F32ToBf16(1.0f));
    account_as(t, "", true);
    return backend_->UploadWeight(t);
  };
  // One decoder Linear in the format (host tensors, accounted), not yet prepared.
  auto linear_weights = [&](const std::string& name, int64_t out, int64_t in,
                            bool has_bias) -> absl::StatusOr<LinearWeights> {
    LinearWeights w;
    w.name = name;
    w.in_features = in;
    w.out_features = out;
    if (!qc.quantized()) {
      w.weight = random_dense({out, in}, dense_dtype, kWeightStd);
    } else {
      scratch.resize(static_cast<size_t>(out * in));
      FillNormal(scratch.data(), out * in, key(next_tensor++), kWeightStd);
      std::string label;
      // The packers return a complete LinearWeights (group_size recovered from g_idx: -1
      // when one group spans K); report the configured group size as before.
      auto quantized = [&](absl::StatusOr<LinearWeights> q) -> absl::Status {
        QSHARD_RETURN_IF_ERROR(q.status());
        w = *std::move(q);
        w.group_size = qc.group_size;
        return absl::OkStatus();
      };
      if (format == "fp8") {
        w = QuantizeFp8PerChannel(scratch.data(), out, in, name, /*dynamic_act=*/true);
        label = "fp8-e4m3";
      } else if (format == "int8") {
        w = QuantizeInt8PerChannel(scratch.data(), out, in, name, /*dynamic_act=*/true);
        label = "int8";
      } else if (format == "gptq-4bit") {
        if (in % 8 != 0 || out % 8 != 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(name, ": gptq-4bit needs dimensions divisible by 8"));
        }
        // AutoGPTQ v1, symmetric (zero 8, stored minus one), groups of kGroupSize along K.
        const IntQuantMatrix m = QuantizeRtn(scratch.data(), out, in,
                                             {.bits = 4, .group_size = kGroupSize, .sym = true});
        QSHARD_RETURN_IF_ERROR(quantized(PackGptq(m, name, /*sym=*/true, /*v1=*/true)));
        label = "gptq-w4";
      } else {
        if (out % 8 != 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(name, ": awq-4bit needs out_features divisible by 8"));
        }
        // AutoAWQ GEMM, 4-bit with zero point, groups of kGroupSize along K.
        const IntQuantMatrix m = QuantizeRtn(scratch.data(), out, in,
                                             {.bits = 4, .group_size = kGroupSize, .sym = false});
        QSHARD_RETURN_IF_ERROR(quantized(PackAwq(m, name)));
        label = "awq-w4";
      }
      for (const Tensor* t : {&w.weight, &w.qweight, &w.qzeros, &w.scales, &w.weight_scale}) {
        account_as(*t, label, false);
      }
      summary_.num_parameters += in * out;
    }
    if (has_bias) w.bias = random_dense({out}, DType::kBF16, kWeightStd);
    return w;
  };
  // ... through the backend's PrepareLinear.
  auto linear = [&](const std::string& name, int64_t out, int64_t in,
                    bool has_bias) -> absl::StatusOr<std::unique_ptr<LinearOp>> {
    QSHARD_ASSIGN_OR_RETURN(LinearWeights w, linear_weights(name, out, in, has_bias));
    return backend_->PrepareLinear(w);
  };
  // Linears sharing an input, drawn in the same order (so with the same values) as
  // separate ones, fused when asked and the format allows.
  FusionStats qkv_stats, gate_up_stats;
  auto projections = [&](const std::string& prefix, const std::string& fused_name,
                         std::vector<std::pair<std::string, int64_t>> names_out, int64_t in,
                         bool has_bias, FusionStats* stats, std::unique_ptr<LinearOp>* fused,
                         std::vector<std::unique_ptr<LinearOp>*> separate) -> absl::Status {
    std::vector<LinearWeights> parts;
    for (const auto& [name, out] : names_out) {
      QSHARD_ASSIGN_OR_RETURN(LinearWeights w, linear_weights(prefix + name, out, in, has_bias));
      parts.push_back(std::move(w));
    }
    return PrepareProjections(std::move(parts), prefix + fused_name, fuse, stats, fused, separate);
  };

  // Embedding rows N(0, 1): RMSNorm rescales them anyway, and a unit residual keeps the
  // random blocks' updates small relative to it.
  Tensor embed = random_dense({c.vocab_size, H}, DType::kBF16, 1.0f);
  QSHARD_ASSIGN_OR_RETURN(embed_tokens_, backend_->UploadWeight(embed));
  layers_.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    Layer& L = layers_[l];
    QSHARD_ASSIGN_OR_RETURN(L.input_norm, ones(H));
    QSHARD_ASSIGN_OR_RETURN(L.post_norm, ones(H));
    const bool ab = c.attention_bias, mb = c.mlp_bias;
    QSHARD_RETURN_IF_ERROR(projections(
        p + "self_attn.", "qkv_proj", {{"q_proj", q_out}, {"k_proj", kv_out}, {"v_proj", kv_out}},
        H, ab, &qkv_stats, &L.qkv_proj, {&L.q_proj, &L.k_proj, &L.v_proj}));
    QSHARD_ASSIGN_OR_RETURN(L.o_proj, linear(p + "self_attn.o_proj", H, q_out, ab));
    QSHARD_RETURN_IF_ERROR(projections(p + "mlp.", "gate_up_proj",
                                       {{"gate_proj", I}, {"up_proj", I}}, H, mb, &gate_up_stats,
                                       &L.gate_up_proj, {&L.gate_proj, &L.up_proj}));
    QSHARD_ASSIGN_OR_RETURN(L.down_proj, linear(p + "mlp.down_proj", H, I, mb));
  }
  QSHARD_ASSIGN_OR_RETURN(final_norm_, ones(H));
  LinearWeights head;
  head.in_features = H;
  head.out_features = c.vocab_size;
  if (c.tie_word_embeddings) {
    head.name = "lm_head (tied to model.embed_tokens)";
    head.weight = embed;
  } else {
    head.name = "lm_head";
    head.weight = random_dense({c.vocab_size, H}, DType::kBF16, kWeightStd);
  }
  QSHARD_ASSIGN_OR_RETURN(lm_head_, backend_->PrepareLinear(head));
  scratch = std::vector<float>();
  summary_.linear_kernel = layers_.empty()       ? lm_head_->kernel_name()
                           : layers_[0].qkv_proj ? layers_[0].qkv_proj->kernel_name()
                                                 : layers_[0].q_proj->kernel_name();
  summary_.lm_head_kernel = lm_head_->kernel_name();
  LogFusion(qkv_stats, gate_up_stats);
  // The parts of fused Linears (and the quantizers' temporaries) were freed layer by layer
  // between kept weights.
  ReleaseFreedHostMemory();
  QSHARD_LOG(INFO) << "dummy weights: " << format << " (" << qc.Describe() << "), "
                   << summary_.total_bytes / (1 << 20) << " MiB; linear kernel "
                   << summary_.linear_kernel << ", lm_head " << summary_.lm_head_kernel;
  return absl::OkStatus();
}

}  // namespace qshard
