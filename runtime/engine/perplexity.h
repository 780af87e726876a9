// File: perplexity.h
// The perplexity protocol of the shared fixtures: per non-empty line
// [BOS] + encode(line) + [EOS], concatenated; non-overlapping windows of `window` tokens
// (tail dropped); in each window tokens 1..window-1 are scored given their prefix.
#ifndef QSHARD_RUNTIME_ENGINE_PERPLEXITY_H_
#define QSHARD_RUNTIME_ENGINE_PERPLEXITY_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/model/llama_model.h"
#include "runtime/tokenizer/tokenizer.h"

namespace qshard {

struct PerplexityOptions {
  int64_t window = 256;
  int64_t windows_per_step = 4;   // windows batched into one forward
  int64_t block_size = 16;
  int64_t max_windows = 0;        // 0 = all
  // Called after each step with (windows done, windows total).
  std::function<void(int64_t, int64_t)> progress;
};

struct PerplexityResult {
  double perplexity = 0;
  double mean_nll = 0;
  int64_t num_tokens = 0;         // tokens in the stream
  int64_t num_windows = 0;
  int64_t num_scored = 0;
  double seconds = 0;
};

// The token stream of the protocol.
std::vector<int32_t> PerplexityTokenStream(const Tokenizer& tok, const std::string& text);

// Evaluates on `model`, which must have a KV cache of at least
// windows_per_step x ceil(window / block_size) blocks.
absl::StatusOr<PerplexityResult> EvaluatePerplexity(LlamaModel& model, const Tokenizer& tok,
                                                    const std::string& text,
                                                    const PerplexityOptions& options);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_ENGINE_PERPLEXITY_H_
