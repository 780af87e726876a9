// `qshard generate`: one prompt through the engine, generated text streamed to stdout.
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "runtime/base/log.h"
#include "service/cli/commands.h"

namespace qshard {

int GenerateMain(int argc, char** argv) {
  FlagSet flags("qshard generate",
                "Generates a continuation of --prompt and streams only the generated text to "
                "stdout (logs go to stderr).");
  EngineFlags ef;
  ef.Register(flags, /*with_batching=*/false);
  std::string prompt;
  int64_t max_tokens = 256, top_k = 0, min_tokens = 0;
  double temperature = 1.0, top_p = 1.0, min_p = 0.0, repetition_penalty = 1.0,
         presence_penalty = 0.0, frequency_penalty = 0.0;
  std::optional<int64_t> seed;
  std::string stop;
  bool ignore_eos = false;
  flags.AddString("prompt", &prompt, "the prompt text", /*required=*/true);
  flags.AddInt("max-tokens", &max_tokens, "maximum tokens to generate");
  flags.AddDouble("temperature", &temperature, "sampling temperature; 0 = greedy");
  flags.AddInt("top-k", &top_k, "keep the k most likely tokens (0 = off)");
  flags.AddDouble("top-p", &top_p, "nucleus sampling mass in (0, 1]");
  flags.AddDouble("min-p", &min_p, "drop tokens below min-p x the top probability");
  flags.AddDouble("repetition-penalty", &repetition_penalty, "penalty for seen tokens (1 = off)");
  flags.AddDouble("presence-penalty", &presence_penalty, "penalty for generated tokens");
  flags.AddDouble("frequency-penalty", &frequency_penalty, "penalty per repetition");
  flags.AddOptionalInt("seed", &seed, "random seed (same seed => same output)");
  flags.AddInt("min-tokens", &min_tokens, "tokens to generate before EOS is allowed");
  flags.AddString("stop", &stop, "stop string (not printed)");
  flags.AddBool("ignore-eos", &ignore_eos, "keep generating after EOS");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("generate", st);
  auto options = ef.ToOptions();
  if (!options.ok()) return ReportFlagError("generate", options.status());
  options->max_num_seqs = 1;

  auto engine = Engine::Create(*options);
  if (!engine.ok()) {
    std::fprintf(stderr, "qshard generate: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  Request req;
  req.id = "generate";
  req.prompt = (*engine)->tokenizer().Encode(prompt, /*add_special=*/true);
  SamplingParams& p = req.params;
  p.max_tokens = static_cast<int32_t>(max_tokens);
  p.temperature = static_cast<float>(temperature);
  p.top_k = static_cast<int32_t>(top_k);
  p.top_p = static_cast<float>(top_p);
  p.min_p = static_cast<float>(min_p);
  p.repetition_penalty = static_cast<float>(repetition_penalty);
  p.presence_penalty = static_cast<float>(presence_penalty);
  p.frequency_penalty = static_cast<float>(frequency_penalty);
  if (seed) p.seed = static_cast<uint64_t>(*seed);
  p.min_tokens = static_cast<int32_t>(min_tokens);
  if (!stop.empty()) p.stop.push_back(stop);
  p.ignore_eos = ignore_eos;
  if (absl::Status st = (*engine)->AddRequest(std::move(req)); !st.ok()) {
    std::fprintf(stderr, "qshard generate: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  FinishReason reason = FinishReason::kNone;
  int32_t completion = 0;
  while ((*engine)->HasWork()) {
    auto outs = (*engine)->Step();
    if (!outs.ok()) {
      std::fprintf(stderr, "qshard generate: %s\n", std::string(outs.status().message()).c_str());
      return 1;
    }
    for (const RequestOutput& o : *outs) {
      std::fwrite(o.text.data(), 1, o.text.size(), stdout);
      std::fflush(stdout);
      if (o.finished) {
        reason = o.finish_reason;
        completion = o.completion_tokens;
        if (reason == FinishReason::kError) {
          std::fprintf(stderr, "\nqshard generate: %s\n", std::string(o.error.message()).c_str());
          return 1;
        }
      }
    }
  }
  std::fputc('\n', stdout);
  QSHARD_LOG(INFO) << "finished: " << FinishReasonName(reason) << ", " << completion << " tokens";
  return 0;
}

}  // namespace qshard
