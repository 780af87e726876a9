// The `qshard` executable end to end: generate / inspect on the embedded model, flag
// errors, and one test per kind of bad model directory. Each bad input must exit non-zero
// with a message naming the problem, and never crash.
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

std::string EmbeddedModel() { return ::qshard::testing::SourceDir() + "/models/kjv-llama-12m"; }

// A private copy of the embedded model to damage.
std::string CopyModel() {
  const std::string dir = ::qshard::testing::MakeTempDir("qshard-model") + "/m";
  fs::copy(EmbeddedModel(), dir, fs::copy_options::recursive);
  return dir;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteAll(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

// A safetensors file split into its JSON header and data area.
struct Shard {
  nlohmann::json header;
  std::string data;
};

Shard ReadShard(const std::string& path) {
  const std::string bytes = ReadAll(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  return {nlohmann::json::parse(bytes.substr(8, n)), bytes.substr(8 + n)};
}

void WriteShard(const std::string& path, const Shard& s) {
  std::string h = s.header.dump();
  while (h.size() % 8) h += ' ';
  uint64_t n = h.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  WriteAll(path, out + h + s.data);
}

// The shard holding `tensor`, per the index.
std::string ShardOf(const std::string& dir, const std::string& tensor) {
  auto index = nlohmann::json::parse(ReadAll(dir + "/model.safetensors.index.json"));
  return dir + "/" + index["weight_map"][tensor].get<std::string>();
}

CliResult Generate(const std::string& model) {
  return RunQshard({"generate", "--model", model, "--prompt", "In the beginning", "--max-tokens",
                    "2", "--device", "cpu"});
}

void ExpectCleanFailure(const CliResult& r, const std::vector<std::string>& words) {
  EXPECT_FALSE(r.signaled) << "crashed with signal " << r.signal << "\n" << r.err;
  EXPECT_NE(r.exit_code, 0) << r.err;
  for (const auto& w : words) EXPECT_NE(r.err.find(w), std::string::npos) << "'" << w << "' not in: " << r.err;
}

TEST(CliTest, GenerateGreedyPrintsReferenceText) {
  auto ref = ::qshard::testing::LoadReference(::qshard::testing::SharedModel("kjv-llama-12m"));
  ASSERT_FALSE(ref.is_null());
  for (const auto& p : ref["prompts"]) {
    CliResult r = RunQshard({"generate", "--model", EmbeddedModel(), "--prompt",
                             p["prompt"].get<std::string>(), "--temperature", "0", "--max-tokens",
                             "48", "--device", "cpu"});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    // stdout holds only the generated text (+ a final newline); logs go to stderr.
    EXPECT_EQ(r.out, " " + p["greedy_text"].get<std::string>() + "\n");
  }
}

TEST(CliTest, SeededSamplingIsReproducible) {
  std::vector<std::string> args = {"generate", "--model", EmbeddedModel(), "--prompt", "And God",
                                   "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95",
                                   "--seed", "1234", "--max-tokens", "24", "--device", "cpu"};
  CliResult a = RunQshard(args), b = RunQshard(args);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  args[13] = "99";  // another seed
  CliResult c = RunQshard(args);
  EXPECT_NE(a.out, c.out);
}

TEST(CliTest, InspectJsonDescribesTheModel) {
  CliResult r = RunQshard({"inspect", "--model", EmbeddedModel(), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(j["num_parameters"], 12587904);  // the fixture's train_params
  EXPECT_EQ(j["total_weight_bytes"], 2 * 12587904);
  EXPECT_EQ(j["bytes_per_dtype"]["bfloat16"], 2 * 12587904);
  EXPECT_EQ(j["rope"]["type"], "default");
  EXPECT_EQ(j["rope"]["theta"], 10000.0);
  CliResult text = RunQshard({"inspect", "--model", EmbeddedModel()});
  ASSERT_EQ(text.exit_code, 0);
  EXPECT_NE(text.out.find("parameters:"), std::string::npos);
}

TEST(CliTest, EveryCommandHasHelp) {
  for (const char* cmd : {"generate", "eval-ppl", "inspect", "bench"}) {
    CliResult r = RunQshard({cmd, "--help"});
    EXPECT_EQ(r.exit_code, 0) << cmd;
    EXPECT_NE(r.out.find("usage: qshard"), std::string::npos) << cmd;
  }
}

TEST(CliTest, UnknownFlagIsAnError) {
  CliResult r = RunQshard({"generate", "--model", EmbeddedModel(), "--prompt", "x", "--bogus", "1"});
  ExpectCleanFailure(r, {"unknown flag '--bogus'"});
  r = RunQshard({"nonsense"});
  ExpectCleanFailure(r, {"unknown command 'nonsense'"});
  r = RunQshard({"generate", "--model", EmbeddedModel(), "--prompt", "x", "--max-tokens", "abc"});
  ExpectCleanFailure(r, {"--max-tokens", "integer"});
  r = RunQshard({"generate", "--prompt", "x"});
  ExpectCleanFailure(r, {"--model"});
}

TEST(CliTest, InvalidSamplingIsAnError) {
  CliResult r = RunQshard({"generate", "--model", EmbeddedModel(), "--prompt", "x", "--top-p", "1.5",
                           "--device", "cpu"});
  ExpectCleanFailure(r, {"top_p"});
}

// ---- Bad model directories ------------------------------------------------

TEST(BadCheckpointTest, TruncatedShard) {
  const std::string dir = CopyModel();
  const std::string shard = dir + "/model-00002-of-00003.safetensors";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  ExpectCleanFailure(Generate(dir), {"model-00002-of-00003.safetensors"});
}

TEST(BadCheckpointTest, HeaderLengthPastEndOfFile) {
  const std::string dir = CopyModel();
  const std::string shard = dir + "/model-00001-of-00003.safetensors";
  std::string bytes = ReadAll(shard);
  uint64_t huge = bytes.size() + 1000;
  std::memcpy(bytes.data(), &huge, 8);
  WriteAll(shard, bytes);
  ExpectCleanFailure(Generate(dir), {"model-00001-of-00003.safetensors", "header"});
}

TEST(BadCheckpointTest, OverlappingOffsets) {
  const std::string dir = CopyModel();
  const std::string shard = ShardOf(dir, "model.norm.weight");
  Shard s = ReadShard(shard);
  // Move a tensor on top of another one of the same size.
  std::string a, b;
  for (auto& [x, xi] : s.header.items()) {
    for (auto& [y, yi] : s.header.items()) {
      if (b.empty() && x != y && x != "__metadata__" && y != "__metadata__" &&
          xi["shape"] == yi["shape"] && xi["dtype"] == yi["dtype"]) {
        a = x;
        b = y;
      }
    }
  }
  ASSERT_FALSE(b.empty());
  s.header[b]["data_offsets"] = s.header[a]["data_offsets"];
  WriteShard(shard, s);
  ExpectCleanFailure(Generate(dir), {"overlap", b});
}

TEST(BadCheckpointTest, ByteLengthDoesNotMatchShape) {
  const std::string dir = CopyModel();
  const std::string shard = ShardOf(dir, "model.norm.weight");
  Shard s = ReadShard(shard);
  s.header["model.norm.weight"]["shape"] = {383};
  WriteShard(shard, s);
  ExpectCleanFailure(Generate(dir), {"model.norm.weight", "bytes"});
}

TEST(BadCheckpointTest, IndexNamesMissingFile) {
  const std::string dir = CopyModel();
  auto index = nlohmann::json::parse(ReadAll(dir + "/model.safetensors.index.json"));
  index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors";
  WriteAll(dir + "/model.safetensors.index.json", index.dump(1));
  ExpectCleanFailure(Generate(dir), {"model-00009-of-00009.safetensors"});
}

TEST(BadCheckpointTest, MissingTensor) {
  const std::string dir = CopyModel();
  const std::string name = "model.layers.3.mlp.up_proj.weight";
  const std::string shard = ShardOf(dir, name);
  Shard s = ReadShard(shard);
  s.header.erase(name);
  WriteShard(shard, s);
  auto index = nlohmann::json::parse(ReadAll(dir + "/model.safetensors.index.json"));
  index["weight_map"].erase(name);
  WriteAll(dir + "/model.safetensors.index.json", index.dump(1));
  ExpectCleanFailure(Generate(dir), {"missing tensor", name});
}

TEST(BadCheckpointTest, WrongShape) {
  const std::string dir = CopyModel();
  const std::string shard = ShardOf(dir, "model.norm.weight");
  Shard s = ReadShard(shard);
  s.header["model.norm.weight"]["shape"] = {192, 2};  // same bytes, wrong shape
  WriteShard(shard, s);
  ExpectCleanFailure(Generate(dir), {"model.norm.weight", "[192, 2]", "[384]"});
}

TEST(BadCheckpointTest, ConfigWithoutNumHiddenLayers) {
  const std::string dir = CopyModel();
  auto cfg = nlohmann::json::parse(ReadAll(dir + "/config.json"));
  cfg.erase("num_hidden_layers");
  WriteAll(dir + "/config.json", cfg.dump(1));
  ExpectCleanFailure(Generate(dir), {"num_hidden_layers", "config.json"});
}

TEST(BadCheckpointTest, UnsupportedArchitecture) {
  const std::string dir = CopyModel();
  auto cfg = nlohmann::json::parse(ReadAll(dir + "/config.json"));
  cfg["architectures"] = {"GPT2LMHeadModel"};
  WriteAll(dir + "/config.json", cfg.dump(1));
  ExpectCleanFailure(Generate(dir), {"GPT2LMHeadModel", "LlamaForCausalLM"});
}

TEST(BadCheckpointTest, MissingTokenizerModel) {
  const std::string dir = CopyModel();
  fs::remove(dir + "/tokenizer.model");
  ExpectCleanFailure(Generate(dir), {"tokenizer.model"});
}

TEST(BadCheckpointTest, UnexpectedTensor) {
  const std::string dir = CopyModel();
  const std::string shard = ShardOf(dir, "model.norm.weight");
  Shard s = ReadShard(shard);
  s.header["model.extra.weight"] = s.header["model.norm.weight"];
  s.header["model.extra.weight"]["data_offsets"] = {s.data.size(), s.data.size() + 768};
  s.data += std::string(768, '\0');
  WriteShard(shard, s);
  auto index = nlohmann::json::parse(ReadAll(dir + "/model.safetensors.index.json"));
  index["weight_map"]["model.extra.weight"] = fs::path(shard).filename().string();
  WriteAll(dir + "/model.safetensors.index.json", index.dump(1));
  ExpectCleanFailure(Generate(dir), {"unexpected tensor", "model.extra.weight"});
}

}  // namespace
}  // namespace qshard
