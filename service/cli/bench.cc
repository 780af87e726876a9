// `qshard bench`: prefill and decode throughput of the model forward, printed as a table
// next to two baselines measured in the same run: the portable scalar kernels, and the
// weight-streaming roofline (measured memory read bandwidth / bytes of weights per step).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <numeric>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/base/thread_pool.h"
#include "runtime/model/llama_model.h"
#include "service/cli/commands.h"

namespace qshard {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a) {
  return std::chrono::duration<double>(Clock::now() - a).count();
}

// Read bandwidth of the machine (bytes/s): threaded sum over a buffer much larger than
// the caches, best of a few passes.
double MeasureReadBandwidth() {
  const size_t n = size_t{256} << 20 >> 2;  // 256 MiB of floats
  std::vector<float> buf(n, 1.0f);
  double best = 0;
  for (int rep = 0; rep < 4; ++rep) {
    std::vector<double> partial(ThreadPool::Global().num_threads() * 8, 0.0);
    auto t0 = Clock::now();
    ThreadPool::Global().ParallelFor(static_cast<int64_t>(n), [&](int64_t b, int64_t e) {
      // Dot with itself keeps the loop vectorized and the result live.
      float s = cpu::Dot(buf.data() + b, buf.data() + b, e - b);
      partial[(b * 8 * ThreadPool::Global().num_threads()) / n] += s;
    });
    double dt = Seconds(t0);
    best = std::max(best, n * sizeof(float) / dt);
  }
  return best;
}

struct BenchResult {
  double prefill_tps = 0;
  std::vector<double> decode_tps;  // per batch size
};

absl::StatusOr<BenchResult> RunBench(LlamaModel& model, int64_t prefill_tokens,
                                     const std::vector<int64_t>& batches, int64_t decode_steps,
                                     int64_t repeats) {
  const KvCacheSpec& kv = model.kv_cache_spec();
  const int64_t bs = kv.block_size;
  const int64_t vocab = model.config().vocab_size;
  std::vector<float> logits;
  BenchResult r;
  // Deterministic pseudo-text: token ids spread over the vocabulary.
  auto token = [&](int64_t i) { return static_cast<int32_t>(3 + (i * 7919) % (vocab - 3)); };

  // Prefill: one sequence of prefill_tokens, logits of the last token only.
  {
    std::vector<int32_t> ids(prefill_tokens);
    for (int64_t i = 0; i < prefill_tokens; ++i) ids[i] = token(i);
    std::vector<int32_t> table((prefill_tokens + bs - 1) / bs);
    std::iota(table.begin(), table.end(), 0);
    SequenceChunk c{ids, 0, table, LogitsMode::kLast};
    absl::Status st = model.Forward({&c, 1}, &logits);  // warm-up
    if (!st.ok()) return st;
    double best = 1e30;
    for (int64_t rep = 0; rep < repeats; ++rep) {
      auto t0 = Clock::now();
      st = model.Forward({&c, 1}, &logits);
      if (!st.ok()) return st;
      best = std::min(best, Seconds(t0));
    }
    r.prefill_tps = prefill_tokens / best;
  }

  // Decode: B sequences, each with a 16-token context, then decode_steps single tokens.
  for (int64_t B : batches) {
    const int64_t ctx = 16;
    const int64_t blocks_per_seq = (ctx + decode_steps + bs - 1) / bs;
    if (B * blocks_per_seq > kv.num_blocks) {
      return absl::ResourceExhaustedError("KV cache too small for the decode benchmark");
    }
    std::vector<std::vector<int32_t>> tables(B), prompts(B);
    for (int64_t s = 0; s < B; ++s) {
      for (int64_t b = 0; b < blocks_per_seq; ++b) {
        tables[s].push_back(static_cast<int32_t>(s * blocks_per_seq + b));
      }
      for (int64_t i = 0; i < ctx; ++i) prompts[s].push_back(token(s * 131 + i));
    }
    std::vector<SequenceChunk> chunks(B);
    for (int64_t s = 0; s < B; ++s) chunks[s] = {prompts[s], 0, tables[s], LogitsMode::kLast};
    absl::Status st = model.Forward(chunks, &logits);
    if (!st.ok()) return st;
    std::vector<int32_t> next(B);
    auto t0 = Clock::now();
    for (int64_t step = 0; step < decode_steps; ++step) {
      for (int64_t s = 0; s < B; ++s) {
        next[s] = token(step * 17 + s);
        chunks[s] = {absl::Span<const int32_t>(&next[s], 1), static_cast<int32_t>(ctx + step),
                     tables[s], LogitsMode::kLast};
      }
      st = model.Forward(chunks, &logits);
      if (!st.ok()) return st;
    }
    r.decode_tps.push_back(B * decode_steps / Seconds(t0));
  }
  return r;
}

// Time to first token of a prefill_tokens prompt through the engine: cold, then the same
// prompt again (served from the prefix cache when it is on).
absl::StatusOr<std::pair<double, double>> MeasureTtft(Engine& engine, int64_t prefill_tokens) {
  const int64_t vocab = engine.config().vocab_size;
  std::vector<int32_t> prompt(prefill_tokens);
  for (int64_t i = 0; i < prefill_tokens; ++i) {
    prompt[i] = static_cast<int32_t>(3 + (i * 104729) % (vocab - 3));
  }
  double ttft[2] = {0, 0};
  for (int run = 0; run < 2; ++run) {
    Request r;
    r.id = absl::StrFormat("ttft-%d", run);
    r.prompt = prompt;
    r.params.temperature = 0;
    r.params.max_tokens = 1;
    auto t0 = Clock::now();
    absl::Status st = engine.AddRequest(r);
    if (!st.ok()) return st;
    bool first = false;
    while (engine.HasWork()) {
      auto outs = engine.Step();
      if (!outs.ok()) return outs.status();
      for (const auto& o : *outs) {
        if (!first && !o.token_ids.empty()) {
          ttft[run] = Seconds(t0);
          first = true;
        }
      }
    }
  }
  return std::make_pair(ttft[0], ttft[1]);
}

}  // namespace

int BenchMain(int argc, char** argv) {
  FlagSet flags("qshard bench",
                "Measures prefill tokens/s for one prompt and decode tokens/s at several batch "
                "sizes, with the scalar kernels and the memory roofline as baselines.");
  EngineFlags ef;
  ef.Register(flags, /*with_batching=*/false);
  int64_t prefill_tokens = 256, decode_steps = 32, repeats = 3;
  std::string batches_text = "1,8";
  bool scalar_baseline = true;
  flags.AddInt("prefill-tokens", &prefill_tokens, "prompt length for the prefill benchmark");
  flags.AddString("batches", &batches_text, "comma-separated decode batch sizes");
  flags.AddInt("decode-steps", &decode_steps, "decode steps per batch size");
  flags.AddInt("repeats", &repeats, "prefill repetitions (best is reported)");
  flags.AddBool("scalar-baseline", &scalar_baseline, "also run the portable scalar kernels");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("bench", st);
  auto options = ef.ToOptions();
  if (!options.ok()) return ReportFlagError("bench", options.status());
  std::vector<int64_t> batches;
  for (absl::string_view part : absl::StrSplit(batches_text, ',', absl::SkipEmpty())) {
    int64_t b;
    if (!absl::SimpleAtoi(part, &b) || b < 1) {
      return ReportFlagError("bench", absl::InvalidArgumentError(
                                          "--batches: expected positive integers like 1,8"));
    }
    batches.push_back(b);
  }
  options->max_model_len = std::max<int64_t>(prefill_tokens + 1, 16 + decode_steps + 1);
  auto engine = Engine::Create(*options);
  if (!engine.ok()) return ReportFlagError("bench", engine.status());
  LlamaModel& model = (*engine)->model();

  auto simd = RunBench(model, prefill_tokens, batches, decode_steps, repeats);
  if (!simd.ok()) return ReportFlagError("bench", simd.status());
  BenchResult scalar;
  const bool had_simd = cpu::HasAvx2();
  if (scalar_baseline && had_simd) {
    cpu::SetSimdEnabled(false);
    auto sr = RunBench(model, prefill_tokens, batches, std::min<int64_t>(decode_steps, 8), 1);
    cpu::SetSimdEnabled(true);
    if (!sr.ok()) return ReportFlagError("bench", sr.status());
    scalar = *sr;
  }
  auto ttft = MeasureTtft(**engine, prefill_tokens);
  if (!ttft.ok()) return ReportFlagError("bench", ttft.status());
  const double bw = MeasureReadBandwidth();
  const double weight_bytes = static_cast<double>(model.weight_summary().total_bytes);
  // Decode at batch B streams all linear weights once per step (the embedding table is
  // gathered, not streamed, but it is small next to the rest for real models).
  const double roofline_step = bw / weight_bytes;

  std::printf("model: %s   backend: %s   threads: %d\n", options->model_dir.c_str(),
              model.backend().name().c_str(), ThreadPool::Global().num_threads());
  std::printf("weights: %.1f MiB   measured read bandwidth: %.1f GB/s\n\n",
              weight_bytes / 1048576.0, bw / 1e9);
  std::printf("| %-22s | %12s | %12s | %8s | %14s | %10s |\n", "benchmark", "tokens/s",
              "scalar tok/s", "speedup", "roofline tok/s", "% roofline");
  std::printf("|------------------------|--------------|--------------|----------|----------------|------------|\n");
  auto row = [&](const std::string& name, double v, double s, double roof) {
    std::printf("| %-22s | %12.1f | %12s | %8s | %14s | %10s |\n", name.c_str(), v,
                s > 0 ? absl::StrFormat("%.1f", s).c_str() : "-",
                s > 0 ? absl::StrFormat("%.1fx", v / s).c_str() : "-",
                roof > 0 ? absl::StrFormat("%.1f", roof).c_str() : "-",
                roof > 0 ? absl::StrFormat("%.0f%%", 100 * v / roof).c_str() : "-");
  };
  row(absl::StrFormat("prefill %lld tokens", static_cast<long long>(prefill_tokens)),
      simd->prefill_tps, scalar.prefill_tps, 0);
  for (size_t i = 0; i < batches.size(); ++i) {
    row(absl::StrFormat("decode batch %lld", static_cast<long long>(batches[i])),
        simd->decode_tps[i], i < scalar.decode_tps.size() ? scalar.decode_tps[i] : 0,
        roofline_step * batches[i]);
  }
  std::printf("\nTTFT, %lld-token prompt through the engine: cold %.2f ms, repeated %.2f ms "
              "(%.1fx; prefix caching %s)\n",
              static_cast<long long>(prefill_tokens), ttft->first * 1e3, ttft->second * 1e3,
              ttft->first / ttft->second, options->enable_prefix_caching ? "on" : "off");
  return 0;
}

}  // namespace qshard
