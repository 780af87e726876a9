// The engine against the reference outputs of the shared fixtures (HF transformers,
// fp32 math): tokenization, top-10 next-token logits, greedy continuations, and batch
// invariance of greedy decoding.
#include <algorithm>
#include <numeric>

#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

using ::qshard::testing::LoadReference;
using ::qshard::testing::SharedModel;

constexpr double kLogitTolerance = 1e-3;  // the bound for the bf16 base model

std::unique_ptr<Engine> MakeEngine(const std::string& dir, int64_t kv_bytes = 64 << 20) {
  EngineOptions o;
  o.model_dir = dir;
  o.device = "cpu";
  o.kv_cache_memory_bytes = kv_bytes;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

// Greedy-decodes every request to completion; returns token ids per request id.
std::map<std::string, std::vector<int32_t>> RunGreedy(Engine& e,
                                                      const std::vector<Request>& requests) {
  for (const Request& r : requests) EXPECT_TRUE(e.AddRequest(r).ok());
  std::map<std::string, std::vector<int32_t>> out;
  while (e.HasWork()) {
    auto step = e.Step();
    EXPECT_TRUE(step.ok()) << step.status();
    if (!step.ok()) break;
    for (const RequestOutput& o : *step) {
      auto& ids = out[o.id];
      ids.insert(ids.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finished) {
        EXPECT_NE(o.finish_reason, FinishReason::kError) << o.error;
      }
    }
  }
  return out;
}

Request GreedyRequest(const std::string& id, std::vector<int32_t> prompt, int max_tokens) {
  Request r;
  r.id = id;
  r.prompt = std::move(prompt);
  r.params.temperature = 0.0f;
  r.params.max_tokens = max_tokens;
  return r;
}

class ReferenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = SharedModel("kjv-llama-12m");
    ref_ = LoadReference(dir_);
    ASSERT_FALSE(ref_.is_null()) << "missing " << dir_ << "/reference.json";
    engine_ = MakeEngine(dir_);
    ASSERT_NE(engine_, nullptr);
  }
  std::string dir_;
  nlohmann::json ref_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(ReferenceTest, TokenizerMatchesPromptIds) {
  for (const auto& p : ref_["prompts"]) {
    EXPECT_EQ(engine_->tokenizer().Encode(p["prompt"].get<std::string>(), true),
              p["prompt_ids"].get<std::vector<int32_t>>())
        << p["prompt"];
  }
}

TEST_F(ReferenceTest, Top10LogitsMatchReference) {
  LlamaModel& model = engine_->model();
  for (const auto& p : ref_["prompts"]) {
    const auto ids = p["prompt_ids"].get<std::vector<int32_t>>();
    std::vector<int32_t> table((ids.size() + 15) / 16);
    std::iota(table.begin(), table.end(), 0);
    SequenceChunk c{ids, 0, table, LogitsMode::kLast};
    std::vector<float> logits;
    ASSERT_TRUE(model.Forward({&c, 1}, &logits).ok());
    std::vector<int32_t> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + 10, order.end(),
                      [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    const auto want_ids = p["top10_ids"].get<std::vector<int32_t>>();
    const auto want_logits = p["top10_logits"].get<std::vector<double>>();
    for (int i = 0; i < 10; ++i) {
      EXPECT_EQ(order[i], want_ids[i]) << p["prompt"] << " rank " << i;
      EXPECT_NEAR(logits[want_ids[i]], want_logits[i], kLogitTolerance)
          << p["prompt"] << " token " << want_ids[i];
    }
  }
}

TEST_F(ReferenceTest, GreedyContinuationMatchesReference) {
  int n = 0;
  for (const auto& p : ref_["prompts"]) {
    const std::string id = "r" + std::to_string(n++);
    auto out = RunGreedy(*engine_, {GreedyRequest(id, p["prompt_ids"].get<std::vector<int32_t>>(), 48)});
    EXPECT_EQ(out[id], p["greedy_ids"].get<std::vector<int32_t>>()) << p["prompt"];
  }
  EXPECT_EQ(engine_->stats().kv_blocks_used, 0);
}

TEST_F(ReferenceTest, BatchedGreedyEqualsSolo) {
  std::vector<Request> reqs;
  std::map<std::string, std::vector<int32_t>> solo;
  int n = 0;
  for (const auto& p : ref_["prompts"]) {
    const std::string id = "b" + std::to_string(n++);
    reqs.push_back(GreedyRequest(id, p["prompt_ids"].get<std::vector<int32_t>>(), 48));
    solo[id] = RunGreedy(*engine_, {reqs.back()})[id];
  }
  auto batched = RunGreedy(*engine_, reqs);
  for (const auto& [id, ids] : solo) EXPECT_EQ(batched[id], ids) << id;
}

TEST_F(ReferenceTest, ChunkedPrefillGivesSameLogits) {
  // A prompt prefilled in chunks of 3 tokens must give the same next-token logits as one
  // chunk: the paged cache and positions must line up across steps.
  LlamaModel& model = engine_->model();
  const auto ids = ref_["prompts"][1]["prompt_ids"].get<std::vector<int32_t>>();
  std::vector<int32_t> table = {5, 2};  // deliberately not in order
  std::vector<float> whole, part;
  SequenceChunk c{ids, 0, table, LogitsMode::kLast};
  ASSERT_TRUE(model.Forward({&c, 1}, &whole).ok());
  for (size_t start = 0; start < ids.size(); start += 3) {
    size_t n = std::min<size_t>(3, ids.size() - start);
    SequenceChunk ch{absl::Span<const int32_t>(ids.data() + start, n), static_cast<int32_t>(start),
                     table, start + n == ids.size() ? LogitsMode::kLast : LogitsMode::kNone};
    ASSERT_TRUE(model.Forward({&ch, 1}, &part).ok());
  }
  ASSERT_EQ(whole.size(), part.size());
  for (size_t i = 0; i < whole.size(); ++i) ASSERT_NEAR(whole[i], part[i], 1e-4) << i;
}

TEST_F(ReferenceTest, TinyKvCacheStillMatchesThroughPreemption) {
  // 3 blocks of 16 tokens cannot hold the three sequences (2 + 3 + 1 blocks) at once: the
  // scheduler must preempt and recompute, and the outputs must not change.
  auto small = MakeEngine(dir_, 3 * 16 * 6144);
  ASSERT_NE(small, nullptr);
  ASSERT_EQ(small->stats().kv_blocks_total, 3);
  std::vector<Request> reqs;
  int n = 0;
  for (const auto& p : ref_["prompts"]) {
    reqs.push_back(GreedyRequest("p" + std::to_string(n++),
                                 p["prompt_ids"].get<std::vector<int32_t>>(), 48));
  }
  auto out = RunGreedy(*small, reqs);
  n = 0;
  for (const auto& p : ref_["prompts"]) {
    EXPECT_EQ(out["p" + std::to_string(n++)], p["greedy_ids"].get<std::vector<int32_t>>());
  }
  EXPECT_GT(small->stats().num_preemptions, 0);
  EXPECT_EQ(small->stats().kv_blocks_used, 0);
}

TEST_F(ReferenceTest, PromptTooLongIsRejected) {
  Request r = GreedyRequest("long", std::vector<int32_t>(engine_->max_model_len(), 5), 4);
  absl::Status st = engine_->AddRequest(r);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("maximum context length"), std::string::npos) << st;
}

TEST_F(ReferenceTest, AbortFreesBlocksAndReportsAbort) {
  Request r = GreedyRequest("a", ref_["prompts"][0]["prompt_ids"].get<std::vector<int32_t>>(), 40);
  r.params.ignore_eos = true;
  ASSERT_TRUE(engine_->AddRequest(r).ok());
  ASSERT_TRUE(engine_->Step().ok());
  EXPECT_GT(engine_->stats().kv_blocks_used, 0);
  EXPECT_TRUE(engine_->Abort("a"));
  EXPECT_EQ(engine_->stats().kv_blocks_used, 0);
  auto step = engine_->Step();
  ASSERT_TRUE(step.ok());
  ASSERT_EQ(step->size(), 1u);
  EXPECT_TRUE((*step)[0].finished);
  EXPECT_EQ((*step)[0].finish_reason, FinishReason::kAbort);
  EXPECT_FALSE(engine_->HasWork());
}

TEST_F(ReferenceTest, StopStringIsNotReturnedAndTextMatchesDecode) {
  const auto& p = ref_["prompts"][1];
  const auto prompt = p["prompt_ids"].get<std::vector<int32_t>>();
  // Full greedy text, then stop at a word inside it.
  Request r = GreedyRequest("s", prompt, 48);
  r.params.stop = {"possess"};
  ASSERT_TRUE(engine_->AddRequest(r).ok());
  std::string text;
  FinishReason reason = FinishReason::kNone;
  while (engine_->HasWork()) {
    auto step = engine_->Step();
    ASSERT_TRUE(step.ok());
    for (const auto& o : *step) {
      text += o.text;
      if (o.finished) reason = o.finish_reason;
    }
  }
  EXPECT_EQ(reason, FinishReason::kStop);
  std::string full = " ";
  full.append(p["greedy_text"].get<std::string>());
  EXPECT_EQ(text, full.substr(0, full.find("possess")));
}

TEST_F(ReferenceTest, MaxTokensEndsWithLength) {
  Request r = GreedyRequest("m", ref_["prompts"][0]["prompt_ids"].get<std::vector<int32_t>>(), 5);
  auto out = RunGreedy(*engine_, {r});
  const auto want = ref_["prompts"][0]["greedy_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(out["m"], std::vector<int32_t>(want.begin(), want.begin() + 5));
}

}  // namespace
}  // namespace qshard
