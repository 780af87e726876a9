// Prefix caching in the engine: reuse of full blocks across requests, the counters, and
// that outputs do not change.
#include <numeric>

#include "gtest/gtest.h"
#include "runtime/engine/engine.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

std::unique_ptr<Engine> MakeEngine(bool prefix_caching, int64_t kv_bytes = 64 << 20) {
  EngineOptions o;
  o.model_dir = ::qshard::testing::SourceDir() + "/models/kjv-llama-12m";
  o.device = "cpu";
  o.kv_cache_memory_bytes = kv_bytes;
  o.enable_prefix_caching = prefix_caching;
  auto e = Engine::Create(o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

// A 200-token prompt of KJV text.
std::vector<int32_t> LongPrompt(const Engine& e) {
  std::string text;
  const char* lines[] = {
      "In the beginning God created the heaven and the earth. ",
      "And the earth was without form, and void; and darkness was upon the face of the deep. ",
      "And the Spirit of God moved upon the face of the waters. ",
      "And God said, Let there be light: and there was light. "};
  std::vector<int32_t> ids;
  for (int i = 0; ids.size() < 200; ++i) {
    text += lines[i % 4];
    ids = e.tokenizer().Encode(text, true);
  }
  ids.resize(200);
  return ids;
}

struct Result {
  std::vector<int32_t> ids;
  int32_t cached = -1;
};

Result RunGreedy(Engine& e, const std::string& id, const std::vector<int32_t>& prompt, int max_tokens) {
  Request r;
  r.id = id;
  r.prompt = prompt;
  r.params.temperature = 0;
  r.params.max_tokens = max_tokens;
  EXPECT_TRUE(e.AddRequest(r).ok());
  Result res;
  while (e.HasWork()) {
    auto step = e.Step();
    EXPECT_TRUE(step.ok());
    if (!step.ok()) break;
    for (const auto& o : *step) {
      res.ids.insert(res.ids.end(), o.token_ids.begin(), o.token_ids.end());
      if (o.finished) res.cached = o.cached_prompt_tokens;
    }
  }
  return res;
}

TEST(PrefixCacheTest, SecondIdenticalPromptReusesFullBlocks) {
  auto e = MakeEngine(true);
  ASSERT_NE(e, nullptr);
  const auto prompt = LongPrompt(*e);
  Result first = RunGreedy(*e, "a", prompt, 16);
  EXPECT_EQ(first.cached, 0);
  const EngineStats before = e->stats();
  EXPECT_EQ(before.prefix_cache_queries, 200);
  EXPECT_EQ(before.prefix_cache_hits, 0);
  Result second = RunGreedy(*e, "b", prompt, 16);
  // 200 tokens = 12 full blocks of 16 (192 tokens) + 8; the last token is always computed.
  EXPECT_GE(second.cached, 192);
  const EngineStats after = e->stats();
  EXPECT_EQ(after.prefix_cache_queries - before.prefix_cache_queries, 200);
  EXPECT_EQ(after.prefix_cache_hits - before.prefix_cache_hits, second.cached);
  EXPECT_EQ(second.ids, first.ids);
  EXPECT_EQ(after.kv_blocks_used, 0) << "cached blocks are not counted as used";
  EXPECT_GE(after.kv_blocks_cached, 12);
}

TEST(PrefixCacheTest, GreedyOutputsIdenticalWithAndWithoutPrefixCaching) {
  auto on = MakeEngine(true);
  auto off = MakeEngine(false);
  ASSERT_NE(on, nullptr);
  ASSERT_NE(off, nullptr);
  const auto prompt = LongPrompt(*on);
  // A shared 200-token prefix with different endings, run twice each.
  for (int round = 0; round < 2; ++round) {
    for (int tail = 0; tail < 3; ++tail) {
      auto p = prompt;
      p.push_back(300 + tail);
      const std::string id = "r" + std::to_string(round) + "t" + std::to_string(tail);
      EXPECT_EQ(RunGreedy(*on, id, p, 20).ids, RunGreedy(*off, id, p, 20).ids) << id;
    }
  }
  EXPECT_GT(on->stats().prefix_cache_hits, 0);
  EXPECT_EQ(off->stats().prefix_cache_hits, 0);
}

TEST(PrefixCacheTest, EvictionUnderPressureKeepsOutputsCorrect) {
  // 20 blocks: the cached blocks of earlier prompts must be evicted for later ones.
  auto small = MakeEngine(true, 20 * 16 * 6144);
  auto off = MakeEngine(false);
  ASSERT_NE(small, nullptr);
  ASSERT_EQ(small->stats().kv_blocks_total, 20);
  const auto base = LongPrompt(*small);
  for (int i = 0; i < 4; ++i) {
    auto p = std::vector<int32_t>(base.begin() + i * 7, base.begin() + 150 + i * 7);
    p.insert(p.begin(), 1);
    const std::string id = "e" + std::to_string(i);
    EXPECT_EQ(RunGreedy(*small, id, p, 8).ids, RunGreedy(*off, id, p, 8).ids) << id;
    EXPECT_EQ(small->stats().kv_blocks_used, 0);
  }
}

}  // namespace
}  // namespace qshard
