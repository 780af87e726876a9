// The offline quantizer's hooks into the model: calibration observers see every decoder
// linear input with its shape, a pass can stop after a layer, and linears / norms can be
// swapped for other prepared versions (shape-checked).
#include <numeric>
#include <set>

#include "gtest/gtest.h"
#include "runtime/backend/backend.h"
#include "runtime/checkpoint/safetensors.h"
#include "runtime/model/llama_model.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

std::string Embedded() { return ::qshard::testing::SourceDir() + "/models/kjv-llama-12m"; }

class CalibrationHooksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    backend_ = CreateBackend("cpu").value();
    model_ = LlamaModel::Load(Embedded(), backend_.get()).value();
    KvCacheSpec spec;
    spec.num_layers = 6;
    spec.num_kv_heads = 2;
    spec.head_dim = 64;
    spec.block_size = 16;
    spec.num_blocks = 4;
    spec.dtype = DType::kF32;
    ASSERT_TRUE(model_->AllocateKvCache(spec).ok());
  }
  std::vector<float> Logits(const std::vector<int32_t>& ids) {
    std::vector<int32_t> table = {0, 1, 2, 3};
    SequenceChunk c{ids, 0, table, LogitsMode::kLast};
    std::vector<float> logits;
    EXPECT_TRUE(model_->Forward({&c, 1}, &logits).ok());
    return logits;
  }
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<LlamaModel> model_;
};

TEST_F(CalibrationHooksTest, ObserverSeesEveryLinearInputUpToTheStopLayer) {
  const std::vector<int32_t> ids = {1, 200, 300, 400, 500};
  std::set<std::pair<int, int>> seen;
  CalibrationHooks hooks;
  hooks.stop_after_layer = 2;
  hooks.on_linear_input = [&](int layer, LinearSlot slot, const Tensor& x) {
    seen.insert({layer, static_cast<int>(slot)});
    EXPECT_EQ(x.dim(0), 5);
    const int64_t want = slot == LinearSlot::kDown ? 1024 : 384;  // heads*D = hidden = 384
    EXPECT_EQ(x.dim(1), want) << "layer " << layer << " slot " << static_cast<int>(slot);
  };
  model_->SetCalibrationHooks(hooks);
  std::vector<int32_t> table = {0, 1, 2, 3};
  SequenceChunk c{ids, 0, table, LogitsMode::kLast};
  std::vector<float> logits = {1.0f};
  ASSERT_TRUE(model_->Forward({&c, 1}, &logits).ok());
  EXPECT_TRUE(logits.empty()) << "a pass that stops early returns no logits";
  EXPECT_EQ(seen.size(), 3u * 4u);  // layers 0..2, four slots each
  EXPECT_FALSE(seen.count({3, 0}));
  // Removing the hooks restores the full forward.
  model_->SetCalibrationHooks(CalibrationHooks());
  EXPECT_EQ(Logits(ids).size(), 4096u);
}

TEST_F(CalibrationHooksTest, ReplacingALinearWithTheSameWeightsKeepsTheLogits) {
  const std::vector<int32_t> ids = {1, 20, 30, 40};
  const std::vector<float> before = Logits(ids);
  auto ckpt = Checkpoint::Open(Embedded());
  ASSERT_TRUE(ckpt.ok());
  LinearWeights w;
  w.name = "model.layers.1.mlp.down_proj";
  w.in_features = 1024;
  w.out_features = 384;
  w.weight = ckpt->Get(w.name + ".weight").value();
  ASSERT_TRUE(model_->ReplaceLinear(1, "down_proj", backend_->PrepareLinear(w).value()).ok());
  EXPECT_EQ(Logits(ids), before);

  // A different weight changes them.
  Tensor zero = Tensor::Empty(DType::kF32, {384, 1024});
  w.weight = zero;
  ASSERT_TRUE(model_->ReplaceLinear(1, "down_proj", backend_->PrepareLinear(w).value()).ok());
  EXPECT_NE(Logits(ids), before);
}

TEST_F(CalibrationHooksTest, ReplaceRejectsWrongShapesAndNames) {
  LinearWeights w;
  w.name = "x";
  w.in_features = 384;
  w.out_features = 384;
  w.weight = Tensor::Empty(DType::kF32, {384, 384});
  auto op = [&] { return backend_->PrepareLinear(w).value(); };
  auto st = model_->ReplaceLinear(0, "down_proj", op());  // down_proj is [384, 1024]
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("down_proj"), std::string::npos) << st;
  st = model_->ReplaceLinear(0, "qkv_proj", op());
  EXPECT_NE(st.message().find("unknown projection 'qkv_proj'"), std::string::npos) << st;
  EXPECT_EQ(model_->ReplaceLinear(6, "q_proj", op()).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(model_->ReplaceNorms(0, Tensor::Empty(DType::kF32, {383}),
                                 Tensor::Empty(DType::kF32, {384}))
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qshard
