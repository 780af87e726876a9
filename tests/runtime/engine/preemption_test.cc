// Preemption by recompute under a tiny KV budget: no deadlock, no starvation, identical
// outputs, blocks returned; and a request that can never fit fails clearly.
#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

constexpr int64_t kBytesPerBlock = 16 * 6144;  // 16 tokens x fp32 K/V of the 12M model

std::unique_ptr<Engine> MakeEngine(int64_t blocks) {
  EngineOptions o;
  o.model_dir = ::qshard::testing::SourceDir() + "/models/kjv-llama-12m";
  o.device = "cpu";
  o.kv_cache_memory_bytes = blocks * kBytesPerBlock;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

Request Make(const Engine& e, int i) {
  static const char* kPrompts[] = {"In the beginning", "And the LORD said unto Moses,",
                                   "Blessed are the", "And it came to pass", "Thou shalt not",
                                   "The LORD is my shepherd;", "For God so loved", "Behold,"};
  Request r;
  r.id = "q" + std::to_string(i);
  r.prompt = e.tokenizer().Encode(kPrompts[i % 8], true);
  r.params.temperature = 0;
  r.params.ignore_eos = true;        // lengths set by max_tokens, not by the model
  r.params.max_tokens = 8 + 5 * i;   // 8 .. 83 tokens
  return r;
}

std::map<std::string, std::vector<int32_t>> Drain(Engine& e, std::map<std::string, FinishReason>* reasons) {
  std::map<std::string, std::vector<int32_t>> out;
  for (int steps = 0; e.HasWork() && steps < 100000; ++steps) {
    auto s = e.Step();
    EXPECT_TRUE(s.ok());
    if (!s.ok()) break;
    for (const auto& o : *s) {
      out[o.id].insert(out[o.id].end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finished) (*reasons)[o.id] = o.finish_reason;
    }
  }
  EXPECT_FALSE(e.HasWork()) << "engine did not drain: deadlock or starvation";
  return out;
}

TEST(PreemptionTest, SixteenRequestsOnAFewBlocksMatchSoloRuns) {
  auto big = MakeEngine(512);
  auto tiny = MakeEngine(8);  // 128 tokens for 16 requests of up to ~90 tokens each
  ASSERT_NE(big, nullptr);
  ASSERT_NE(tiny, nullptr);
  std::map<std::string, std::vector<int32_t>> solo;
  std::map<std::string, FinishReason> reasons;
  for (int i = 0; i < 16; ++i) {
    Request r = Make(*big, i);
    ASSERT_TRUE(big->AddRequest(r).ok());
    solo[r.id] = Drain(*big, &reasons)[r.id];
  }
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(tiny->AddRequest(Make(*tiny, i)).ok());
  reasons.clear();
  auto together = Drain(*tiny, &reasons);
  for (const auto& [id, ids] : solo) {
    EXPECT_EQ(together[id], ids) << id;
    EXPECT_EQ(reasons[id], FinishReason::kLength) << id;
  }
  EXPECT_GT(tiny->stats().num_preemptions, 0);
  EXPECT_EQ(tiny->stats().kv_blocks_used, 0);
}

TEST(PreemptionTest, RequestThatCannotFitAloneFailsWithResourceExhausted) {
  auto tiny = MakeEngine(2);  // 32 tokens
  ASSERT_NE(tiny, nullptr);
  Request r = Make(*tiny, 0);
  r.params.max_tokens = 100;
  ASSERT_TRUE(tiny->AddRequest(r).ok());
  std::map<std::string, FinishReason> reasons;
  absl::Status error;
  while (tiny->HasWork()) {
    auto s = tiny->Step();
    ASSERT_TRUE(s.ok());
    for (const auto& o : *s) {
      if (o.finished) {
        reasons[o.id] = o.finish_reason;
        error = o.error;
      }
    }
  }
  EXPECT_EQ(reasons[r.id], FinishReason::kError);
  EXPECT_EQ(error.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(error.message().find("holds 32 tokens"), std::string::npos) << error;
  EXPECT_EQ(tiny->stats().kv_blocks_used, 0);
}

}  // namespace
}  // namespace qshard
