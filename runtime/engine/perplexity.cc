#include "runtime/engine/perplexity.h"

#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/base/status_macros.h"

namespace qshard {

std::vector<int32_t> PerplexityTokenStream(const Tokenizer& tok, const std::string& text) {
  std::vector<int32_t> stream;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    std::vector<int32_t> ids = tok.Encode(std::string(line), /*add_special=*/false);
    stream.push_back(tok.bos_id());
    stream.insert(stream.end(), ids.begin(), ids.end());
    stream.push_back(tok.eos_id());
  }
  return stream;
}

absl::StatusOr<PerplexityResult> EvaluatePerplexity(LlamaModel& model, const Tokenizer& tok,
                                                    const std::string& text,
                                                    const PerplexityOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (tok.bos_id() < 0 || tok.eos_id() < 0) {
    return absl::FailedPreconditionError("perplexity protocol needs BOS and EOS tokens");
  }
  const int64_t W = options.window;
  const std::vector<int32_t> stream = PerplexityTokenStream(tok, text);
  int64_t num_windows = static_cast<int64_t>(stream.size()) / W;
  if (options.max_windows > 0) num_windows = std::min(num_windows, options.max_windows);
  if (num_windows == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "text has ", stream.size(), " tokens, fewer than one window of ", W));
  }
  const int64_t bs = model.kv_cache_spec().block_size;
  const int64_t blocks_per_window = (W + bs - 1) / bs;
  const int64_t per_step =
      std::min(options.windows_per_step, model.kv_cache_spec().num_blocks / blocks_per_window);
  if (per_step < 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("KV cache too small for one window of ", W, " tokens"));
  }
  const int64_t vocab = model.config().vocab_size;

  double total_nll = 0;
  int64_t scored = 0;
  std::vector<float> logits;
  for (int64_t w0 = 0; w0 < num_windows; w0 += per_step) {
    const int64_t nw = std::min(per_step, num_windows - w0);
    std::vector<std::vector<int32_t>> tables(nw);
    std::vector<SequenceChunk> chunks(nw);
    for (int64_t i = 0; i < nw; ++i) {
      // Windows are independent sequences: each gets its own fixed slice of the cache.
      for (int64_t b = 0; b < blocks_per_window; ++b) {
        tables[i].push_back(static_cast<int32_t>(i * blocks_per_window + b));
      }
      chunks[i].tokens = absl::Span<const int32_t>(stream.data() + (w0 + i) * W, W);
      chunks[i].start_pos = 0;
      chunks[i].block_table = tables[i];
      chunks[i].logits = LogitsMode::kAll;
    }
    QSHARD_RETURN_IF_ERROR(model.Forward(chunks, &logits));
    for (int64_t i = 0; i < nw; ++i) {
      const int32_t* ids = stream.data() + (w0 + i) * W;
      for (int64_t t = 1; t < W; ++t) {
        // Row (t - 1) predicts token t; log-softmax in double.
        const float* row = logits.data() + (i * W + t - 1) * vocab;
        float mx = row[0];
        for (int64_t v = 1; v < vocab; ++v) mx = std::max(mx, row[v]);
        double sum = 0;
        for (int64_t v = 0; v < vocab; ++v) sum += std::exp(static_cast<double>(row[v]) - mx);
        total_nll += std::log(sum) + mx - row[ids[t]];
        ++scored;
      }
    }
    if (options.progress) options.progress(w0 + nw, num_windows);
  }
  PerplexityResult r;
  r.num_tokens = static_cast<int64_t>(stream.size());
  r.num_windows = num_windows;
  r.num_scored = scored;
  r.mean_nll = total_nll / static_cast<double>(scored);
  r.perplexity = std::exp(r.mean_nll);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace qshard
