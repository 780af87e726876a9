// LlamaModel::CreateDummy: every format builds on a small shape, runs a forward with finite
// logits, is deterministic for a seed, and (since every format rounds the same fp32 draw)
// stays close to the bf16 model of the same seed.
#include <cmath>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kv/model_shapes.h"
#include "runtime/model/llama_model.h"
#include "tests/runtime/model/tiny_shape.h"

namespace qshard {
namespace {

ModelConfig TinyShape() { return testing::TinyLlamaShape(); }

struct Built {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
};

Built Build(const std::string& format, uint64_t seed, const ModelConfig& shape = TinyShape()) {
  Built b;
  auto backend = CreateBackend("cpu");
  EXPECT_TRUE(backend.ok()) << backend.status();
  b.backend = std::move(*backend);
  auto model = LlamaModel::CreateDummy(shape, format, b.backend.get(), seed);
  EXPECT_TRUE(model.ok()) << format << ": " << model.status();
  if (!model.ok()) return b;
  b.model = std::move(*model);
  KvCacheSpec spec;
  spec.num_layers = 2;
  spec.num_kv_heads = 2;
  spec.head_dim = 64;
  spec.block_size = 16;
  spec.num_blocks = 4;
  EXPECT_TRUE(b.model->AllocateKvCache(spec).ok());
  return b;
}

// Logits of every token of a fixed 8-token prompt.
std::vector<float> Logits(LlamaModel& model) {
  const std::vector<int32_t> ids = {1, 17, 300, 42, 511, 7, 99, 256};
  const std::vector<int32_t> table = {0};
  SequenceChunk c{ids, 0, table, LogitsMode::kAll};
  std::vector<float> logits;
  absl::Status st = model.Forward({&c, 1}, &logits);
  EXPECT_TRUE(st.ok()) << st;
  return logits;
}

// max |a - b| / max |b|.
double RelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, mag = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(a[i] - b[i])));
    mag = std::max(mag, static_cast<double>(std::fabs(b[i])));
  }
  return err / mag;
}

TEST(DummyWeightsTest, EveryFormatIsFiniteDeterministicAndCloseToBf16) {
  Built ref = Build("bf16", 7);
  ASSERT_NE(ref.model, nullptr);
  const std::vector<float> want = Logits(*ref.model);
  ASSERT_EQ(want.size(), 8u * 512u);
  const int64_t bf16_bytes = ref.model->weight_summary().total_bytes;
  // Tolerances: max error relative to the largest bf16 logit, about 3x what the formats'
  // rounding gives (measured 0.0003 / 0.006 / 0.0015 / 0.018 / 0.016). The decoder blocks
  // move the logits by ~10%, so a mis-packed layout (random codes) lands well above them.
  const std::vector<std::pair<std::string, double>> formats = {
      {"bf16", 0.0}, {"fp16", 0.002}, {"fp8", 0.02},
      {"int8", 0.006}, {"gptq-4bit", 0.06}, {"awq-4bit", 0.06}};
  for (const auto& [format, tol] : formats) {
    SCOPED_TRACE(format);
    Built a = Build(format, 7);
    Built b = Build(format, 7);
    ASSERT_NE(a.model, nullptr);
    ASSERT_NE(b.model, nullptr);
    const std::vector<float> la = Logits(*a.model);
    const std::vector<float> lb = Logits(*b.model);
    ASSERT_EQ(la.size(), want.size());
    for (float v : la) ASSERT_TRUE(std::isfinite(v));
    EXPECT_EQ(la, lb) << "not deterministic for one seed";
    const double rel = RelDiff(la, want);
    EXPECT_LE(rel, tol) << "max logit error relative to bf16";
    std::printf("%-10s rel diff to bf16 %.4f  weight bytes %lld  kernel %s\n", format.c_str(),
                rel, static_cast<long long>(a.model->weight_summary().total_bytes),
                a.model->weight_summary().linear_kernel.c_str());
    if (format != "bf16") {
      EXPECT_GT(rel, 0.0) << "same logits as bf16: weights not converted?";
    }
    if (format != "bf16" && format != "fp16") {
      EXPECT_LT(a.model->weight_summary().total_bytes, bf16_bytes);
      EXPECT_EQ(a.model->weight_summary().num_parameters,
                ref.model->weight_summary().num_parameters);
    }
  }
  // Another seed gives other weights.
  Built other = Build("bf16", 8);
  ASSERT_NE(other.model, nullptr);
  EXPECT_GT(RelDiff(Logits(*other.model), want), 0.05);
}

TEST(DummyWeightsTest, QuantizedFormatsUseTheirKernels) {
  for (const auto& [format, kernel] : std::vector<std::pair<std::string, std::string>>{
           {"gptq-4bit", "gptq-w4"}, {"awq-4bit", "awq-w4"}, {"int8", "int8-w8a8"},
           {"fp8", "fp8"}}) {
    Built b = Build(format, 1);
    ASSERT_NE(b.model, nullptr);
    EXPECT_NE(b.model->weight_summary().linear_kernel.find(kernel), std::string::npos)
        << format << ": " << b.model->weight_summary().linear_kernel;
    EXPECT_TRUE(b.model->quantization().quantized()) << format;
  }
}

TEST(DummyWeightsTest, BiasesAndTiedEmbeddings) {
  ModelConfig shape = TinyShape();
  shape.attention_bias = true;  // Qwen2-style
  shape.mlp_bias = true;
  shape.tie_word_embeddings = true;
  for (const std::string format : {"bf16", "gptq-4bit", "int8"}) {
    SCOPED_TRACE(format);
    Built b = Build(format, 3, shape);
    ASSERT_NE(b.model, nullptr);
    for (float v : Logits(*b.model)) ASSERT_TRUE(std::isfinite(v));
    EXPECT_NE(b.model->weight_summary().lm_head_kernel, "");
  }
}

TEST(DummyWeightsTest, UnknownFormatIsAnError) {
  auto backend = CreateBackend("cpu");
  ASSERT_TRUE(backend.ok());
  auto model = LlamaModel::CreateDummy(TinyShape(), "q4_0", backend->get(), 1);
  ASSERT_FALSE(model.ok());
  EXPECT_NE(model.status().message().find("gptq-4bit"), std::string::npos) << model.status();
}

TEST(DummyWeightsTest, TinyLlamaShapeIsKnown) {
  auto shape = ModelShapeByName("tinyllama-1.1b");
  ASSERT_TRUE(shape.ok()) << shape.status();
  EXPECT_EQ(shape->hidden_size, 2048);
  EXPECT_EQ(shape->intermediate_size, 5632);
  EXPECT_EQ(shape->num_layers, 22);
}

}  // namespace
}  // namespace qshard
