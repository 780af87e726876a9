#include "runtime/checkpoint/model_config.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <string>

#include "nlohmann/json.hpp"
#include "tests/test_support.h"

namespace qshard {
namespace {

using nlohmann::json;

void ExpectError(const absl::Status& status, absl::StatusCode code,
                 std::initializer_list<std::string> pieces) {
  ASSERT_FALSE(status.ok()) << "expected an error";
  EXPECT_EQ(status.code(), code) << status;
  const std::string message(status.message());
  for (const std::string& piece : pieces) {
    EXPECT_NE(message.find(piece), std::string::npos)
        << "message does not mention '" << piece << "': " << message;
  }
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

// A minimal transformers-4 style Llama config that tests then modify.
json BaseConfig() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
    "rope_theta": 500000.0
  })");
}

absl::StatusOr<ModelConfig> Parse(const json& j) { return ParseModelConfig(j.dump(), "cfg.json"); }

TEST(ModelConfigTest, SharedBaseModel) {
  const std::string dir = testing::SharedModel("kjv-llama-12m");
  if (!std::filesystem::exists(dir + "/config.json")) GTEST_SKIP() << "no shared fixtures";
  auto cfg = LoadModelConfig(dir);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->architecture, "LlamaForCausalLM");
  EXPECT_EQ(cfg->model_type, "llama");
  EXPECT_EQ(cfg->hidden_size, 384);
  EXPECT_EQ(cfg->intermediate_size, 1024);
  EXPECT_EQ(cfg->num_layers, 6);
  EXPECT_EQ(cfg->num_heads, 6);
  EXPECT_EQ(cfg->num_kv_heads, 2);
  EXPECT_EQ(cfg->head_dim, 64);
  EXPECT_EQ(cfg->vocab_size, 4096);
  EXPECT_EQ(cfg->max_position_embeddings, 1024);
  EXPECT_DOUBLE_EQ(cfg->rms_norm_eps, 1e-5);
  EXPECT_FALSE(cfg->tie_word_embeddings);
  EXPECT_FALSE(cfg->attention_bias);
  EXPECT_FALSE(cfg->mlp_bias);
  EXPECT_EQ(cfg->bos_token_id, 1);
  EXPECT_EQ(cfg->eos_token_ids, std::vector<int32_t>{2});
  EXPECT_EQ(cfg->dtype, DType::kBF16);
  EXPECT_EQ(cfg->rope.type, RopeType::kDefault);
  EXPECT_DOUBLE_EQ(cfg->rope.theta, 10000.0);
  EXPECT_EQ(cfg->quantization_config_json, "");
}

TEST(ModelConfigTest, SharedQuantizedModelKeepsQuantizationConfig) {
  const std::string dir = testing::SharedModel("kjv-llama-12m-gptq-4bit");
  if (!std::filesystem::exists(dir + "/config.json")) GTEST_SKIP() << "no shared fixtures";
  auto cfg = LoadModelConfig(dir);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->dtype, DType::kF16);
  json q = json::parse(cfg->quantization_config_json);
  EXPECT_EQ(q["quant_method"], "gptq");
  EXPECT_EQ(q["bits"], 4);
  EXPECT_EQ(q["group_size"], 128);
}

TEST(ModelConfigTest, Transformers4Llama3Scaling) {
  json j = BaseConfig();
  j["rope_scaling"] = {{"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192},
                       {"rope_type", "llama3"}};
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rope.type, RopeType::kLlama3);
  EXPECT_DOUBLE_EQ(cfg->rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(cfg->rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(cfg->rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(cfg->rope.high_freq_factor, 4.0);
  EXPECT_EQ(cfg->rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(cfg->head_dim, 128);  // 4096 / 32
  EXPECT_EQ(cfg->num_kv_heads, 8);
  EXPECT_EQ(cfg->bos_token_id, 128000);
  EXPECT_EQ(cfg->eos_token_ids, std::vector<int32_t>{128001});
  EXPECT_EQ(RopeTypeName(cfg->rope.type), "llama3");
}

TEST(ModelConfigTest, Transformers5Llama3Scaling) {
  json j = BaseConfig();
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_theta", 500000.0}, {"rope_type", "llama3"},
                          {"factor", 32},           {"low_freq_factor", 1},
                          {"high_freq_factor", 4},  {"original_max_position_embeddings", 8192}};
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rope.type, RopeType::kLlama3);
  EXPECT_DOUBLE_EQ(cfg->rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(cfg->rope.factor, 32.0);
}

TEST(ModelConfigTest, LinearScalingWithOldTypeKey) {
  json j = BaseConfig();
  j["rope_theta"] = 10000;
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 4.0}};
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rope.type, RopeType::kLinear);
  EXPECT_DOUBLE_EQ(cfg->rope.factor, 4.0);
  EXPECT_DOUBLE_EQ(cfg->rope.theta, 10000.0);
  EXPECT_EQ(RopeTypeName(RopeType::kLinear), "linear");
}

TEST(ModelConfigTest, NullRopeScalingIsDefault) {
  json j = BaseConfig();
  j["rope_scaling"] = nullptr;
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->rope.type, RopeType::kDefault);
  EXPECT_DOUBLE_EQ(cfg->rope.theta, 500000.0);
  EXPECT_EQ(RopeTypeName(RopeType::kDefault), "default");
}

TEST(ModelConfigTest, EosList) {
  json j = BaseConfig();
  j["eos_token_id"] = {128001, 128008, 128009, 128001};
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
}

TEST(ModelConfigTest, DefaultsWhenOptionalFieldsAbsent) {
  json j = BaseConfig();
  for (const char* k : {"num_key_value_heads", "max_position_embeddings", "torch_dtype",
                        "rope_theta", "bos_token_id", "eos_token_id", "architectures"}) {
    j.erase(k);
  }
  j["model_type"] = "mistral";
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->architecture, "MistralForCausalLM");
  EXPECT_EQ(cfg->num_kv_heads, 32);
  EXPECT_EQ(cfg->max_position_embeddings, 2048);
  EXPECT_EQ(cfg->dtype, DType::kBF16);
  EXPECT_DOUBLE_EQ(cfg->rope.theta, 10000.0);
  EXPECT_EQ(cfg->bos_token_id, -1);
  EXPECT_TRUE(cfg->eos_token_ids.empty());
}

TEST(ModelConfigTest, MistralArchitectureAndExplicitHeadDim) {
  json j = BaseConfig();
  j["architectures"] = {"MistralForCausalLM"};
  j.erase("model_type");
  j["hidden_size"] = 5120;
  j["head_dim"] = 128;  // 40 x 128 != 5120, as in Mistral-Nemo
  j["num_attention_heads"] = 32;
  j["dtype"] = "float16";
  j["tie_word_embeddings"] = true;
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->architecture, "MistralForCausalLM");
  EXPECT_EQ(cfg->model_type, "mistral");
  EXPECT_EQ(cfg->head_dim, 128);
  EXPECT_EQ(cfg->dtype, DType::kF16);  // "dtype" wins over "torch_dtype"
  EXPECT_TRUE(cfg->tie_word_embeddings);
}

TEST(ModelConfigTest, MissingNumHiddenLayers) {
  json j = BaseConfig();
  j.erase("num_hidden_layers");
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "'num_hidden_layers'", "hidden_size", "intermediate_size",
               "num_attention_heads", "vocab_size"});
}

TEST(ModelConfigTest, MissingArchitectureAndModelType) {
  json j = BaseConfig();
  j.erase("architectures");
  j.erase("model_type");
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument, {"cfg.json", "architectures"});
}

TEST(ModelConfigTest, UnsupportedArchitecture) {
  json j = BaseConfig();
  j["architectures"] = {"GPT2LMHeadModel"};
  ExpectError(Parse(j).status(), absl::StatusCode::kUnimplemented,
              {"cfg.json", "GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM"});
}

TEST(ModelConfigTest, UnsupportedRopeType) {
  json j = BaseConfig();
  j["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  ExpectError(Parse(j).status(), absl::StatusCode::kUnimplemented,
              {"cfg.json", "rope_scaling", "'yarn'", "default, linear, llama3"});
}

TEST(ModelConfigTest, UnsupportedRopeTypeInRopeParameters) {
  json j = BaseConfig();
  j["rope_parameters"] = {{"rope_type", "dynamic"}, {"rope_theta", 10000.0}, {"factor", 2.0}};
  ExpectError(Parse(j).status(), absl::StatusCode::kUnimplemented,
              {"cfg.json", "rope_parameters", "'dynamic'", "llama3"});
}

TEST(ModelConfigTest, Llama3ScalingMissingField) {
  json j = BaseConfig();
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"original_max_position_embeddings", 8192}};
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "rope_scaling", "'high_freq_factor'"});
}

TEST(ModelConfigTest, WrongFieldType) {
  json j = BaseConfig();
  j["hidden_size"] = "4096";
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "'hidden_size'", "integer", "string"});
}

TEST(ModelConfigTest, HeadsNotMultipleOfKvHeads) {
  json j = BaseConfig();
  j["num_key_value_heads"] = 5;
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "num_attention_heads (32)", "num_key_value_heads (5)"});
}

TEST(ModelConfigTest, HiddenNotDivisibleByHeads) {
  json j = BaseConfig();
  j["hidden_size"] = 4000;
  j["num_attention_heads"] = 24;
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "hidden_size (4000)", "num_attention_heads (24)", "head_dim"});
}

TEST(ModelConfigTest, NonPositiveSize) {
  json j = BaseConfig();
  j["intermediate_size"] = 0;
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "intermediate_size", "positive"});
}

TEST(ModelConfigTest, EosOutsideVocabulary) {
  json j = BaseConfig();
  j["eos_token_id"] = {128001, 200000};
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "eos_token_id 200000", "128256"});
}

TEST(ModelConfigTest, BadDType) {
  json j = BaseConfig();
  j["torch_dtype"] = "complex64";
  ExpectError(Parse(j).status(), absl::StatusCode::kInvalidArgument,
              {"cfg.json", "torch_dtype", "complex64"});
}

TEST(ModelConfigTest, MalformedJson) {
  ExpectError(ParseModelConfig(R"({"hidden_size": 3,)", "broken.json").status(),
              absl::StatusCode::kInvalidArgument, {"broken.json", "malformed JSON"});
}

TEST(ModelConfigTest, QuantizationConfigKeptVerbatim) {
  json j = BaseConfig();
  j["quantization_config"] = {{"quant_method", "awq"}, {"bits", 4}, {"group_size", 128}};
  auto cfg = Parse(j);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(json::parse(cfg->quantization_config_json), j["quantization_config"]);
}

TEST(ModelConfigTest, GenerationConfigEosMerge) {
  const std::string dir = testing::MakeTempDir("qshard-cfg");
  json j = BaseConfig();
  j["eos_token_id"] = {128001, 128008};
  WriteText(dir + "/config.json", j.dump());
  WriteText(dir + "/generation_config.json",
            R"({"bos_token_id": 128000, "eos_token_id": [128009, 128001, 128009]})");
  auto cfg = LoadModelConfig(dir);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
}

TEST(ModelConfigTest, GenerationConfigSingleEosAddsToEmpty) {
  const std::string dir = testing::MakeTempDir("qshard-cfg");
  json j = BaseConfig();
  j.erase("eos_token_id");
  WriteText(dir + "/config.json", j.dump());
  WriteText(dir + "/generation_config.json", R"({"eos_token_id": 7})");
  auto cfg = LoadModelConfig(dir);
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_EQ(cfg->eos_token_ids, std::vector<int32_t>{7});
}

TEST(ModelConfigTest, MalformedGenerationConfigNamesIt) {
  const std::string dir = testing::MakeTempDir("qshard-cfg");
  WriteText(dir + "/config.json", BaseConfig().dump());
  WriteText(dir + "/generation_config.json", "{oops");
  ExpectError(LoadModelConfig(dir).status(), absl::StatusCode::kInvalidArgument,
              {"generation_config.json", "malformed JSON"});
}

TEST(ModelConfigTest, MissingConfigJson) {
  const std::string dir = testing::MakeTempDir("qshard-cfg");
  ExpectError(LoadModelConfig(dir).status(), absl::StatusCode::kNotFound, {dir, "config.json"});
}

TEST(ModelConfigTest, LoadNamesConfigPathInErrors) {
  const std::string dir = testing::MakeTempDir("qshard-cfg");
  json j = BaseConfig();
  j.erase("vocab_size");
  WriteText(dir + "/config.json", j.dump());
  ExpectError(LoadModelConfig(dir).status(), absl::StatusCode::kInvalidArgument,
              {dir + "/config.json", "'vocab_size'"});
}

}  // namespace
}  // namespace qshard
