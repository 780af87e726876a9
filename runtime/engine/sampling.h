// File: sampling.h
// Per-request sampling parameters and the CPU sampler over one row of fp32 logits.
//
//   Sampler sampler(params);                 // seeds its own RNG from params.seed
//   SampleResult r = sampler.Sample(logits, vocab, history);
#ifndef QSHARD_RUNTIME_ENGINE_SAMPLING_H_
#define QSHARD_RUNTIME_ENGINE_SAMPLING_H_

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace qshard {

struct SamplingParams {
  float temperature = 1.0f;      // 0 = greedy
  int32_t top_k = 0;             // 0 = off
  float top_p = 1.0f;            // (0, 1]
  float min_p = 0.0f;            // [0, 1]
  float repetition_penalty = 1.0f;  // > 0; 1 = off (applies to prompt + output tokens)
  float presence_penalty = 0.0f;    // [-2, 2] (output tokens)
  float frequency_penalty = 0.0f;   // [-2, 2] (output tokens)
  std::optional<uint64_t> seed;     // same seed + inputs => same tokens
  int32_t max_tokens = 256;         // >= 1
  int32_t min_tokens = 0;           // EOS / stop ids blocked until this many generated
  std::vector<std::string> stop;    // stop strings (not returned)
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int32_t logprobs = 0;             // top-n logprobs per generated token, 0 = none
};

// Range-checks every field; the message names the field and the allowed range.
// vocab_size bounds stop_token_ids.
absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size);

struct TokenLogprob {
  int32_t token_id;
  float logprob;
};

struct SampleResult {
  int32_t token_id = -1;
  float logprob = 0.0f;               // of the chosen token (log-softmax of raw logits)
  std::vector<TokenLogprob> top;      // params.logprobs entries, best first
};

class Sampler {
 public:
  // Unseeded requests draw their seed from std::random_device.
  explicit Sampler(const SamplingParams& params);

  // logits: [vocab] raw fp32 (not modified). prompt / output: the sequence so far, for
  // penalties. blocked: ids that must not be chosen (EOS before min_tokens).
  SampleResult Sample(const float* logits, int32_t vocab, absl::Span<const int32_t> prompt,
                      absl::Span<const int32_t> output, absl::Span<const int32_t> blocked);

 private:
  // Applies blocked ids and the repetition / presence / frequency penalties to work_.
  void ApplyPenalties(int32_t vocab, absl::Span<const int32_t> prompt,
                      absl::Span<const int32_t> output, absl::Span<const int32_t> blocked);
  // Draws from softmax(work_ / temperature) restricted by top_k / top_p / min_p.
  int32_t SampleFromWork(int32_t vocab);
  // Fills result->top with the params_.logprobs best raw log-softmax entries.
  void FillTopLogprobs(const float* logits, int32_t vocab, double log_sum_exp,
                       SampleResult* result);

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<float> work_;
  std::vector<int32_t> index_;
  // Per-id scratch for the penalties, all zero between calls (only touched ids are reset,
  // so a call costs O(prompt + output), not O(vocab)).
  std::vector<int32_t> counts_;
  std::vector<uint8_t> seen_;
  // Sampling scratch: a second id list for the top_p cut, float values for the top_k
  // threshold, and per-block weight sums that let the final draw skip whole blocks.
  std::vector<int32_t> scratch_;
  std::vector<float> values_;
  std::vector<double> block_sums_;
};

}  // namespace qshard

#endif  // QSHARD_RUNTIME_ENGINE_SAMPLING_H_
