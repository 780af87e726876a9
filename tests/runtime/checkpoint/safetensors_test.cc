#include "runtime/checkpoint/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <set>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tests/test_support.h"

namespace qshard {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Asserts the status code and that the message names every given piece (file, tensor, ...).
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

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A hand-assembled safetensors file: 8-byte length, header text, data bytes.
std::string RawFile(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  out += header;
  out.append(data_bytes, '\x5a');
  return out;
}

// A host tensor whose bytes are a recognizable pattern (seeded so tensors differ).
Tensor Patterned(DType dtype, Shape shape, int seed) {
  Tensor t = Tensor::Empty(dtype, std::move(shape));
  auto* p = t.data<uint8_t>();
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(i * 7 + seed * 13 + 1);
  return t;
}

std::string TensorBytes(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw()), t.nbytes());
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = testing::MakeTempDir("qshard-st"); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Writes a valid two-tensor file and returns its path.
  std::string WriteTiny(const std::string& name) {
    std::string path = Path(name);
    EXPECT_TRUE(WriteSafetensors(path, {{"b.weight", Patterned(DType::kF32, {2, 3}, 1)},
                                        {"a.bias", Patterned(DType::kBF16, {4}, 2)}})
                    .ok());
    return path;
  }

  std::string dir_;
};

// ---------------------------------------------------------------------------
// Writer / reader round trips
// ---------------------------------------------------------------------------

TEST_F(SafetensorsTest, RoundTripEveryDType) {
  const DType all[] = {DType::kF32,    DType::kF16, DType::kBF16, DType::kF64, DType::kF8E4M3,
                       DType::kF8E5M2, DType::kI8,  DType::kU8,   DType::kI16, DType::kU16,
                       DType::kI32,    DType::kU32, DType::kI64,  DType::kU64, DType::kBool};
  std::vector<std::pair<std::string, Tensor>> tensors;
  int seed = 0;
  for (DType t : all) {
    tensors.emplace_back("t_" + std::string(SafetensorsDTypeName(t)), Patterned(t, {3, 5}, seed++));
  }
  tensors.emplace_back("scalar", Patterned(DType::kF32, {}, 99));
  tensors.emplace_back("empty", Tensor::Empty(DType::kF16, {0, 4}));
  const std::string path = Path("all.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->metadata().at("format"), "pt");
  ASSERT_EQ(file->tensors().size(), tensors.size());
  for (const auto& [name, expected] : tensors) {
    auto got = file->Get(name);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->dtype(), expected.dtype()) << name;
    EXPECT_EQ(got->shape(), expected.shape()) << name;
    EXPECT_EQ(got->device(), Device::kCpu);
    EXPECT_EQ(TensorBytes(*got), TensorBytes(expected)) << name;
  }
}

TEST_F(SafetensorsTest, RoundTripValues) {
  Tensor f = Tensor::Empty(DType::kF32, {4});
  const float fv[] = {1.5f, -2.25f, 3.0e-8f, 65504.0f};
  std::memcpy(f.raw(), fv, sizeof(fv));
  Tensor i = Tensor::Empty(DType::kI64, {2});
  const int64_t iv[] = {-7, int64_t{1} << 40};
  std::memcpy(i.raw(), iv, sizeof(iv));
  const std::string path = Path("values.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, {{"f", f}, {"i", i}}).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  Tensor rf = file->Get("f").value();
  Tensor ri = file->Get("i").value();
  for (int k = 0; k < 4; ++k) EXPECT_EQ(rf.data<float>()[k], fv[k]);
  EXPECT_EQ(ri.data<int64_t>()[0], -7);
  EXPECT_EQ(ri.data<int64_t>()[1], int64_t{1} << 40);
}

TEST_F(SafetensorsTest, WriterLayoutIsSortedContiguousAndAligned) {
  const std::string path = WriteTiny("layout.safetensors");
  const std::string bytes = ReadBytes(path);
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<uint8_t>(bytes[k]);
  EXPECT_EQ((8 + n) % 8, 0u);
  json header = json::parse(bytes.substr(8, n));
  // a.bias sorts first, so it starts the data area and b.weight follows it directly.
  EXPECT_EQ(header["a.bias"]["data_offsets"], json({0, 8}));
  EXPECT_EQ(header["b.weight"]["data_offsets"], json({8, 32}));
  EXPECT_EQ(bytes.size(), 8 + n + 32);
  EXPECT_FALSE(header.contains("__metadata__"));
  // The temporary file was renamed away.
  int files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 1);
}

TEST_F(SafetensorsTest, WriterRejectsDuplicateNames) {
  ExpectError(WriteSafetensors(Path("dup.safetensors"), {{"x", Patterned(DType::kU8, {1}, 0)},
                                                         {"x", Patterned(DType::kU8, {1}, 1)}}),
              absl::StatusCode::kInvalidArgument, {"dup.safetensors", "'x'"});
}

TEST_F(SafetensorsTest, ViewOutlivesFileObject) {
  const std::string path = WriteTiny("alive.safetensors");
  Tensor view;
  {
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    view = file->Get("b.weight").value();
  }
  ASSERT_NE(view.owner(), nullptr);
  EXPECT_EQ(TensorBytes(view), TensorBytes(Patterned(DType::kF32, {2, 3}, 1)));
}

TEST_F(SafetensorsTest, GetMissingTensorNamesIt) {
  auto file = SafetensorsFile::Open(WriteTiny("m.safetensors"));
  ASSERT_TRUE(file.ok());
  ExpectError(file->Get("nope").status(), absl::StatusCode::kNotFound, {"m.safetensors", "'nope'"});
}

TEST_F(SafetensorsTest, ZeroSizeTensorsDoNotOverlap) {
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})";
  WriteBytes(Path("zero.safetensors"), RawFile(header, 8));
  auto file = SafetensorsFile::Open(Path("zero.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->Get("e")->numel(), 0);
}

TEST_F(SafetensorsTest, AcceptsHeaderWithTrailingSpacesAndUnalignedLength) {
  WriteBytes(Path("sp.safetensors"),
             RawFile(R"({"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}   )", 3));
  EXPECT_TRUE(SafetensorsFile::Open(Path("sp.safetensors")).ok());
}

// ---------------------------------------------------------------------------
// One bad input per test
// ---------------------------------------------------------------------------

TEST_F(SafetensorsTest, TruncatedInDataArea) {
  const std::string path = WriteTiny("trunc.safetensors");
  std::string bytes = ReadBytes(path);
  WriteBytes(path, bytes.substr(0, bytes.size() - 5));  // cuts into b.weight (last tensor)
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {"trunc.safetensors", "'b.weight'", "data area", "truncated"});
}

TEST_F(SafetensorsTest, HeaderLengthPastEndOfFile) {
  const std::string path = WriteTiny("hlen.safetensors");
  std::string bytes = ReadBytes(path);
  bytes[0] = '\xff';
  bytes[1] = '\xff';
  bytes[4] = '\x01';
  WriteBytes(path, bytes);
  ExpectError(SafetensorsFile::Open(path).status(), absl::StatusCode::kInvalidArgument,
              {"hlen.safetensors", "header length", "past the end"});
}

TEST_F(SafetensorsTest, HugeHeaderLengthDoesNotWrap) {
  std::string bytes = RawFile("{}", 0);
  for (int i = 0; i < 8; ++i) bytes[i] = '\xff';
  WriteBytes(Path("huge.safetensors"), bytes);
  ExpectError(SafetensorsFile::Open(Path("huge.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"huge.safetensors", "header length"});
}

TEST_F(SafetensorsTest, FileShorterThanEightBytes) {
  WriteBytes(Path("short.safetensors"), std::string("\x02\x00\x00\x00\x00", 5));
  ExpectError(SafetensorsFile::Open(Path("short.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"short.safetensors", "5 bytes"});
}

TEST_F(SafetensorsTest, MissingFileIsNotFound) {
  ExpectError(SafetensorsFile::Open(Path("absent.safetensors")).status(),
              absl::StatusCode::kNotFound, {"absent.safetensors"});
}

TEST_F(SafetensorsTest, MalformedJsonHeader) {
  WriteBytes(Path("bad.safetensors"),
             RawFile(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)", 4));
  ExpectError(SafetensorsFile::Open(Path("bad.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"bad.safetensors", "malformed JSON"});
}

TEST_F(SafetensorsTest, HeaderNotAnObject) {
  WriteBytes(Path("arr.safetensors"), RawFile("[1, 2]", 0));
  ExpectError(SafetensorsFile::Open(Path("arr.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"arr.safetensors", "object", "array"});
}

TEST_F(SafetensorsTest, DuplicateTensorInHeader) {
  WriteBytes(Path("dupkey.safetensors"),
             RawFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                     R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                     2));
  ExpectError(SafetensorsFile::Open(Path("dupkey.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"dupkey.safetensors", "'w'", "more than once"});
}

TEST_F(SafetensorsTest, OverlappingOffsets) {
  WriteBytes(Path("ovl.safetensors"),
             RawFile(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                     R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                     12));
  ExpectError(SafetensorsFile::Open(Path("ovl.safetensors")).status(),
              absl::StatusCode::kInvalidArgument,
              {"ovl.safetensors", "tensor 'b'", "overlap tensor 'a'", "[0, 8]"});
}

TEST_F(SafetensorsTest, ByteLengthDoesNotMatchShapeAndDType) {
  WriteBytes(Path("model.safetensors"),
             RawFile(R"({"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,10]}})", 10));
  ExpectError(SafetensorsFile::Open(Path("model.safetensors")).status(),
              absl::StatusCode::kInvalidArgument,
              {"model.safetensors: tensor 'x': data_offsets [0, 10] hold 10 bytes but shape "
               "[2, 3] x F32 needs 24"});
}

TEST_F(SafetensorsTest, OffsetsBeyondDataArea) {
  WriteBytes(Path("beyond.safetensors"),
             RawFile(R"({"x":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}})", 16));
  ExpectError(SafetensorsFile::Open(Path("beyond.safetensors")).status(),
              absl::StatusCode::kInvalidArgument,
              {"beyond.safetensors", "tensor 'x'", "[0, 24]", "16 bytes"});
}

TEST_F(SafetensorsTest, BeginAfterEnd) {
  WriteBytes(Path("rev.safetensors"),
             RawFile(R"({"x":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})", 8));
  ExpectError(SafetensorsFile::Open(Path("rev.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"rev.safetensors", "tensor 'x'", "begin > end"});
}

TEST_F(SafetensorsTest, BadDTypeString) {
  WriteBytes(Path("dt.safetensors"),
             RawFile(R"({"x":{"dtype":"F13","shape":[1],"data_offsets":[0,4]}})", 4));
  ExpectError(SafetensorsFile::Open(Path("dt.safetensors")).status(),
              absl::StatusCode::kInvalidArgument,
              {"dt.safetensors", "tensor 'x'", "'F13'", "BF16"});
}

TEST_F(SafetensorsTest, DTypeNotAString) {
  WriteBytes(Path("dt2.safetensors"),
             RawFile(R"({"x":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", 4));
  ExpectError(SafetensorsFile::Open(Path("dt2.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"dt2.safetensors", "tensor 'x'", "dtype"});
}

TEST_F(SafetensorsTest, NegativeDimension) {
  WriteBytes(Path("neg.safetensors"),
             RawFile(R"({"x":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", 0));
  ExpectError(SafetensorsFile::Open(Path("neg.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"neg.safetensors", "tensor 'x'", "shape", "-1"});
}

TEST_F(SafetensorsTest, NonIntegerDimension) {
  WriteBytes(Path("flt.safetensors"),
             RawFile(R"({"x":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", 1));
  ExpectError(SafetensorsFile::Open(Path("flt.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"flt.safetensors", "tensor 'x'", "1.5"});
}

TEST_F(SafetensorsTest, ElementCountOverflow) {
  // 2^62 x 2^62 x 4 bytes wraps to 0 in 64 bits; it must not be accepted as an empty tensor.
  WriteBytes(Path("ovf.safetensors"),
             RawFile(R"({"x":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],)"
                     R"("data_offsets":[0,0]}})",
                     0));
  ExpectError(SafetensorsFile::Open(Path("ovf.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"ovf.safetensors", "tensor 'x'", "overflow"});
}

TEST_F(SafetensorsTest, MissingDataOffsets) {
  WriteBytes(Path("nooff.safetensors"), RawFile(R"({"x":{"dtype":"U8","shape":[1]}})", 1));
  ExpectError(SafetensorsFile::Open(Path("nooff.safetensors")).status(),
              absl::StatusCode::kInvalidArgument,
              {"nooff.safetensors", "tensor 'x'", "data_offsets"});
}

TEST_F(SafetensorsTest, MetadataValueNotString) {
  WriteBytes(Path("meta.safetensors"), RawFile(R"({"__metadata__":{"format":1}})", 0));
  ExpectError(SafetensorsFile::Open(Path("meta.safetensors")).status(),
              absl::StatusCode::kInvalidArgument, {"meta.safetensors", "__metadata__", "format"});
}

// ---------------------------------------------------------------------------
// Checkpoint directories
// ---------------------------------------------------------------------------

class CheckpointTest : public SafetensorsTest {
 protected:
  // Two shards: s1 holds "a" and "b", s2 holds "c".
  void WriteShards() {
    ASSERT_TRUE(WriteSafetensors(Path("s1.safetensors"), {{"a", Patterned(DType::kF32, {2, 2}, 1)},
                                                          {"b", Patterned(DType::kBF16, {3}, 2)}})
                    .ok());
    ASSERT_TRUE(
        WriteSafetensors(Path("s2.safetensors"), {{"c", Patterned(DType::kI32, {5}, 3)}}).ok());
  }
  void WriteIndex(const json& weight_map) {
    WriteBytes(Path("model.safetensors.index.json"),
               json({{"metadata", {{"total_size", 42}}}, {"weight_map", weight_map}}).dump(2));
  }
  const json kGoodMap = {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}, {"c", "s2.safetensors"}};
};

TEST_F(CheckpointTest, ShardedHappyPath) {
  WriteShards();
  WriteIndex(kGoodMap);
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->Names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(ckpt->Has("c"));
  EXPECT_FALSE(ckpt->Has("d"));
  ASSERT_NE(ckpt->Find("c"), nullptr);
  EXPECT_EQ(fs::path(ckpt->Find("c")->file).filename(), "s2.safetensors");
  EXPECT_EQ(TensorBytes(ckpt->Get("a").value()), TensorBytes(Patterned(DType::kF32, {2, 2}, 1)));
  EXPECT_EQ(TensorBytes(ckpt->Get("c").value()), TensorBytes(Patterned(DType::kI32, {5}, 3)));
  EXPECT_EQ(ckpt->NumElementsTotal(), 4 + 3 + 5);
  auto bytes = ckpt->BytesPerDType();
  EXPECT_EQ(bytes[DType::kF32], 16u);
  EXPECT_EQ(bytes[DType::kBF16], 6u);
  EXPECT_EQ(bytes[DType::kI32], 20u);
}

TEST_F(CheckpointTest, GetMissingTensorNamesTensorAndDir) {
  WriteShards();
  WriteIndex(kGoodMap);
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  ExpectError(ckpt->Get("lm_head.weight").status(), absl::StatusCode::kNotFound,
              {"'lm_head.weight'", dir_});
}

TEST_F(CheckpointTest, IndexNamesMissingFile) {
  WriteShards();
  json map = kGoodMap;
  map["c"] = "s3.safetensors";
  WriteIndex(map);
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kNotFound,
              {"model.safetensors.index.json", "s3.safetensors", "'c'"});
}

TEST_F(CheckpointTest, IndexNamesTensorAbsentFromShard) {
  WriteShards();
  json map = kGoodMap;
  map["d"] = "s2.safetensors";
  WriteIndex(map);
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors.index.json", "'d'", "s2.safetensors", "does not contain"});
}

TEST_F(CheckpointTest, TensorMissingFromIndex) {
  WriteShards();
  json map = kGoodMap;
  map.erase("b");
  WriteIndex(map);
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors.index.json", "'b'", "s1.safetensors", "missing from weight_map"});
}

TEST_F(CheckpointTest, SameTensorInTwoShards) {
  WriteShards();
  ASSERT_TRUE(WriteSafetensors(Path("s2.safetensors"), {{"a", Patterned(DType::kF32, {2, 2}, 1)},
                                                        {"c", Patterned(DType::kI32, {5}, 3)}})
                  .ok());
  WriteIndex(kGoodMap);
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"'a'", "two shards", "s1.safetensors", "s2.safetensors"});
}

TEST_F(CheckpointTest, MalformedIndexJson) {
  WriteShards();
  WriteBytes(Path("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors",)");
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors.index.json", "malformed JSON"});
}

TEST_F(CheckpointTest, IndexWithoutWeightMap) {
  WriteShards();
  WriteBytes(Path("model.safetensors.index.json"), R"({"metadata": {}})");
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors.index.json", "weight_map"});
}

TEST_F(CheckpointTest, IndexEntryNotAString) {
  WriteShards();
  json map = kGoodMap;
  map["a"] = 3;
  WriteIndex(map);
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors.index.json", "'a'", "number"});
}

TEST_F(CheckpointTest, IndexPointingOutsideDirectory) {
  WriteShards();
  json map = kGoodMap;
  map["a"] = "../s1.safetensors";
  WriteIndex(map);
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"model.safetensors.index.json", "'a'", "../s1.safetensors"});
}

TEST_F(CheckpointTest, CorruptShardIsReportedWithItsPath) {
  WriteShards();
  WriteIndex(kGoodMap);
  std::string bytes = ReadBytes(Path("s2.safetensors"));
  WriteBytes(Path("s2.safetensors"), bytes.substr(0, bytes.size() - 1));
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"s2.safetensors", "'c'"});
}

TEST_F(CheckpointTest, PrefersModelSafetensorsOverOtherFiles) {
  ASSERT_TRUE(
      WriteSafetensors(Path("model.safetensors"), {{"m", Patterned(DType::kU8, {4}, 0)}}).ok());
  ASSERT_TRUE(
      WriteSafetensors(Path("other.safetensors"), {{"o", Patterned(DType::kU8, {4}, 0)}}).ok());
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->Names(), std::vector<std::string>{"m"});
  EXPECT_EQ(ckpt->dir(), dir_);
}

TEST_F(CheckpointTest, SingleOtherSafetensorsFile) {
  ASSERT_TRUE(
      WriteSafetensors(Path("weights.safetensors"), {{"w", Patterned(DType::kI8, {2}, 0)}}).ok());
  auto ckpt = Checkpoint::Open(dir_);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ(ckpt->Names(), std::vector<std::string>{"w"});
}

TEST_F(CheckpointTest, PathToFileOpensIt) {
  ASSERT_TRUE(
      WriteSafetensors(Path("weights.safetensors"), {{"w", Patterned(DType::kI8, {2}, 0)}}).ok());
  auto ckpt = Checkpoint::Open(Path("weights.safetensors"));
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_TRUE(ckpt->Has("w"));
}

TEST_F(CheckpointTest, SeveralFilesWithoutIndex) {
  ASSERT_TRUE(WriteSafetensors(Path("x.safetensors"), {{"x", Patterned(DType::kU8, {1}, 0)}}).ok());
  ASSERT_TRUE(WriteSafetensors(Path("y.safetensors"), {{"y", Patterned(DType::kU8, {1}, 0)}}).ok());
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kInvalidArgument,
              {"x.safetensors", "y.safetensors", "model.safetensors.index.json"});
}

TEST_F(CheckpointTest, EmptyDirectoryListsWhatWasLookedFor) {
  ExpectError(Checkpoint::Open(dir_).status(), absl::StatusCode::kNotFound,
              {dir_, "model.safetensors.index.json", "model.safetensors", "*.safetensors"});
}

TEST_F(CheckpointTest, MissingDirectory) {
  ExpectError(Checkpoint::Open(Path("nowhere")).status(), absl::StatusCode::kNotFound, {"nowhere"});
}

// ---------------------------------------------------------------------------
// The shared fixtures
// ---------------------------------------------------------------------------

bool HaveModel(const std::string& name) {
  return fs::exists(testing::SharedModel(name) + "/config.json");
}

TEST(SharedCheckpointTest, BaseModelOpensWithThreeShards) {
  if (!HaveModel("kjv-llama-12m")) GTEST_SKIP() << "shared fixtures not present";
  const std::string dir = testing::SharedModel("kjv-llama-12m");
  auto ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  // 9 tensors per layer x 6 layers + embed_tokens + norm + lm_head.
  EXPECT_EQ(ckpt->Names().size(), 57u);
  std::set<std::string> files;
  std::set<int> layers;
  for (const std::string& name : ckpt->Names()) {
    files.insert(ckpt->Find(name)->file);
    int layer = -1;
    if (std::sscanf(name.c_str(), "model.layers.%d.", &layer) == 1) layers.insert(layer);
  }
  EXPECT_EQ(files.size(), 3u);
  EXPECT_EQ(layers, (std::set<int>{0, 1, 2, 3, 4, 5}));

  const TensorInfo* embed = ckpt->Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, DType::kBF16);
  EXPECT_EQ(embed->shape, (Shape{4096, 384}));
  EXPECT_EQ(ckpt->Find("model.layers.0.self_attn.k_proj.weight")->shape, (Shape{128, 384}));
  EXPECT_EQ(ckpt->Find("model.layers.5.mlp.down_proj.weight")->shape, (Shape{384, 1024}));
  EXPECT_EQ(ckpt->Find("lm_head.weight")->shape, (Shape{4096, 384}));
  // The index's metadata records these totals.
  EXPECT_EQ(ckpt->NumElementsTotal(), 12587904);
  EXPECT_EQ(ckpt->BytesPerDType(), (std::map<DType, size_t>{{DType::kBF16, 25175808}}));

  // The view points straight into the file: compare with bytes read independently, after the
  // checkpoint itself is gone.
  Tensor norm = ckpt->Get("model.norm.weight").value();
  const TensorInfo info = *ckpt->Find("model.norm.weight");
  *ckpt = Checkpoint();
  const std::string bytes = ReadBytes(info.file);
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | static_cast<uint8_t>(bytes[k]);
  EXPECT_EQ(TensorBytes(norm), bytes.substr(8 + n + info.begin, info.end - info.begin));
  EXPECT_EQ(norm.nbytes(), 384u * 2);
}

TEST(SharedCheckpointTest, QuantizedFixturesOpen) {
  struct Expect {
    const char* model;
    size_t tensors;
    const char* tensor;
    DType dtype;
    Shape shape;
  };
  const Expect cases[] = {
      {"kjv-llama-12m-gptq-4bit",
       183,
       "model.layers.0.mlp.down_proj.qweight",
       DType::kI32,
       {128, 384}},
      {"kjv-llama-12m-awq-4bit",
       141,
       "model.layers.0.mlp.down_proj.qweight",
       DType::kI32,
       {1024, 48}},
      {"kjv-llama-12m-fp8-dynamic",
       99,
       "model.layers.0.mlp.down_proj.weight_scale",
       DType::kF32,
       {384, 1}},
  };
  for (const Expect& e : cases) {
    if (!HaveModel(e.model)) GTEST_SKIP() << "shared fixtures not present";
    auto ckpt = Checkpoint::Open(testing::SharedModel(e.model));
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    EXPECT_EQ(ckpt->Names().size(), e.tensors) << e.model;
    const TensorInfo* info = ckpt->Find(e.tensor);
    ASSERT_NE(info, nullptr) << e.model << " " << e.tensor;
    EXPECT_EQ(info->dtype, e.dtype) << e.model;
    EXPECT_EQ(info->shape, e.shape) << e.model;
    auto t = ckpt->Get(e.tensor);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->nbytes(), info->end - info->begin);
  }
  if (HaveModel("kjv-llama-12m-fp8-dynamic")) {
    auto ckpt = Checkpoint::Open(testing::SharedModel("kjv-llama-12m-fp8-dynamic"));
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    auto bytes = ckpt->BytesPerDType();
    EXPECT_GT(bytes[DType::kF8E4M3], 0u);
    EXPECT_GT(bytes[DType::kBF16], 0u);
  }
}

}  // namespace
}  // namespace qshard
