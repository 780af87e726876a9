// `qshard eval-ppl`: perplexity of a text file under the shared fixtures' protocol.
#include <cstdio>

#include "absl/strings/str_format.h"
#include "runtime/base/log.h"
#include "runtime/base/mapped_file.h"
#include "runtime/engine/perplexity.h"
#include "service/cli/commands.h"

namespace qshard {

int EvalPplMain(int argc, char** argv) {
  FlagSet flags("qshard eval-ppl",
                "Perplexity of --text: per non-empty line [BOS]+tokens+[EOS], concatenated, cut "
                "into non-overlapping windows (tail dropped); tokens 1..window-1 of each window "
                "are scored given their prefix. Ends with a line 'perplexity: X.XXXX'.");
  EngineFlags ef;
  ef.Register(flags, /*with_batching=*/false);
  std::string text_path;
  int64_t window = 256, batch = 4, max_windows = 0;
  flags.AddString("text", &text_path, "text file, one passage per line", /*required=*/true);
  flags.AddInt("window", &window, "tokens per window");
  flags.AddInt("batch", &batch, "windows per forward step");
  flags.AddInt("max-windows", &max_windows, "stop after this many windows (0 = all)");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("eval-ppl", st);
  auto options = ef.ToOptions();
  if (!options.ok()) return ReportFlagError("eval-ppl", options.status());
  if (window < 2 || batch < 1) {
    return ReportFlagError("eval-ppl",
                           absl::InvalidArgumentError("--window must be >= 2, --batch >= 1"));
  }
  auto text = ReadTextFile(text_path);
  if (!text.ok()) return ReportFlagError("eval-ppl", text.status());
  options->max_model_len = std::max<int64_t>(options->max_model_len, window + 1);
  auto engine = Engine::Create(*options);
  if (!engine.ok()) return ReportFlagError("eval-ppl", engine.status());
  // One step holds `batch` windows; grow the cache if the configured one is smaller.
  LlamaModel& model = (*engine)->model();
  KvCacheSpec spec = model.kv_cache_spec();
  const int64_t blocks = batch * ((window + spec.block_size - 1) / spec.block_size);
  if (spec.num_blocks < blocks) {
    spec.num_blocks = blocks;
    if (absl::Status st = model.AllocateKvCache(spec); !st.ok()) {
      return ReportFlagError("eval-ppl", st);
    }
  }
  PerplexityOptions po;
  po.window = window;
  po.windows_per_step = batch;
  po.max_windows = max_windows;
  po.progress = [](int64_t done, int64_t total) {
    if (done == total || done % 40 < 4) {
      QSHARD_LOG(INFO) << "eval-ppl: window " << done << " of " << total;
    }
  };
  auto r = EvaluatePerplexity(model, (*engine)->tokenizer(), *text, po);
  if (!r.ok()) return ReportFlagError("eval-ppl", r.status());
  std::printf("tokens: %lld\nwindows: %lld\nscored tokens: %lld\nmean nll: %.6f\n"
              "seconds: %.2f\nscored tokens/s: %.1f\n",
              static_cast<long long>(r->num_tokens), static_cast<long long>(r->num_windows),
              static_cast<long long>(r->num_scored), r->mean_nll, r->seconds,
              r->num_scored / r->seconds);
  std::printf("perplexity: %.4f\n", r->perplexity);
  return 0;
}

}  // namespace qshard
