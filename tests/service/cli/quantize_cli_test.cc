// `qshard quantize` through the executable: flag and input errors (exit 1, a message naming
// what was wrong, nothing written), and the fast methods (rtn, fp8, int8) producing
// checkpoints that load back with the layout and metadata other servers read.
// The calibrated methods' perplexity targets are in tests/service/slow/quantize_ppl_test.cc.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cli_runner.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

namespace fs = std::filesystem;
using ::qshard::testing::CliResult;
using ::qshard::testing::RunQshard;

std::string BaseModel() { return ::qshard::testing::SourceDir() + "/models/kjv-llama-12m"; }
std::string Calib() { return ::qshard::testing::SharedDir() + "/data/kjv-calib.txt"; }

nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

// The JSON header of a safetensors file: tensor name -> {dtype, shape, data_offsets}.
nlohmann::json SafetensorsHeader(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  std::string h(n, '\0');
  in.read(h.data(), static_cast<std::streamsize>(n));
  return nlohmann::json::parse(h);
}

struct ErrorCase {
  std::string name;
  std::vector<std::string> args;  // after "quantize --out OUT"
  std::string message;            // must appear in stderr
};

class QuantizeErrorTest : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(QuantizeErrorTest, ExitsWithMessageAndWritesNothing) {
  const std::string tmp = ::qshard::testing::MakeTempDir("qshard-quantize-err");
  const std::string out = tmp + "/out";
  std::vector<std::string> args = {"quantize", "--out", out};
  args.insert(args.end(), GetParam().args.begin(), GetParam().args.end());
  const CliResult r = RunQshard(args);
  EXPECT_FALSE(r.signaled) << "signal " << r.signal;
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find(GetParam().message), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(out)) << "an output was left behind";
  EXPECT_FALSE(fs::exists(out + ".tmp-qshard")) << "a temporary folder was left behind";
}

INSTANTIATE_TEST_SUITE_P(
    Flags, QuantizeErrorTest,
    ::testing::Values(
        ErrorCase{"unknown_method", {"--model", BaseModel(), "--method", "squeeze"},
                  "--method: unknown value 'squeeze'"},
        ErrorCase{"gptq_without_calib", {"--model", BaseModel(), "--method", "gptq"},
                  "needs --calib"},
        ErrorCase{"bits_3", {"--model", BaseModel(), "--method", "rtn", "--bits", "3"},
                  "--bits 3: expected 4 or 8"},
        ErrorCase{"awq_8bit",
                  {"--model", BaseModel(), "--method", "awq", "--bits", "8", "--calib", Calib()},
                  "4-bit weights only"},
        ErrorCase{"group_size_100",
                  {"--model", BaseModel(), "--method", "rtn", "--group-size", "100"},
                  "--group-size 100"},
        ErrorCase{"sym_and_asym", {"--model", BaseModel(), "--method", "rtn", "--sym", "--asym"},
                  "contradict"},
        ErrorCase{"desc_act_rtn", {"--model", BaseModel(), "--method", "rtn", "--desc-act"},
                  "--desc-act applies to --method gptq only"},
        ErrorCase{"fp8_asym", {"--model", BaseModel(), "--method", "fp8", "--asym"},
                  "symmetric per channel"},
        ErrorCase{"missing_calib_file",
                  {"--model", BaseModel(), "--method", "gptq", "--calib", "/nonexistent/calib.txt"},
                  "/nonexistent/calib.txt"},
        ErrorCase{"already_quantized",
                  {"--model", ::qshard::testing::SharedModel("kjv-llama-12m-gptq-4bit"),
                   "--method", "rtn"},
                  "is already quantized"},
        ErrorCase{"missing_model", {"--model", "/nonexistent/model", "--method", "rtn"},
                  "/nonexistent/model"}),
    [](const ::testing::TestParamInfo<ErrorCase>& info) { return info.param.name; });

TEST(QuantizeCliTest, RefusesToOverwriteANonEmptyOutput) {
  const std::string out = ::qshard::testing::MakeTempDir("qshard-quantize-exists");
  { std::ofstream(out + "/keep.txt") << "precious"; }
  const CliResult r =
      RunQshard({"quantize", "--model", BaseModel(), "--out", out, "--method", "fp8"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_NE(r.err.find("refusing to overwrite"), std::string::npos) << r.err;
  EXPECT_TRUE(fs::exists(out + "/keep.txt"));
  EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
}

// The written checkpoint: config, tensor layout, tokenizer files; and it loads back.
struct FastCase {
  std::string method;
  std::string quant_method;            // quantization_config.quant_method
  std::string weight_suffix;           // a tensor every quantized linear has
  std::string weight_dtype;            // its safetensors dtype
  std::vector<int64_t> q_proj_shape;   // that tensor's shape for layer 0's q_proj [384, 384]
};

class QuantizeFastTest : public ::testing::TestWithParam<FastCase> {};

TEST_P(QuantizeFastTest, WritesALoadableCheckpointInTheFormatsLayout) {
  const FastCase& c = GetParam();
  const std::string out = ::qshard::testing::MakeTempDir("qshard-quantize-" + c.method) + "/q";
  const CliResult r =
      RunQshard({"quantize", "--model", BaseModel(), "--out", out, "--method", c.method});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("linears quantized: 42"), std::string::npos) << r.out;  // 6 layers x 7
  EXPECT_NE(r.err.find("layer 6 of 6"), std::string::npos) << "progress lines: " << r.err;

  const nlohmann::json cfg = ReadJson(out + "/config.json");
  ASSERT_TRUE(cfg.contains("quantization_config"));
  EXPECT_EQ(cfg["quantization_config"]["quant_method"], c.quant_method);
  EXPECT_EQ(cfg["hidden_size"], 384);  // the rest of the config is kept
  for (const char* f : {"tokenizer.model", "tokenizer_config.json", "generation_config.json"}) {
    EXPECT_TRUE(fs::exists(out + "/" + f)) << f;
  }
  EXPECT_FALSE(fs::exists(out + "/reference.json"));  // outputs of another model: not copied

  const nlohmann::json h = SafetensorsHeader(out + "/model.safetensors");
  const std::string q = "model.layers.0.self_attn.q_proj";
  ASSERT_TRUE(h.contains(q + c.weight_suffix)) << h.dump();
  EXPECT_EQ(h[q + c.weight_suffix]["dtype"], c.weight_dtype);
  EXPECT_EQ(h[q + c.weight_suffix]["shape"].get<std::vector<int64_t>>(), c.q_proj_shape);
  EXPECT_FALSE(h.contains(q + ".weight") && c.weight_suffix != ".weight");
  // lm_head and embeddings stay 16-bit.
  EXPECT_EQ(h["lm_head.weight"]["dtype"], "BF16");
  EXPECT_EQ(h["model.embed_tokens.weight"]["dtype"], "BF16");

  // Loads back: inspect reports the format, generate runs.
  const CliResult ins = RunQshard({"inspect", "--model", out, "--json"});
  ASSERT_EQ(ins.exit_code, 0) << ins.err;
  const nlohmann::json j = nlohmann::json::parse(ins.out);
  EXPECT_EQ(j["quantization_method"], c.quant_method == "compressed-tensors"
                                          ? "compressed-tensors"
                                          : c.quant_method);
  const CliResult base = RunQshard({"inspect", "--model", BaseModel(), "--json"});
  ASSERT_EQ(base.exit_code, 0) << base.err;
  EXPECT_EQ(j["num_parameters"], nlohmann::json::parse(base.out)["num_parameters"])
      << "the parameter count must not change";
  EXPECT_LT(j["total_weight_bytes"].get<int64_t>(),
            nlohmann::json::parse(base.out)["total_weight_bytes"].get<int64_t>());
  const CliResult gen = RunQshard({"generate", "--model", out, "--device", "cpu", "--prompt",
                                   "In the beginning", "--max-tokens", "8", "--temperature", "0"});
  ASSERT_EQ(gen.exit_code, 0) << gen.err;
  EXPECT_FALSE(gen.out.empty());
}

INSTANTIATE_TEST_SUITE_P(
    Methods, QuantizeFastTest,
    ::testing::Values(FastCase{"rtn", "gptq", ".qweight", "I32", {384 / 8, 384}},
                      FastCase{"fp8", "compressed-tensors", ".weight", "F8_E4M3", {384, 384}},
                      FastCase{"int8", "compressed-tensors", ".weight", "I8", {384, 384}}),
    [](const ::testing::TestParamInfo<FastCase>& info) { return info.param.method; });

}  // namespace
}  // namespace qshard
