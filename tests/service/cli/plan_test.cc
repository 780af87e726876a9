// `qshard plan` end to end: JSON numbers for a named shape, weights of the fixture
// checkpoints against the bytes their safetensors files actually hold, and flag errors.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/cli_runner.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

namespace fs = std::filesystem;
using ::qshard::testing::CliResult;
using ::qshard::testing::QshardBinary;
using ::qshard::testing::RunQshard;

#define SKIP_WITHOUT_BINARY()                          \
  if (!fs::exists(QshardBinary())) {                   \
    GTEST_SKIP() << QshardBinary() << " is not built"; \
  }

nlohmann::json RunJson(const std::vector<std::string>& args) {
  CliResult r = RunQshard(args);
  EXPECT_FALSE(r.signaled);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json j = nlohmann::json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_TRUE(j.is_object()) << r.out << r.err;
  return j;
}

TEST(PlanCliTest, Llama31_8BOn80GBJson) {
  SKIP_WITHOUT_BINARY();
  nlohmann::json j = RunJson({"plan", "--shape", "llama-3.1-8b", "--device-memory", "80GB",
                              "--max-model-len", "8192", "--max-num-seqs", "16", "--json"});
  for (const char* key : {"weights_bytes", "kv_bytes_per_token", "kv_bytes_total",
                          "activation_bytes", "total_bytes", "fits", "max_concurrent_seqs"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  // 8,030,261,248 parameters in bf16.
  EXPECT_EQ(j["weights_bytes"].get<int64_t>(), 16'060'522'496);
  EXPECT_EQ(j["weights"]["scales_bytes"].get<int64_t>(), 0);
  // 2 x 32 layers x 8 KV heads x 128 x 2 bytes.
  EXPECT_EQ(j["kv_bytes_per_token"].get<int64_t>(), 131'072);
  EXPECT_EQ(j["kv_bytes_total"].get<int64_t>(), 16LL * 8192 * 131'072);
  EXPECT_EQ(j["device_memory_bytes"].get<int64_t>(), 80'000'000'000);
  EXPECT_EQ(j["budget_bytes"].get<int64_t>(), 72'000'000'000);
  const int64_t act = j["activation_bytes"].get<int64_t>();
  EXPECT_GT(act, 256LL << 20);  // at least the GPU workspace
  EXPECT_LT(act, 2'000'000'000);
  EXPECT_EQ(j["total_bytes"].get<int64_t>(),
            j["weights_bytes"].get<int64_t>() + j["kv_bytes_total"].get<int64_t>() + act);
  EXPECT_TRUE(j["fits"].get<bool>());
  // Sequences of 8192 tokens (512 blocks of 16 x 128 KiB) in what weights and activations
  // leave of 72 GB.
  const int64_t left = 72'000'000'000 - 16'060'522'496 - act;
  EXPECT_EQ(j["num_kv_blocks"].get<int64_t>(), left / (16 * 131'072));
  EXPECT_EQ(j["max_concurrent_seqs"].get<int64_t>(), left / (16 * 131'072) / 512);
  EXPECT_EQ(j["max_concurrent_seqs"].get<int64_t>(), 51);

  // fp8 weights and KV: weights about halve, the KV per token exactly halves, and about twice
  // the sequences fit.
  nlohmann::json f = RunJson({"plan", "--shape", "llama-3.1-8b", "--device-memory", "80GB",
                              "--max-model-len", "8192", "--max-num-seqs", "16", "--quantization",
                              "fp8", "--kv-cache-dtype", "fp8", "--json"});
  EXPECT_EQ(f["weight_format"], "fp8");
  EXPECT_EQ(f["kv_cache_dtype"], "float8_e4m3fn");
  EXPECT_EQ(f["kv_bytes_per_token"].get<int64_t>(), 65'536);
  EXPECT_EQ(f["weights"]["quantized_bytes"].get<int64_t>(), 6'979'321'856);
  EXPECT_GT(f["weights"]["scales_bytes"].get<int64_t>(), 0);
  EXPECT_GT(f["max_concurrent_seqs"].get<int64_t>(), 2 * 51);
}

TEST(PlanCliTest, TextTableNamesEveryPart) {
  SKIP_WITHOUT_BINARY();
  CliResult r = RunQshard({"plan", "--shape", "llama-3.1-70b", "--device-memory", "80GB",
                           "--quantization", "awq", "--max-model-len", "4096"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* text : {"weights", "scales", "zero points", "unquantized", "KV cache per token",
                           "activations", "total", "fits: yes", "max concurrent sequences"}) {
    EXPECT_NE(r.out.find(text), std::string::npos) << text << "\n" << r.out;
  }
  // 70B in fp16 does not fit on one 80 GB device.
  r = RunQshard({"plan", "--shape", "llama-3.1-70b", "--device-memory", "80GB"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("fits: no"), std::string::npos) << r.out;
}

// Sums the tensor bytes of a checkpoint's safetensors files by the last part of the tensor
// name ("qweight", "scales", ...), or "16bit" for embeddings, lm_head, norms and biases.
std::map<std::string, int64_t> TensorBytes(const std::string& dir) {
  std::map<std::string, int64_t> out;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    std::ifstream in(entry.path(), std::ios::binary);
    uint64_t n = 0;
    in.read(reinterpret_cast<char*>(&n), 8);
    std::string header(n, '\0');
    in.read(header.data(), static_cast<std::streamsize>(n));
    const nlohmann::json tensors = nlohmann::json::parse(header);
    for (const auto& [name, t] : tensors.items()) {
      if (name == "__metadata__") continue;
      const int64_t bytes =
          t["data_offsets"][1].get<int64_t>() - t["data_offsets"][0].get<int64_t>();
      const std::string leaf = name.substr(name.rfind('.') + 1);
      const bool linear = name.find("_proj.") != std::string::npos && leaf != "bias";
      out[linear ? leaf : "16bit"] += bytes;
    }
  }
  return out;
}

// The planner's weight bytes for the fixture checkpoints equal what their files hold, except
// what is never resident: the constant qzeros of symmetric GPTQ and the g_idx of a checkpoint
// without act-order.
TEST(PlanCliTest, FixtureWeightsMatchTheirFiles) {
  SKIP_WITHOUT_BINARY();
  struct Case {
    std::string dir;
    std::string format;
  };
  const std::vector<Case> cases = {
      {::qshard::testing::SourceDir() + "/models/kjv-llama-12m", "none"},
      {::qshard::testing::SharedModel("kjv-llama-12m-gptq-4bit"), "gptq"},
      {::qshard::testing::SharedModel("kjv-llama-12m-awq-4bit"), "awq"},
      {::qshard::testing::SharedModel("kjv-llama-12m-fp8-dynamic"), "fp8"},
  };
  int checked = 0;
  for (const Case& c : cases) {
    if (!fs::exists(c.dir + "/config.json")) continue;
    SCOPED_TRACE(c.dir);
    nlohmann::json j = RunJson({"plan", "--model", c.dir, "--device-memory", "16GB", "--json"});
    EXPECT_EQ(j["weight_format"], c.format);
    EXPECT_EQ(j["weight_format_source"], c.format == "none" ? "checkpoint dtype" : "checkpoint");
    std::map<std::string, int64_t> file = TensorBytes(c.dir);
    const nlohmann::json& w = j["weights"];
    if (c.format == "none") {
      EXPECT_EQ(w["quantized_bytes"].get<int64_t>(), file["weight"]);
    } else if (c.format == "fp8") {
      EXPECT_EQ(w["quantized_bytes"].get<int64_t>(), file["weight"]);
      EXPECT_EQ(w["scales_bytes"].get<int64_t>(), file["weight_scale"]);
    } else {
      EXPECT_EQ(w["quantized_bytes"].get<int64_t>(), file["qweight"]);
      EXPECT_EQ(w["scales_bytes"].get<int64_t>(), file["scales"]);
      EXPECT_EQ(w["zero_points_bytes"].get<int64_t>(), c.format == "awq" ? file["qzeros"] : 0);
    }
    EXPECT_EQ(w["unquantized_bytes"].get<int64_t>(), file["16bit"]);
    ++checked;
  }
  EXPECT_GE(checked, 1);

  // --quantization on a bf16 checkpoint plans the online format.
  nlohmann::json j = RunJson({"plan", "--model", cases[0].dir, "--device-memory", "16GB",
                              "--quantization", "int8", "--json"});
  EXPECT_EQ(j["weight_format"], "int8");
  EXPECT_EQ(j["weights"]["quantized_bytes"].get<int64_t>() * 2,
            TensorBytes(cases[0].dir)["weight"]);
}

TEST(PlanCliTest, ByteSizeSpellings) {
  SKIP_WITHOUT_BINARY();
  for (const auto& [text, bytes] : std::vector<std::pair<std::string, int64_t>>{
           {"80GB", 80'000'000'000}, {"80G", 80LL << 30}, {"85899345920", 85'899'345'920}}) {
    nlohmann::json j =
        RunJson({"plan", "--shape", "llama-3.2-1b", "--device-memory", text, "--json"});
    EXPECT_EQ(j["device_memory_bytes"].get<int64_t>(), bytes) << text;
  }
}

TEST(PlanCliTest, Errors) {
  SKIP_WITHOUT_BINARY();
  auto expect_fail = [](const std::vector<std::string>& args, const std::string& needle) {
    CliResult r = RunQshard(args);
    EXPECT_FALSE(r.signaled);
    EXPECT_NE(r.exit_code, 0) << needle;
    EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
  };
  // Unknown shape: names the flag and lists the known shapes.
  expect_fail({"plan", "--shape", "llama-9b", "--device-memory", "80GB"}, "--shape");
  expect_fail({"plan", "--shape", "llama-9b", "--device-memory", "80GB"}, "llama-3.1-8b");
  expect_fail({"plan", "--shape", "llama-3.1-8b"}, "--device-memory");
  expect_fail({"plan", "--shape", "llama-3.1-8b", "--device-memory", "lots"}, "--device-memory");
  expect_fail({"plan", "--device-memory", "80GB"}, "--shape");
  expect_fail({"plan", "--shape", "llama-3.1-8b", "--device-memory", "80GB",
               "--gpu-memory-utilization", "1.5"},
              "--gpu-memory-utilization");
  expect_fail(
      {"plan", "--shape", "llama-3.1-8b", "--device-memory", "80GB", "--quantization", "int3"},
      "--quantization");
  expect_fail(
      {"plan", "--shape", "llama-3.1-8b", "--device-memory", "80GB", "--kv-cache-dtype", "fp4"},
      "--kv-cache-dtype");
  expect_fail({"plan", "--shape", "llama-3.1-8b", "--device-memory", "80GB", "--quantization",
               "gptq", "--bits", "3"},
              "--bits");
  expect_fail({"plan", "--shape", "llama-3.1-8b", "--device-memory", "80GB", "--max-num-seqs", "0"},
              "--max-num-seqs");
  expect_fail({"plan", "--model", "/nonexistent/model", "--device-memory", "80GB"},
              "/nonexistent/model");
}

}  // namespace
}  // namespace qshard
