// Fused q|k|v and gate|up Linears (ModelLoadOptions::fuse_projections, the default) against
// the same model loaded with separate Linears on the CPU, for the embedded checkpoint, every
// shared fixture, online quantization and every dummy format: every layer is fused, the
// weight summary is unchanged, the fused ops hold the bytes of their parts, and logits of
// a prefill (the packed-GEMM path, > 4 rows), of batched decode (3 rows) and of single-row
// decode steps (the GEMV path) agree. A checkpoint whose parts cannot be concatenated
// (one k_proj stored in another dtype) keeps that layer's q/k/v separate and still gives the
// same logits; ReplaceLinear refuses the parts of a fused Linear.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kv/memory_planner.h"
#include "runtime/backend/backend.h"
#include "runtime/checkpoint/safetensors.h"
#include "runtime/model/llama_model.h"
#include "tests/runtime/model/tiny_shape.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

namespace fs = std::filesystem;
using ::qshard::testing::SharedModel;

// Fused and separate runs do the same fp32 arithmetic per output element: each output
// feature's dot product over K does not depend on which other rows share its Linear, and
// the activation quantization of W8A8 formats is per token. So logits agree to fp32 rounding
// noise at most (in practice bit for bit): max |fused - separate| <= kTolerance * max |logit|.
constexpr double kTolerance = 1e-6;

struct Case {
  std::string name;
  std::string dir;           // checkpoint directory, or empty for dummy weights
  std::string dummy_format;  // LlamaModel::DummyFormats() entry when dir is empty
  bool weight_only = false;
  QuantMethod online = QuantMethod::kNone;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// A small shape with biases, so the concatenation of biases runs too.
ModelConfig DummyShape() {
  ModelConfig c = testing::TinyLlamaShape();
  c.attention_bias = true;
  c.mlp_bias = true;
  return c;
}

struct Loaded {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
};

Loaded Load(const Case& c, bool fuse) {
  Loaded out;
  auto backend = CreateBackend("cpu");
  EXPECT_TRUE(backend.ok()) << backend.status();
  if (!backend.ok()) return out;
  out.backend = std::move(*backend);
  ModelLoadOptions options;
  options.fuse_projections = fuse;
  options.weight_only_activations = c.weight_only;
  options.online_quantization = c.online;
  absl::StatusOr<std::unique_ptr<LlamaModel>> model;
  if (c.dir.empty()) {
    model = LlamaModel::CreateDummy(DummyShape(), c.dummy_format, out.backend.get(), 11, options);
  } else {
    auto config = LoadModelConfig(c.dir);
    EXPECT_TRUE(config.ok()) << config.status();
    if (!config.ok()) return out;
    model = LlamaModel::Load(c.dir, *config, out.backend.get(), options);
  }
  EXPECT_TRUE(model.ok()) << c.name << (fuse ? " fused: " : " separate: ") << model.status();
  if (!model.ok()) return out;
  out.model = std::move(*model);
  const ModelConfig& cfg = out.model->config();
  KvCacheSpec spec = KvCacheSpecFor(cfg, DType::kF32, 16);
  spec.num_blocks = 16;
  EXPECT_TRUE(out.model->AllocateKvCache(spec).ok());
  return out;
}

// Logits of: a 20-token prefill (every token), then 3 sequences decoding together for two
// steps, then 4 single-sequence decode steps. Concatenated in that order.
std::vector<float> Logits(LlamaModel& model) {
  const int32_t vocab = static_cast<int32_t>(model.config().vocab_size);
  auto tok = [&](int64_t i) { return static_cast<int32_t>(3 + (i * 7919) % (vocab - 3)); };
  std::vector<float> all, logits;
  auto run = [&](absl::Span<const SequenceChunk> chunks) {
    absl::Status st = model.Forward(chunks, &logits);
    EXPECT_TRUE(st.ok()) << st;
    all.insert(all.end(), logits.begin(), logits.end());
  };
  // Sequence s uses blocks [4s, 4s + 4).
  std::vector<std::vector<int32_t>> tables(3);
  for (int s = 0; s < 3; ++s) {
    tables[s].resize(4);
    std::iota(tables[s].begin(), tables[s].end(), 4 * s);
  }
  std::vector<std::vector<int32_t>> prompts(3);
  for (int s = 0; s < 3; ++s) {
    for (int i = 0; i < 20; ++i) prompts[s].push_back(tok(s * 131 + i));
  }
  std::vector<SequenceChunk> chunks;
  for (int s = 0; s < 3; ++s) {
    chunks.push_back({prompts[s], 0, tables[s], s == 0 ? LogitsMode::kAll : LogitsMode::kLast});
  }
  run(chunks);
  std::vector<int32_t> next(3);
  for (int step = 0; step < 2; ++step) {
    for (int s = 0; s < 3; ++s) {
      next[s] = tok(1000 + step * 3 + s);
      chunks[s] = {absl::Span<const int32_t>(&next[s], 1), 20 + step, tables[s], LogitsMode::kLast};
    }
    run(chunks);
  }
  for (int step = 0; step < 4; ++step) {
    const int32_t t = tok(2000 + step);
    SequenceChunk c{absl::Span<const int32_t>(&t, 1), 22 + step, tables[0], LogitsMode::kLast};
    run({&c, 1});
  }
  return all;
}

// max |a - b| / max |b|.
double RelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, mag = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(a[i] - b[i])));
    mag = std::max(mag, static_cast<double>(std::fabs(b[i])));
  }
  return mag > 0 ? err / mag : err;
}

int64_t LinearBytes(const LlamaModel& m, int layer) {
  int64_t bytes = 0;
  for (const LinearOp* op : m.DecoderLinears(layer)) bytes += op->weight_bytes();
  return bytes;
}

class FusedProjectionsTest : public ::testing::TestWithParam<Case> {};

TEST_P(FusedProjectionsTest, FusedAndSeparateLinearsGiveTheSameModel) {
  Loaded fused = Load(GetParam(), true);
  Loaded separate = Load(GetParam(), false);
  ASSERT_NE(fused.model, nullptr);
  ASSERT_NE(separate.model, nullptr);
  const ModelConfig& c = fused.model->config();
  const int64_t D = c.head_dim;
  for (int l = 0; l < static_cast<int>(c.num_layers); ++l) {
    EXPECT_TRUE(fused.model->qkv_fused(l)) << "layer " << l;
    EXPECT_TRUE(fused.model->gate_up_fused(l)) << "layer " << l;
    EXPECT_FALSE(separate.model->qkv_fused(l)) << "layer " << l;
    EXPECT_FALSE(separate.model->gate_up_fused(l)) << "layer " << l;
    std::vector<int64_t> outs;
    for (const LinearOp* op : fused.model->DecoderLinears(l)) outs.push_back(op->out_features());
    EXPECT_EQ(outs, (std::vector<int64_t>{(c.num_heads + 2 * c.num_kv_heads) * D, c.hidden_size,
                                          2 * c.intermediate_size, c.hidden_size}));
    EXPECT_EQ(separate.model->DecoderLinears(l).size(), 7u);
    // A fused op streams exactly the bytes of its parts.
    EXPECT_EQ(LinearBytes(*fused.model, l), LinearBytes(*separate.model, l)) << "layer " << l;
  }
  // The summary counts the checkpoint's tensors, however they are prepared.
  const WeightSummary& a = fused.model->weight_summary();
  const WeightSummary& b = separate.model->weight_summary();
  EXPECT_EQ(a.num_parameters, b.num_parameters);
  EXPECT_EQ(a.total_bytes, b.total_bytes);
  EXPECT_EQ(a.bytes_per_dtype, b.bytes_per_dtype);
  EXPECT_EQ(a.bytes_per_format, b.bytes_per_format);
  EXPECT_EQ(a.quantization, b.quantization);
  EXPECT_EQ(a.linear_kernel, b.linear_kernel);

  const std::vector<float> lf = Logits(*fused.model);
  const std::vector<float> ls = Logits(*separate.model);
  ASSERT_EQ(lf.size(), ls.size());
  ASSERT_FALSE(lf.empty());
  for (float v : lf) ASSERT_TRUE(std::isfinite(v));
  const double diff = RelDiff(lf, ls);
  std::printf("%s: fused vs separate logits, max relative difference %.3g (%s)\n",
              GetParam().name.c_str(), diff, lf == ls ? "bitwise equal" : "not bitwise equal");
  EXPECT_LE(diff, kTolerance);
}

std::vector<Case> Cases() {
  const std::string embedded = ::qshard::testing::SourceDir() + "/models/kjv-llama-12m";
  std::vector<Case> out = {
      {"kjv_llama_12m_bf16", embedded, ""},
      {"gptq_4bit", SharedModel("kjv-llama-12m-gptq-4bit"), ""},
      {"awq_4bit", SharedModel("kjv-llama-12m-awq-4bit"), ""},
      {"fp8_dynamic_w8a8", SharedModel("kjv-llama-12m-fp8-dynamic"), ""},
      {"fp8_dynamic_weight_only", SharedModel("kjv-llama-12m-fp8-dynamic"), "", true},
      {"online_fp8", embedded, "", false, QuantMethod::kFp8},
      {"online_int8", embedded, "", false, QuantMethod::kInt8},
  };
  for (const std::string& f : LlamaModel::DummyFormats()) {
    out.push_back({"dummy_" + ::qshard::testing::TestName(f), "", f});
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Formats, FusedProjectionsTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return info.param.name;
                         });

// The embedded checkpoint with layer 0's k_proj stored as float32: q|k|v of that layer
// cannot be concatenated (the dtypes differ), everything else can.
class MixedFusionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string src = ::qshard::testing::SourceDir() + "/models/kjv-llama-12m";
    dir_ = ::qshard::testing::MakeTempDir("qshard-mixed-fusion");
    auto ckpt = Checkpoint::Open(src);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    std::vector<std::pair<std::string, Tensor>> tensors;
    for (const std::string& name : ckpt->Names()) {
      Tensor t = ckpt->Get(name).value();
      if (name == "model.layers.0.self_attn.k_proj.weight") {
        const std::vector<float> f = ToFloatVector(t);
        Tensor f32 = Tensor::Empty(DType::kF32, t.shape());
        std::copy(f.begin(), f.end(), f32.data<float>());
        t = f32;
      }
      tensors.push_back({name, t});
    }
    ASSERT_TRUE(WriteSafetensors(dir_ + "/model.safetensors", tensors).ok());
    for (const char* f : {"config.json", "generation_config.json"}) {
      fs::copy_file(fs::path(src) / f, fs::path(dir_) / f);
    }
  }
  std::string dir_;
};

TEST_F(MixedFusionTest, ALayerThatCannotBeFusedKeepsSeparateLinears) {
  Case c{"mixed", dir_, ""};
  Loaded fused = Load(c, true);
  Loaded separate = Load(c, false);
  ASSERT_NE(fused.model, nullptr);
  ASSERT_NE(separate.model, nullptr);
  EXPECT_FALSE(fused.model->qkv_fused(0));
  EXPECT_TRUE(fused.model->gate_up_fused(0));
  for (int l = 1; l < 6; ++l) {
    EXPECT_TRUE(fused.model->qkv_fused(l)) << "layer " << l;
    EXPECT_TRUE(fused.model->gate_up_fused(l)) << "layer " << l;
  }
  EXPECT_EQ(fused.model->DecoderLinears(0).size(), 6u);  // q, k, v, o, gate|up, down
  EXPECT_EQ(fused.model->weight_summary().bytes_per_dtype,
            separate.model->weight_summary().bytes_per_dtype);
  const double diff = RelDiff(Logits(*fused.model), Logits(*separate.model));
  EXPECT_LE(diff, kTolerance);
}

TEST_F(MixedFusionTest, ReplaceLinearRefusesThePartsOfAFusedLinear) {
  Loaded fused = Load(Case{"mixed", dir_, ""}, true);
  ASSERT_NE(fused.model, nullptr);
  auto op = [&](int64_t out, int64_t in) {
    LinearWeights w;
    w.name = "replacement";
    w.in_features = in;
    w.out_features = out;
    w.weight = Tensor::Empty(DType::kF32, {out, in});
    return fused.backend->PrepareLinear(w).value();
  };
  // Layer 0's q/k/v were kept separate: replaceable. Its gate/up are fused: not.
  EXPECT_TRUE(fused.model->ReplaceLinear(0, "k_proj", op(128, 384)).ok());
  absl::Status st = fused.model->ReplaceLinear(0, "up_proj", op(1024, 384));
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("gate_up_proj"), std::string::npos) << st;
  EXPECT_NE(st.message().find("fuse_projections = false"), std::string::npos) << st;
  st = fused.model->ReplaceLinear(1, "q_proj", op(384, 384));
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("qkv_proj"), std::string::npos) << st;
  // o_proj and down_proj are never fused.
  EXPECT_TRUE(fused.model->ReplaceLinear(1, "down_proj", op(384, 1024)).ok());
}

}  // namespace
}  // namespace qshard
