// QuantizationConfig parsing: the three shared fixtures, legacy files, inline variants of
// every supported method, and the errors for unsupported values.
#include "quant/quant_config.h"

#include <fstream>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_support.h"

namespace qshard {
namespace {

using ::qshard::testing::SharedModel;
using json = nlohmann::json;

QuantizationConfig FromFixture(const std::string& name) {
  std::ifstream in(SharedModel(name) + "/config.json");
  json cfg = json::parse(in);
  auto q = LoadQuantizationConfig(SharedModel(name), cfg["quantization_config"].dump());
  EXPECT_TRUE(q.ok()) << q.status();
  return q.ok() ? *q : QuantizationConfig{};
}

absl::StatusOr<QuantizationConfig> Parse(const json& j) {
  return ParseQuantizationConfig(j.dump(), "test");
}

void ExpectError(const json& j, const std::string& needle) {
  auto q = Parse(j);
  ASSERT_FALSE(q.ok()) << j.dump();
  EXPECT_NE(q.status().message().find(needle), std::string::npos) << q.status();
}

TEST(QuantConfigTest, GptqFixture) {
  QuantizationConfig q = FromFixture("kjv-llama-12m-gptq-4bit");
  EXPECT_EQ(q.method, QuantMethod::kGptq);
  EXPECT_EQ(q.bits, 4);
  EXPECT_EQ(q.group_size, 128);
  EXPECT_TRUE(q.sym);
  EXPECT_FALSE(q.desc_act);
  EXPECT_EQ(q.checkpoint_format, GptqCheckpointFormat::kGptq);
  EXPECT_EQ(q.activation, ActivationScheme::kNone);
  EXPECT_FALSE(q.IsIgnored("lm_head"));
  EXPECT_EQ(q.Describe(), "gptq 4-bit g128 sym (checkpoint_format gptq)");
}

TEST(QuantConfigTest, AwqFixture) {
  QuantizationConfig q = FromFixture("kjv-llama-12m-awq-4bit");
  EXPECT_EQ(q.method, QuantMethod::kAwq);
  EXPECT_EQ(q.bits, 4);
  EXPECT_EQ(q.group_size, 128);
  EXPECT_FALSE(q.sym);  // zero_point: true
  EXPECT_EQ(q.awq_version, "gemm");
  EXPECT_TRUE(q.ignore.empty());  // modules_to_not_convert: null
}

TEST(QuantConfigTest, Fp8DynamicFixture) {
  QuantizationConfig q = FromFixture("kjv-llama-12m-fp8-dynamic");
  EXPECT_EQ(q.method, QuantMethod::kCompressedTensors);
  EXPECT_EQ(q.compressed_format, CompressedFormat::kFloatQuantized);
  EXPECT_TRUE(q.weight_is_float);
  EXPECT_EQ(q.bits, 8);
  EXPECT_EQ(q.weight_strategy, WeightStrategy::kChannel);
  EXPECT_EQ(q.activation, ActivationScheme::kDynamicPerToken);
  EXPECT_TRUE(q.activation_is_float);
  EXPECT_TRUE(q.IsIgnored("lm_head"));
  EXPECT_FALSE(q.IsIgnored("model.layers.0.mlp.down_proj"));
}

TEST(QuantConfigTest, NoQuantization) {
  auto q = LoadQuantizationConfig(SharedModel("kjv-llama-12m"), "");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_FALSE(q->quantized());
  EXPECT_EQ(q->Describe(), "none");
}

TEST(QuantConfigTest, LegacyFiles) {
  const std::string dir = ::qshard::testing::MakeTempDir("quant_config");
  {
    std::ofstream(dir + "/quant_config.json")
        << R"({"zero_point": true, "q_group_size": 64, "w_bit": 4, "version": "GEMM"})";
  }
  auto awq = LoadQuantizationConfig(dir, "");
  ASSERT_TRUE(awq.ok()) << awq.status();
  EXPECT_EQ(awq->method, QuantMethod::kAwq);
  EXPECT_EQ(awq->group_size, 64);
  EXPECT_EQ(awq->awq_version, "gemm");
  EXPECT_NE(awq->source.find("quant_config.json"), std::string::npos);
  {
    // quantize_config.json (AutoGPTQ) wins over quant_config.json.
    std::ofstream(dir + "/quantize_config.json")
        << R"({"bits": 8, "group_size": -1, "desc_act": true, "sym": false,
               "checkpoint_format": "gptq_v2"})";
  }
  auto gptq = LoadQuantizationConfig(dir, "");
  ASSERT_TRUE(gptq.ok()) << gptq.status();
  EXPECT_EQ(gptq->method, QuantMethod::kGptq);
  EXPECT_EQ(gptq->bits, 8);
  EXPECT_EQ(gptq->group_size, -1);
  EXPECT_TRUE(gptq->desc_act);
  EXPECT_FALSE(gptq->sym);
  EXPECT_EQ(gptq->checkpoint_format, GptqCheckpointFormat::kGptqV2);
  // config.json's quantization_config takes precedence over both.
  auto inline_cfg = LoadQuantizationConfig(dir, R"({"quant_method": "fp8"})");
  ASSERT_TRUE(inline_cfg.ok());
  EXPECT_EQ(inline_cfg->method, QuantMethod::kFp8);
}

TEST(QuantConfigTest, VllmFp8PerTensorAndBlock) {
  auto q = Parse(
      {{"quant_method", "fp8"}, {"activation_scheme", "static"}, {"ignored_layers", {"lm_head"}}});
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->weight_strategy, WeightStrategy::kTensor);
  EXPECT_EQ(q->activation, ActivationScheme::kStatic);
  EXPECT_TRUE(q->IsIgnored("lm_head"));

  auto b = Parse({{"quant_method", "fp8"},
                  {"fmt", "e4m3"},
                  {"activation_scheme", "dynamic"},
                  {"weight_block_size", {128, 128}}});
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->weight_strategy, WeightStrategy::kBlock);
  EXPECT_EQ(b->weight_block_size, (std::vector<int64_t>{128, 128}));
  EXPECT_EQ(b->activation, ActivationScheme::kDynamicPerTokenGroup);
  EXPECT_EQ(b->group_size, 128);

  ExpectError(
      {{"quant_method", "fp8"}, {"activation_scheme", "static"}, {"weight_block_size", {128, 128}}},
      "activation_scheme");
  ExpectError({{"quant_method", "fp8"}, {"fmt", "e5m2"}}, "fmt: \"e5m2\" is not supported");
}

json CtConfig(const std::string& format, const json& weights, const json& acts) {
  return {
      {"quant_method", "compressed-tensors"},
      {"format", format},
      {"quantization_status", "compressed"},
      {"config_groups",
       {{"group_0", {{"targets", {"Linear"}}, {"weights", weights}, {"input_activations", acts}}}}},
      {"ignore", {"lm_head", "re:.*mlp.down_proj$"}}};
}

TEST(QuantConfigTest, CompressedTensorsVariants) {
  // FP8 static per-tensor.
  auto st = Parse(
      CtConfig("float-quantized", {{"num_bits", 8}, {"type", "float"}, {"strategy", "tensor"}},
               {{"num_bits", 8}, {"type", "float"}, {"strategy", "tensor"}, {"dynamic", false}}));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->activation, ActivationScheme::kStatic);
  EXPECT_TRUE(st->IsIgnored("model.layers.3.mlp.down_proj"));
  EXPECT_FALSE(st->IsIgnored("model.layers.3.mlp.up_proj"));
  // FP8 block.
  auto blk = Parse(CtConfig(
      "float-quantized",
      {{"num_bits", 8}, {"type", "float"}, {"strategy", "block"}, {"block_structure", {128, 128}}},
      {{"num_bits", 8},
       {"type", "float"},
       {"strategy", "group"},
       {"group_size", 128},
       {"dynamic", true}}));
  ASSERT_TRUE(blk.ok()) << blk.status();
  EXPECT_EQ(blk->weight_strategy, WeightStrategy::kBlock);
  EXPECT_EQ(blk->activation, ActivationScheme::kDynamicPerTokenGroup);
  // INT8 W8A8.
  auto i8 =
      Parse(CtConfig("int-quantized", {{"num_bits", 8}, {"type", "int"}, {"strategy", "channel"}},
                     {{"num_bits", 8}, {"type", "int"}, {"strategy", "token"}, {"dynamic", true}}));
  ASSERT_TRUE(i8.ok()) << i8.status();
  EXPECT_EQ(i8->compressed_format, CompressedFormat::kIntQuantized);
  EXPECT_EQ(i8->activation, ActivationScheme::kDynamicPerToken);
  EXPECT_FALSE(i8->activation_is_float);
  // W4A16 pack-quantized.
  auto w4 = Parse(CtConfig("pack-quantized",
                           {{"num_bits", 4},
                            {"type", "int"},
                            {"strategy", "group"},
                            {"group_size", 128},
                            {"symmetric", true}},
                           nullptr));
  ASSERT_TRUE(w4.ok()) << w4.status();
  EXPECT_EQ(w4->compressed_format, CompressedFormat::kPackQuantized);
  EXPECT_EQ(w4->bits, 4);
  EXPECT_EQ(w4->group_size, 128);
  EXPECT_EQ(w4->activation, ActivationScheme::kNone);
}

TEST(QuantConfigTest, UnsupportedValuesNameFieldAndChoices) {
  ExpectError({{"quant_method", "bitsandbytes"}},
              "quant_method: \"bitsandbytes\" is not supported (supported: gptq, awq, fp8, "
              "compressed-tensors)");
  ExpectError({{"quant_method", "gptq"}, {"bits", 3}},
              "bits: 3 is not supported (supported: 4, 8)");
  ExpectError({{"quant_method", "gptq"}, {"checkpoint_format", "marlin"}},
              "checkpoint_format: \"marlin\" is not supported");
  ExpectError({{"quant_method", "gptq"}, {"group_size", 0}}, "group_size: 0 is not supported");
  ExpectError({{"quant_method", "awq"}, {"version", "gemv"}},
              "version: \"gemv\" is not supported (supported: gemm");
  ExpectError({{"quant_method", "awq"}, {"bits", 8}}, "bits: 8 is not supported (supported: 4)");
  ExpectError(CtConfig("naive-quantized", {{"num_bits", 8}}, nullptr),
              "format: \"naive-quantized\" is not supported (supported: float-quantized, "
              "int-quantized, pack-quantized)");
  ExpectError(CtConfig("pack-quantized", {{"num_bits", 4}, {"type", "int"}, {"strategy", "tensor"}},
                       nullptr),
              "strategy: \"tensor\" is not supported");
  ExpectError(
      CtConfig("float-quantized", {{"num_bits", 8}, {"type", "float"}, {"strategy", "channel"}},
               {{"num_bits", 8}, {"type", "float"}, {"strategy", "token"}, {"dynamic", false}}),
      "input_activations.strategy");
  ExpectError({{"quant_method", "gptq"}, {"bits", "4"}}, "bits: expected an integer");
  auto bad = ParseQuantizationConfig("{not json", "x.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("x.json: invalid JSON"), std::string::npos);
}

TEST(QuantConfigTest, IgnoreMatching) {
  QuantizationConfig q;
  q.ignore = {"lm_head", "model.layers.1", "mlp.gate_proj", "re:model\\.layers\\.[23]\\."};
  EXPECT_TRUE(q.IsIgnored("lm_head"));
  EXPECT_TRUE(q.IsIgnored("model.layers.1.self_attn.q_proj"));
  EXPECT_FALSE(q.IsIgnored("model.layers.10.self_attn.q_proj"));
  EXPECT_TRUE(q.IsIgnored("model.layers.0.mlp.gate_proj"));
  EXPECT_FALSE(q.IsIgnored("model.layers.0.mlp.up_proj"));
  EXPECT_TRUE(q.IsIgnored("model.layers.2.mlp.up_proj"));
  EXPECT_FALSE(q.IsIgnored("model.layers.4.mlp.up_proj"));
}

}  // namespace
}  // namespace qshard
