// File: sampling_test.cc
// Sampler semantics (greedy, temperature, top-k/p, min-p, penalties, blocking, seeding,
// logprobs) and ValidateSamplingParams range checks.
#include "runtime/engine/sampling.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace qshard {
namespace {

// Softmax in double, the reference every empirical check compares against.
std::vector<double> Softmax(const std::vector<float>& logits, double temperature = 1.0) {
  double max_v = -INFINITY;
  for (float v : logits) max_v = std::max(max_v, static_cast<double>(v));
  std::vector<double> p(logits.size());
  double sum = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    p[i] = std::exp((logits[i] - max_v) / temperature);
    sum += p[i];
  }
  for (double& x : p) x /= sum;
  return p;
}

std::vector<float> LogitsFromProbs(const std::vector<double>& probs) {
  std::vector<float> l;
  for (double p : probs) l.push_back(static_cast<float>(std::log(p)));
  return l;
}

SampleResult SampleOnce(Sampler& s, const std::vector<float>& logits,
                        const std::vector<int32_t>& prompt = {},
                        const std::vector<int32_t>& output = {},
                        const std::vector<int32_t>& blocked = {}) {
  return s.Sample(logits.data(), static_cast<int32_t>(logits.size()), prompt, output, blocked);
}

// Relative frequency of each id over `draws` samples.
std::vector<double> Frequencies(const SamplingParams& params, const std::vector<float>& logits,
                                int draws) {
  Sampler s(params);
  std::vector<double> f(logits.size(), 0.0);
  for (int i = 0; i < draws; ++i) {
    const int32_t id = SampleOnce(s, logits).token_id;
    EXPECT_GE(id, 0);
    EXPECT_LT(id, static_cast<int32_t>(logits.size()));
    if (id >= 0 && id < static_cast<int32_t>(logits.size())) f[id] += 1.0;
  }
  for (double& x : f) x /= draws;
  return f;
}

SamplingParams Seeded(uint64_t seed) {
  SamplingParams p;
  p.seed = seed;
  return p;
}

SamplingParams Greedy() {
  SamplingParams p;
  p.temperature = 0.0f;
  return p;
}

constexpr int kDraws = 20000;
constexpr double kTol = 0.015;

// ---------------------------------------------------------------------------
// Greedy
// ---------------------------------------------------------------------------

TEST(SamplerTest, GreedyPicksArgmaxAndIgnoresFilters) {
  SamplingParams p = Greedy();
  // Extreme filters are set: greedy must return the argmax of the penalized logits
  // every time, never a draw, whatever they say.
  p.top_k = 1;
  p.top_p = 0.01f;
  p.min_p = 0.99f;
  Sampler s(p);
  const std::vector<float> logits = {0.1f, 2.5f, -1.0f, 2.4f, 0.0f};
  for (int i = 0; i < 10; ++i) EXPECT_EQ(SampleOnce(s, logits).token_id, 1);

  // A near-zero temperature is treated as greedy too.
  SamplingParams tiny = Greedy();
  tiny.temperature = 1e-6f;
  Sampler s2(tiny);
  EXPECT_EQ(SampleOnce(s2, logits).token_id, 1);
}

TEST(SamplerTest, GreedyTiesPickLowestId) {
  Sampler s(Greedy());
  const std::vector<float> logits = {1.0f, 3.0f, 0.5f, 3.0f, 3.0f};
  EXPECT_EQ(SampleOnce(s, logits).token_id, 1);
}

TEST(SamplerTest, TopKOneMatchesGreedy) {
  SamplingParams p = Seeded(7);
  p.top_k = 1;
  Sampler s(p);
  const std::vector<float> logits = {0.1f, 0.2f, 0.3f, 0.25f};
  for (int i = 0; i < 200; ++i) EXPECT_EQ(SampleOnce(s, logits).token_id, 2);
}

// ---------------------------------------------------------------------------
// Seeding
// ---------------------------------------------------------------------------

TEST(SamplerTest, SameSeedSameSequenceDifferentSeedDiffers) {
  std::vector<float> logits(50);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = static_cast<float>(i % 7) * 0.3f;
  auto run = [&](uint64_t seed) {
    Sampler s(Seeded(seed));
    std::vector<int32_t> ids;
    for (int i = 0; i < 100; ++i) ids.push_back(SampleOnce(s, logits).token_id);
    return ids;
  };
  const std::vector<int32_t> a = run(1234);
  EXPECT_EQ(a, run(1234));
  EXPECT_NE(a, run(1235));
}

// ---------------------------------------------------------------------------
// Distribution
// ---------------------------------------------------------------------------

TEST(SamplerTest, TemperatureOneMatchesSoftmax) {
  const std::vector<float> logits = {1.0f, 0.0f, -0.5f, 0.7f};
  const std::vector<double> want = Softmax(logits);
  const std::vector<double> got = Frequencies(Seeded(42), logits, kDraws);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], kTol) << "id " << i;
}

TEST(SamplerTest, LargeVocabDrawMatchesGroupMasses) {
  // 1000 tokens in four groups holding 10/20/30/40% of the mass: the draw walks many
  // blocks of weights, and each group's share must come out right.
  constexpr int kVocab = 1000;
  const std::array<double, 4> mass = {0.1, 0.2, 0.3, 0.4};
  std::vector<float> logits(kVocab);
  for (int i = 0; i < kVocab; ++i) {
    logits[i] = static_cast<float>(std::log(mass[i * 4 / kVocab] / (kVocab / 4)));
  }
  const std::vector<double> got = Frequencies(Seeded(60), logits, kDraws);
  std::array<double, 4> group{};
  for (int i = 0; i < kVocab; ++i) group[i * 4 / kVocab] += got[i];
  for (int g = 0; g < 4; ++g) EXPECT_NEAR(group[g], mass[g], kTol) << "group " << g;
}

TEST(SamplerTest, TemperatureHalfSharpens) {
  const std::vector<float> logits = {1.0f, 0.0f, -0.5f, 0.7f};
  SamplingParams p = Seeded(43);
  p.temperature = 0.5f;
  const std::vector<double> want = Softmax(logits, 0.5);
  const std::vector<double> got = Frequencies(p, logits, kDraws);
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], kTol) << "id " << i;
  // Sharper than temperature 1: the top token gains mass.
  EXPECT_GT(want[0], Softmax(logits)[0] + 0.05);
}

TEST(SamplerTest, TopKTwoRenormalizes) {
  const std::vector<float> logits = {0.2f, 1.0f, -0.3f, 0.8f, 0.1f};
  SamplingParams p = Seeded(44);
  p.top_k = 2;
  const std::vector<double> full = Softmax(logits);
  const double z = full[1] + full[3];
  const std::vector<double> got = Frequencies(p, logits, kDraws);
  EXPECT_EQ(got[0], 0.0);
  EXPECT_EQ(got[2], 0.0);
  EXPECT_EQ(got[4], 0.0);
  EXPECT_NEAR(got[1], full[1] / z, kTol);
  EXPECT_NEAR(got[3], full[3] / z, kTol);
}

TEST(SamplerTest, TopKOffValuesKeepEverything) {
  const std::vector<float> logits = {0.0f, 0.0f, 0.0f};
  for (int32_t k : {-1, 0, 3, 100}) {
    SamplingParams p = Seeded(45);
    p.top_k = k;
    const std::vector<double> got = Frequencies(p, logits, 6000);
    for (double f : got) EXPECT_NEAR(f, 1.0 / 3, 0.03) << "top_k " << k;
  }
}

TEST(SamplerTest, TopPKeepsSmallestPrefixReachingMass) {
  const std::vector<float> logits = LogitsFromProbs({0.5, 0.3, 0.2});
  SamplingParams p = Seeded(46);
  p.top_p = 0.6f;
  const std::vector<double> got = Frequencies(p, logits, kDraws);
  EXPECT_EQ(got[2], 0.0);
  EXPECT_NEAR(got[0], 0.5 / 0.8, kTol);
  EXPECT_NEAR(got[1], 0.3 / 0.8, kTol);
}

TEST(SamplerTest, TopPBelowTopProbKeepsOnlyTop) {
  const std::vector<float> logits = LogitsFromProbs({0.2, 0.5, 0.3});
  SamplingParams p = Seeded(47);
  p.top_p = 0.4f;
  Sampler s(p);
  for (int i = 0; i < 500; ++i) EXPECT_EQ(SampleOnce(s, logits).token_id, 1);
}

TEST(SamplerTest, TopPOnLargeVocabUsesPrefixCorrectly) {
  // 1000 tokens with geometric-ish weights: the nucleus spans more than one growth step of
  // the incremental partial sort, so the cut is checked against a full sort.
  constexpr int kVocab = 1000;
  std::vector<float> logits(kVocab);
  for (int i = 0; i < kVocab; ++i) {
    logits[i] = -0.01f * static_cast<float>((i * 379) % kVocab);  // permuted order
  }
  const std::vector<double> probs = Softmax(logits);
  std::vector<int32_t> order(kVocab);
  for (int i = 0; i < kVocab; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
  });
  const float top_p = 0.7f;
  double cum = 0.0;
  size_t keep = 0;
  while (cum < top_p) cum += probs[order[keep++]];
  std::vector<bool> allowed(kVocab, false);
  for (size_t i = 0; i < keep; ++i) allowed[order[i]] = true;
  ASSERT_GT(keep, 64u);  // exercises more than the first partial-sort chunk

  SamplingParams p = Seeded(48);
  p.top_p = top_p;
  Sampler s(p);
  int tail_hits = 0;
  for (int i = 0; i < 5000; ++i) {
    const int32_t id = SampleOnce(s, logits).token_id;
    ASSERT_TRUE(allowed[id]) << "id " << id << " outside the nucleus";
    // The least likely kept tokens are reachable (the cut isn't too tight).
    if (id == order[keep - 1] || id == order[keep - 2]) ++tail_hits;
  }
  EXPECT_GT(tail_hits, 0);
}

TEST(SamplerTest, TopPFlatDistributionMatchesFullSort) {
  // A nucleus of thousands of near-equal tokens: too many to sort outright, so this
  // goes through the radix-select path; the kept set must match a full sort in double.
  constexpr int kVocab = 50000;
  std::vector<float> logits(kVocab);
  for (int i = 0; i < kVocab; ++i) {
    logits[i] = -1e-4f * static_cast<float>((static_cast<int64_t>(i) * 7919) % kVocab);
  }
  const std::vector<double> probs = Softmax(logits);
  std::vector<int32_t> order(kVocab);
  for (int i = 0; i < kVocab; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
  });
  const float top_p = 0.5f;
  double cum = 0.0;
  size_t keep = 0;
  while (cum < top_p) cum += probs[order[keep++]];
  ASSERT_GT(keep, 4096u);
  // Not a knife-edge case: float rounding can't move the cut.
  ASSERT_GT(cum - top_p, 1e-6);
  ASSERT_GT(top_p - (cum - probs[order[keep - 1]]), 1e-6);
  std::vector<bool> allowed(kVocab, false);
  for (size_t i = 0; i < keep; ++i) allowed[order[i]] = true;

  SamplingParams p = Seeded(53);
  p.top_p = top_p;
  Sampler s(p);
  int bottom_hits = 0;
  for (int i = 0; i < 6000; ++i) {
    const int32_t id = SampleOnce(s, logits).token_id;
    ASSERT_TRUE(allowed[id]) << "id " << id << " outside the nucleus";
    // The 100 least likely kept tokens hold ~1.4% of the nucleus mass.
    if ((static_cast<int64_t>(id) * 7919) % kVocab >= static_cast<int64_t>(keep) - 100) {
      ++bottom_hits;
    }
  }
  EXPECT_GT(bottom_hits, 30);  // ~85 expected
}

TEST(SamplerTest, TopKKeepsTiesAtKthValue) {
  // Like HF / vLLM (mask logits < k-th value), tokens tied with the k-th survive.
  const std::vector<float> logits = LogitsFromProbs({0.4, 0.3, 0.15, 0.15});
  SamplingParams p = Seeded(54);
  p.top_k = 3;
  const std::vector<double> got = Frequencies(p, logits, kDraws);
  EXPECT_NEAR(got[2], 0.15, kTol);
  EXPECT_NEAR(got[3], 0.15, kTol);
}

TEST(SamplerTest, TopKThenMinP) {
  const std::vector<float> logits = LogitsFromProbs({0.4, 0.3, 0.15, 0.1, 0.05});
  SamplingParams p = Seeded(55);
  p.top_k = 4;     // drops id 4
  p.min_p = 0.5f;  // threshold 0.2: drops ids 2 and 3
  const std::vector<double> got = Frequencies(p, logits, kDraws);
  EXPECT_EQ(got[2] + got[3] + got[4], 0.0);
  EXPECT_NEAR(got[0], 0.4 / 0.7, kTol);
}

TEST(SamplerTest, MinPDropsTokensBelowFractionOfMax) {
  const std::vector<float> logits = LogitsFromProbs({0.5, 0.3, 0.2});
  SamplingParams p = Seeded(49);
  p.min_p = 0.5f;  // threshold 0.25: 0.3 stays, 0.2 goes
  const std::vector<double> got = Frequencies(p, logits, kDraws);
  EXPECT_EQ(got[2], 0.0);
  EXPECT_NEAR(got[0], 0.5 / 0.8, kTol);
  EXPECT_NEAR(got[1], 0.3 / 0.8, kTol);
}

TEST(SamplerTest, MinPOnLargeVocab) {
  // 10 tokens at weight 1 among 990 at weight 0.05: together the small ones hold most
  // of the mass, but min_p 0.1 removes every one of them.
  constexpr int kVocab = 1000;
  std::vector<float> logits(kVocab, std::log(0.05f));
  std::vector<bool> big(kVocab, false);
  for (int i = 0; i < 10; ++i) {
    logits[(i * 97) % kVocab] = 0.0f;
    big[(i * 97) % kVocab] = true;
  }
  SamplingParams p = Seeded(61);
  p.min_p = 0.1f;
  Sampler s(p);
  for (int i = 0; i < 2000; ++i) {
    const int32_t id = SampleOnce(s, logits).token_id;
    ASSERT_TRUE(big[id]) << id;
  }
}

// ---------------------------------------------------------------------------
// Penalties and blocking
// ---------------------------------------------------------------------------

TEST(SamplerTest, RepetitionPenaltyDividesPositiveLogits) {
  // Token 0 (2.0) beats token 1 (1.5) until 0 is seen: 2.0 / 1.5 = 1.333 < 1.5.
  const std::vector<float> logits = {2.0f, 1.5f, 0.0f};
  Sampler plain(Greedy());
  EXPECT_EQ(SampleOnce(plain, logits, {0}).token_id, 0);
  SamplingParams p = Greedy();
  p.repetition_penalty = 1.5f;
  Sampler s(p);
  EXPECT_EQ(SampleOnce(s, logits, /*prompt=*/{0}).token_id, 1);
  EXPECT_EQ(SampleOnce(s, logits, {}, /*output=*/{0}).token_id, 1);
  // Repeats count once: 2.0 / 1.5 is still > 1.5 / 1.5 when both were seen.
  EXPECT_EQ(SampleOnce(s, logits, {0, 0, 0}, {0, 1}).token_id, 0);
  // The scratch state is reset between calls: nothing seen => argmax again.
  EXPECT_EQ(SampleOnce(s, logits).token_id, 0);
}

TEST(SamplerTest, RepetitionPenaltyMultipliesNegativeLogits) {
  // Token 0 (-1.0) beats token 1 (-1.2) until 0 is seen: -1.0 * 1.5 = -1.5 < -1.2.
  // Dividing instead (the wrong rule) would give -0.667 and keep token 0.
  const std::vector<float> logits = {-1.0f, -1.2f, -3.0f};
  SamplingParams p = Greedy();
  p.repetition_penalty = 1.5f;
  Sampler s(p);
  EXPECT_EQ(SampleOnce(s, logits).token_id, 0);
  EXPECT_EQ(SampleOnce(s, logits, {0}).token_id, 1);
}

TEST(SamplerTest, PresencePenaltySubtractsOncePerSeenOutputToken) {
  // Output has token 0 three times and token 1 once. presence 0.3:
  // 0: 3.0 - 0.3 = 2.7, 1: 2.8 - 0.3 = 2.5, 2: 2.6 => token 0 still wins; scaling by
  // the count (3 * 0.3) would have made it 2.1 and picked token 2.
  const std::vector<float> logits = {3.0f, 2.8f, 2.6f};
  SamplingParams p = Greedy();
  p.presence_penalty = 0.3f;
  Sampler s(p);
  EXPECT_EQ(SampleOnce(s, logits, {}, {0, 0, 0, 1}).token_id, 0);
  // presence 1.0: 0 -> 2.0, 1 -> 1.8, 2 -> 2.6 => token 2.
  SamplingParams p2 = Greedy();
  p2.presence_penalty = 1.0f;
  Sampler s2(p2);
  EXPECT_EQ(SampleOnce(s2, logits, {}, {0, 0, 0, 1}).token_id, 2);
  // Prompt tokens are not penalized by presence.
  EXPECT_EQ(SampleOnce(s2, logits, {0, 1}, {}).token_id, 0);
}

TEST(SamplerTest, FrequencyPenaltyScalesWithCount) {
  // frequency 0.3, output {0,0,0,1}: 0 -> 3.0 - 0.9 = 2.1, 1 -> 2.8 - 0.3 = 2.5,
  // 2 -> 2.6 => token 2. (With one occurrence of 0 it would be 2.7 => token 0.)
  const std::vector<float> logits = {3.0f, 2.8f, 2.6f};
  SamplingParams p = Greedy();
  p.frequency_penalty = 0.3f;
  Sampler s(p);
  EXPECT_EQ(SampleOnce(s, logits, {}, {0, 0, 0, 1}).token_id, 2);
  EXPECT_EQ(SampleOnce(s, logits, {}, {0, 1}).token_id, 0);
  // Counts are not carried over between calls.
  EXPECT_EQ(SampleOnce(s, logits, {}, {}).token_id, 0);
}

TEST(SamplerTest, NegativePresencePenaltyRewardsSeenTokens) {
  const std::vector<float> logits = {3.0f, 2.8f, 2.6f};
  SamplingParams p = Greedy();
  p.presence_penalty = -0.5f;
  Sampler s(p);
  EXPECT_EQ(SampleOnce(s, logits, {}, {2}).token_id, 2);  // 2.6 + 0.5 = 3.1
}

TEST(SamplerTest, BlockedIdsAreNeverChosen) {
  const std::vector<float> logits = {5.0f, 0.0f, 4.9f, 0.1f};
  Sampler g(Greedy());
  EXPECT_EQ(SampleOnce(g, logits, {}, {}, /*blocked=*/{0}).token_id, 2);
  Sampler s(Seeded(50));
  for (int i = 0; i < 2000; ++i) {
    const int32_t id = SampleOnce(s, logits, {}, {}, {0, 2}).token_id;
    EXPECT_TRUE(id == 1 || id == 3) << id;
  }
}

// ---------------------------------------------------------------------------
// Logprobs
// ---------------------------------------------------------------------------

TEST(SamplerTest, ChosenLogprobIsRawLogSoftmax) {
  const std::vector<float> logits = {1.5f, -0.25f, 3.0f, 0.75f, 2.0f, -4.0f};
  double max_v = 3.0, sum = 0.0;
  for (float v : logits) sum += std::exp(v - max_v);
  const double lse = max_v + std::log(sum);

  // Penalties, temperature and filters must not leak into the reported logprob.
  SamplingParams p = Seeded(51);
  p.temperature = 0.7f;
  p.top_k = 3;
  p.repetition_penalty = 1.3f;
  p.presence_penalty = 0.4f;
  Sampler s(p);
  for (int i = 0; i < 50; ++i) {
    const SampleResult r = SampleOnce(s, logits, {2}, {4});
    ASSERT_GE(r.token_id, 0);
    EXPECT_NEAR(r.logprob, logits[r.token_id] - lse, 1e-5);
    EXPECT_TRUE(r.top.empty());  // logprobs == 0: no list
  }
}

TEST(SamplerTest, LogprobsAccurateOverWideRange) {
  // Many tokens over a wide logit range, checked against double log-sum-exp: covers the
  // vectorized exp, its underflow cut-off and the blocked summation.
  constexpr int kVocab = 10007;  // not a multiple of the vector width or block size
  std::vector<float> logits(kVocab);
  std::mt19937 gen(3);
  std::uniform_real_distribution<float> dist(-40.0f, 30.0f);
  for (float& v : logits) v = dist(gen);
  logits[17] = -INFINITY;
  double max_v = -INFINITY;
  for (float v : logits) max_v = std::max(max_v, static_cast<double>(v));
  double sum = 0.0;
  for (float v : logits) sum += std::exp(v - max_v);
  const double lse = max_v + std::log(sum);

  SamplingParams p = Seeded(56);
  p.logprobs = 20;
  Sampler s(p);
  for (int i = 0; i < 20; ++i) {
    const SampleResult r = SampleOnce(s, logits);
    ASSERT_GE(r.token_id, 0);
    EXPECT_NEAR(r.logprob, logits[r.token_id] - lse, 1e-5);
    ASSERT_EQ(r.top.size(), 20u);
    for (const TokenLogprob& t : r.top) EXPECT_NEAR(t.logprob, logits[t.token_id] - lse, 1e-5);
  }
}

TEST(SamplerTest, TopLogprobsSortedAndSized) {
  const std::vector<float> logits = {1.5f, -0.25f, 3.0f, 0.75f, 2.0f, -4.0f, 2.0f};
  double max_v = 3.0, sum = 0.0;
  for (float v : logits) sum += std::exp(v - max_v);
  const double lse = max_v + std::log(sum);

  SamplingParams p = Greedy();
  p.logprobs = 4;
  Sampler s(p);
  const SampleResult r = SampleOnce(s, logits);
  EXPECT_EQ(r.token_id, 2);
  EXPECT_NEAR(r.logprob, 3.0 - lse, 1e-5);
  ASSERT_EQ(r.top.size(), 4u);
  const std::array<int32_t, 4> want_ids = {2, 4, 6, 0};  // tie 4/6: lower id first
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(r.top[i].token_id, want_ids[i]) << i;
    EXPECT_NEAR(r.top[i].logprob, logits[want_ids[i]] - lse, 1e-5) << i;
    if (i > 0) {
      EXPECT_GE(r.top[i - 1].logprob, r.top[i].logprob);
    }
  }

  // More requested than the vocabulary holds: every token, once.
  SamplingParams all = Greedy();
  all.logprobs = 20;
  Sampler s2(all);
  EXPECT_EQ(SampleOnce(s2, logits).top.size(), logits.size());
}

TEST(SamplerTest, LargeVocabTopKAndLogprobs) {
  // 256k vocab: the top-k heap, top-p and top-logprob selection at production size.
  constexpr int kVocab = 256000;
  std::vector<float> logits(kVocab);
  for (int i = 0; i < kVocab; ++i) {
    logits[i] = -0.001f * static_cast<float>((static_cast<int64_t>(i) * 7919) % kVocab);
  }
  SamplingParams p = Seeded(52);
  p.top_k = 5;
  p.top_p = 0.9f;
  p.logprobs = 3;
  Sampler s(p);
  // The top 5 logits are ids with (i * 7919) % kVocab in {0..4}.
  std::map<int32_t, int> hits;
  for (int i = 0; i < 200; ++i) {
    const SampleResult r = SampleOnce(s, logits);
    ASSERT_GE(r.token_id, 0);
    const int rank = static_cast<int>((static_cast<int64_t>(r.token_id) * 7919) % kVocab);
    EXPECT_LT(rank, 5);
    ASSERT_EQ(r.top.size(), 3u);
    EXPECT_EQ(r.top[0].token_id, 0);
    ++hits[r.token_id];
  }
  EXPECT_GT(hits.size(), 1u);
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

constexpr int32_t kVocab = 1000;

void ExpectInvalid(const SamplingParams& p, const std::string& field) {
  const absl::Status st = ValidateSamplingParams(p, kVocab);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field << ": " << st;
  EXPECT_NE(std::string(st.message()).find(field), std::string::npos) << st.message();
}

TEST(ValidateSamplingParamsTest, DefaultsAreValid) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}, kVocab).ok());
  SamplingParams p;
  p.temperature = 0.0f;
  p.top_k = -1;
  p.top_p = 1.0f;
  p.min_p = 1.0f;
  p.repetition_penalty = 2.0f;
  p.presence_penalty = -2.0f;
  p.frequency_penalty = 2.0f;
  p.max_tokens = 1;
  p.min_tokens = 1;
  p.logprobs = 20;
  p.stop = {"\n\n", std::string(256, 'x')};
  p.stop_token_ids = {0, kVocab - 1};
  EXPECT_TRUE(ValidateSamplingParams(p, kVocab).ok());
}

TEST(ValidateSamplingParamsTest, Temperature) {
  for (float t : {-0.1f, 100.5f, NAN, INFINITY}) {
    SamplingParams p;
    p.temperature = t;
    ExpectInvalid(p, "temperature");
  }
}

TEST(ValidateSamplingParamsTest, TopP) {
  for (float v : {0.0f, -0.5f, 1.5f, NAN}) {
    SamplingParams p;
    p.top_p = v;
    ExpectInvalid(p, "top_p");
  }
  SamplingParams p;
  p.top_p = 1.5f;
  EXPECT_EQ(std::string(ValidateSamplingParams(p, kVocab).message()),
            "top_p must be in (0, 1], got 1.5");
}

TEST(ValidateSamplingParamsTest, TopK) {
  SamplingParams p;
  p.top_k = -2;
  ExpectInvalid(p, "top_k");
}

TEST(ValidateSamplingParamsTest, MinP) {
  for (float v : {-0.01f, 1.01f, NAN}) {
    SamplingParams p;
    p.min_p = v;
    ExpectInvalid(p, "min_p");
  }
}

TEST(ValidateSamplingParamsTest, RepetitionPenalty) {
  for (float v : {0.0f, -1.0f, 2.01f, NAN}) {
    SamplingParams p;
    p.repetition_penalty = v;
    ExpectInvalid(p, "repetition_penalty");
  }
}

TEST(ValidateSamplingParamsTest, PresencePenalty) {
  for (float v : {-2.01f, 2.01f, NAN}) {
    SamplingParams p;
    p.presence_penalty = v;
    ExpectInvalid(p, "presence_penalty");
  }
}

TEST(ValidateSamplingParamsTest, FrequencyPenalty) {
  for (float v : {-2.01f, 2.01f, NAN}) {
    SamplingParams p;
    p.frequency_penalty = v;
    ExpectInvalid(p, "frequency_penalty");
  }
}

TEST(ValidateSamplingParamsTest, MaxTokens) {
  SamplingParams p;
  p.max_tokens = 0;
  p.min_tokens = 0;
  ExpectInvalid(p, "max_tokens");
}

TEST(ValidateSamplingParamsTest, MinTokens) {
  SamplingParams p;
  p.min_tokens = -1;
  ExpectInvalid(p, "min_tokens");
  p.min_tokens = p.max_tokens + 1;
  ExpectInvalid(p, "min_tokens");
}

TEST(ValidateSamplingParamsTest, Logprobs) {
  SamplingParams p;
  p.logprobs = -1;
  ExpectInvalid(p, "logprobs");
  p.logprobs = 21;
  ExpectInvalid(p, "logprobs");
}

TEST(ValidateSamplingParamsTest, Stop) {
  SamplingParams p;
  p.stop.assign(17, "x");
  ExpectInvalid(p, "stop");
  p.stop = {"ok", ""};
  ExpectInvalid(p, "stop");
  p.stop = {std::string(257, 'x')};
  ExpectInvalid(p, "stop");
}

TEST(ValidateSamplingParamsTest, StopTokenIds) {
  SamplingParams p;
  p.stop_token_ids.assign(65, 1);
  ExpectInvalid(p, "stop_token_ids");
  p.stop_token_ids = {-1};
  ExpectInvalid(p, "stop_token_ids");
  p.stop_token_ids = {kVocab};
  ExpectInvalid(p, "stop_token_ids");
}

}  // namespace
}  // namespace qshard
