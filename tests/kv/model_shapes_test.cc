// Named model shapes: the published dimensions, and parameter counts that match the
// models' published totals (which checks every dimension at once).
#include "kv/model_shapes.h"

#include <string>

#include "gtest/gtest.h"
#include "kv/memory_planner.h"

namespace qshard {
namespace {

int64_t Params(const std::string& name) {
  auto cfg = ModelShapeByName(name);
  EXPECT_TRUE(cfg.ok()) << cfg.status();
  auto w = EstimateWeightBytes(*cfg, WeightPlanSpec{});
  EXPECT_TRUE(w.ok()) << w.status();
  return w->num_parameters;
}

TEST(ModelShapesTest, ParameterCountsMatchThePublishedModels) {
  // Totals as reported for the Hugging Face checkpoints (embeddings, norms and biases
  // included; tied embeddings counted once).
  EXPECT_EQ(Params("llama-3.1-8b"), 8'030'261'248);
  EXPECT_EQ(Params("llama-3.1-70b"), 70'553'706'496);
  EXPECT_EQ(Params("llama-3.2-1b"), 1'235'814'400);
  EXPECT_EQ(Params("llama-2-7b"), 6'738'415'616);
  EXPECT_EQ(Params("mistral-7b"), 7'241'732'096);
  EXPECT_EQ(Params("qwen2.5-7b"), 7'615'616'512);
  EXPECT_EQ(Params("tinyllama-1.1b"), 1'100'048'384);
}

TEST(ModelShapesTest, Llama31_8BConfig) {
  ModelConfig c = ModelShapeByName("llama-3.1-8b").value();
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_heads, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.dtype, DType::kBF16);
  EXPECT_EQ(c.rope.type, RopeType::kLlama3);
  EXPECT_EQ(c.rope.theta, 500000.0);
  EXPECT_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.bos_token_id, 128000);
}

TEST(ModelShapesTest, OtherShapesDetails) {
  ModelConfig l1 = ModelShapeByName("llama-3.2-1b").value();
  EXPECT_EQ(l1.head_dim, 64);
  EXPECT_TRUE(l1.tie_word_embeddings);
  EXPECT_EQ(l1.rope.factor, 32.0);

  ModelConfig l70 = ModelShapeByName("llama-3.1-70b").value();
  EXPECT_EQ(l70.num_layers, 80);
  EXPECT_EQ(l70.num_kv_heads, 8);
  EXPECT_EQ(l70.head_dim, 128);

  ModelConfig l2 = ModelShapeByName("llama-2-7b").value();
  EXPECT_EQ(l2.num_kv_heads, 32);  // no GQA
  EXPECT_EQ(l2.max_position_embeddings, 4096);
  EXPECT_EQ(l2.rope.type, RopeType::kDefault);
  EXPECT_EQ(l2.dtype, DType::kF16);

  ModelConfig q = ModelShapeByName("qwen2.5-7b").value();
  EXPECT_TRUE(q.attention_bias);
  EXPECT_EQ(q.num_kv_heads, 4);
  EXPECT_EQ(q.head_dim, 128);
  EXPECT_EQ(q.rope.theta, 1000000.0);
  EXPECT_EQ(q.rms_norm_eps, 1e-6);

  ModelConfig m = ModelShapeByName("mistral-7b").value();
  EXPECT_EQ(m.architecture, "MistralForCausalLM");
  EXPECT_EQ(m.max_position_embeddings, 32768);

  ModelConfig t = ModelShapeByName("tinyllama-1.1b").value();
  EXPECT_EQ(t.hidden_size, 2048);
  EXPECT_EQ(t.intermediate_size, 5632);
  EXPECT_EQ(t.num_layers, 22);
  EXPECT_EQ(t.num_heads, 32);
  EXPECT_EQ(t.num_kv_heads, 4);
  EXPECT_EQ(t.head_dim, 64);
  EXPECT_EQ(t.vocab_size, 32000);
}

TEST(ModelShapesTest, NamesAndUnknownName) {
  const std::vector<std::string> names = ModelShapeNames();
  ASSERT_EQ(names.size(), 7u);
  for (const std::string& n : names) EXPECT_TRUE(ModelShapeByName(n).ok()) << n;
  auto bad = ModelShapeByName("llama-9b");
  ASSERT_FALSE(bad.ok());
  const std::string msg(bad.status().message());
  EXPECT_NE(msg.find("llama-9b"), std::string::npos) << msg;
  for (const std::string& n : names) EXPECT_NE(msg.find(n), std::string::npos) << msg;
}

}  // namespace
}  // namespace qshard
