// `qshard bench`: prefill and decode throughput of the model forward, printed as a table
// next to two baselines measured in the same run: the portable scalar kernels, and the
// weight-streaming roofline (measured memory read bandwidth / bytes of weights per step).
// --fusion-ab-rounds N adds a third: the same model loaded with the other
// --fuse-projections setting (separate q/k/v and gate/up Linears, or fused ones), both
// resident and run alternately N times each.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "kv/memory_planner.h"
#include "kv/model_shapes.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/base/status_macros.h"
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

// A /proc/self/status field in bytes (VmRSS, VmHWM); 0 when unavailable.
int64_t ProcStatusBytes(const char* field) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  int64_t kib = 0;
  const size_t len = std::strlen(field);
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, field, len) == 0 && line[len] == ':') {
      kib = std::strtoll(line + len + 1, nullptr, 10);
      break;
    }
  }
  std::fclose(f);
  return kib * 1024;
}
int64_t ResidentBytes() { return ProcStatusBytes("VmRSS"); }
int64_t PeakResidentBytes() { return ProcStatusBytes("VmHWM"); }

// --load-format dummy: random weights of a known shape on the backend, and a KV cache just
// large enough for the benchmark (or --kv-cache-memory-bytes when given).
absl::StatusOr<std::pair<std::unique_ptr<Backend>, std::unique_ptr<LlamaModel>>>
BuildDummyModel(const EngineOptions& options, const std::string& shape_name,
                const std::string& format, uint64_t seed, int64_t prefill_tokens,
                const std::vector<int64_t>& batches, int64_t decode_steps) {
  QSHARD_ASSIGN_OR_RETURN(ModelConfig shape, ModelShapeByName(shape_name));
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateBackend(options.device));
  ModelLoadOptions load;
  load.fuse_projections = options.fuse_projections;
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model,
                          LlamaModel::CreateDummy(shape, format, backend.get(), seed, load));
  if (options.block_size <= 0 || options.block_size > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("--block-size must be in [1, 1024], got ", options.block_size));
  }
  KvCacheSpec spec = KvCacheSpecFor(
      shape,
      ResolveKvCacheDType(options.kv_cache_dtype,
                          backend->device() == Device::kCpu ? DType::kF32 : shape.dtype),
      options.block_size);
  const int64_t bs = spec.block_size;
  int64_t needed = (prefill_tokens + bs - 1) / bs;
  for (int64_t b : batches) needed = std::max(needed, b * ((16 + decode_steps + bs - 1) / bs));
  spec.num_blocks = options.kv_cache_memory_bytes > 0
                        ? KvBlocksForBudget(spec, options.kv_cache_memory_bytes)
                        : needed;
  QSHARD_RETURN_IF_ERROR(model->AllocateKvCache(spec));
  if (spec.dtype == DType::kF8E4M3 || spec.dtype == DType::kF8E5M2) {
    QSHARD_RETURN_IF_ERROR(model->ApplyKvScales(options.calculate_kv_scales));
  }
  return std::make_pair(std::move(backend), std::move(model));
}

// "q|k|v 22/22, gate|up 22/22": layers running each fused Linear.
std::string FusionSummary(const LlamaModel& model) {
  const int layers = static_cast<int>(model.config().num_layers);
  int qkv = 0, gate_up = 0;
  for (int l = 0; l < layers; ++l) {
    qkv += model.qkv_fused(l) ? 1 : 0;
    gate_up += model.gate_up_fused(l) ? 1 : 0;
  }
  return absl::StrFormat("q|k|v %d/%d, gate|up %d/%d layers", qkv, layers, gate_up, layers);
}

// The best of each benchmark over several runs.
void KeepBest(const BenchResult& r, BenchResult& best) {
  best.prefill_tps = std::max(best.prefill_tps, r.prefill_tps);
  best.decode_tps.resize(std::max(best.decode_tps.size(), r.decode_tps.size()), 0.0);
  for (size_t i = 0; i < r.decode_tps.size(); ++i) {
    best.decode_tps[i] = std::max(best.decode_tps[i], r.decode_tps[i]);
  }
}

}  // namespace

int BenchMain(int argc, char** argv) {
  FlagSet flags("qshard bench",
                "Measures prefill tokens/s for one prompt and decode tokens/s at several batch "
                "sizes, with the scalar kernels and the memory roofline as baselines. "
                "--load-format dummy --shape NAME --dummy-format F benchmarks random weights "
                "of a known model shape (e.g. tinyllama-1.1b) without a checkpoint.");
  EngineFlags ef;
  ef.model_required = false;  // checked below: not needed with --load-format dummy
  ef.Register(flags, /*with_batching=*/false);
  int64_t prefill_tokens = 256, decode_steps = 32, repeats = 3, seed = 0;
  int64_t ab_rounds = 0;
  std::string batches_text = "1,8";
  std::string load_format = "auto", shape_name, dummy_format = "bf16";
  bool scalar_baseline = true;
  flags.AddInt("prefill-tokens", &prefill_tokens, "prompt length for the prefill benchmark");
  flags.AddString("batches", &batches_text, "comma-separated decode batch sizes");
  flags.AddInt("decode-steps", &decode_steps, "decode steps per batch size");
  flags.AddInt("repeats", &repeats, "prefill repetitions (best is reported)");
  flags.AddBool("scalar-baseline", &scalar_baseline,
                "also run the portable scalar kernels (default: on for a checkpoint, off for "
                "--load-format dummy)");
  flags.AddString("load-format", &load_format,
                  "auto (the checkpoint in --model) or dummy (random weights of --shape)");
  flags.AddString("shape", &shape_name,
                  absl::StrCat("model shape for --load-format dummy: ",
                               absl::StrJoin(ModelShapeNames(), ", ")));
  flags.AddString("dummy-format", &dummy_format,
                  absl::StrCat("weight format for --load-format dummy: ",
                               absl::StrJoin(LlamaModel::DummyFormats(), ", ")));
  flags.AddInt("seed", &seed, "random seed of the dummy weights");
  flags.AddInt("fusion-ab-rounds", &ab_rounds,
               "N > 0: also load the model with the other --fuse-projections setting, run "
               "the two alternately N times each after the main table, and print the best of "
               "each with the fused / separate ratio");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("bench", st);
  const bool dummy = load_format == "dummy";
  if (!dummy && load_format != "auto") {
    return ReportFlagError("bench", absl::InvalidArgumentError(absl::StrCat(
                                        "--load-format: unknown value '", load_format,
                                        "'; expected auto or dummy")));
  }
  if (dummy && shape_name.empty()) {
    return ReportFlagError("bench", absl::InvalidArgumentError(
                                        "--load-format dummy needs --shape NAME (known: " +
                                        absl::StrJoin(ModelShapeNames(), ", ") + ")"));
  }
  if (!dummy && ef.model.empty()) {
    return ReportFlagError("bench", absl::InvalidArgumentError(
                                        "missing required flag --model for qshard bench (or "
                                        "--load-format dummy --shape NAME; see --help)"));
  }
  if (ab_rounds < 0) {
    return ReportFlagError("bench", absl::InvalidArgumentError("--fusion-ab-rounds must be >= 0"));
  }
  if (prefill_tokens < 1 || decode_steps < 1 || repeats < 1) {
    return ReportFlagError("bench", absl::InvalidArgumentError(
                                        "--prefill-tokens, --decode-steps and --repeats must "
                                        "be >= 1"));
  }
  // The scalar kernels take minutes per token at 1B parameters: off for dummy shapes unless
  // asked for explicitly.
  if (dummy) {
    bool explicit_scalar = false;
    for (int i = 2; i < argc; ++i) {
      const absl::string_view a = argv[i];
      if (absl::StartsWith(a, "--scalar-baseline") || absl::StartsWith(a, "--no-scalar-baseline")) {
        explicit_scalar = true;
      }
    }
    if (!explicit_scalar) scalar_baseline = false;
  }
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

  std::unique_ptr<Engine> engine;
  std::unique_ptr<Backend> dummy_backend;
  std::unique_ptr<LlamaModel> dummy_model;
  LlamaModel* model = nullptr;
  const auto load_start = Clock::now();
  if (dummy) {
    auto built = BuildDummyModel(*options, shape_name, dummy_format,
                                 static_cast<uint64_t>(seed), prefill_tokens, batches,
                                 decode_steps);
    if (!built.ok()) return ReportFlagError("bench", built.status());
    dummy_backend = std::move(built->first);
    dummy_model = std::move(built->second);
    model = dummy_model.get();
  } else {
    auto created = Engine::Create(*options);
    if (!created.ok()) return ReportFlagError("bench", created.status());
    engine = std::move(*created);
    model = &engine->model();
  }
  const double load_seconds = Seconds(load_start);
  const int64_t rss_after_load = ResidentBytes();

  auto simd = RunBench(*model, prefill_tokens, batches, decode_steps, repeats);
  if (!simd.ok()) return ReportFlagError("bench", simd.status());
  BenchResult scalar;
  const bool had_simd = cpu::HasAvx2();
  const bool on_gpu = model->backend().device() != Device::kCpu;
  if (scalar_baseline && had_simd && !on_gpu) {  // the scalar kernels are the CPU's
    cpu::SetSimdEnabled(false);
    auto sr = RunBench(*model, prefill_tokens, batches, std::min<int64_t>(decode_steps, 8), 1);
    cpu::SetSimdEnabled(true);
    if (!sr.ok()) return ReportFlagError("bench", sr.status());
    scalar = *sr;
  }
  std::pair<double, double> ttft = {0, 0};
  if (engine != nullptr) {
    auto t = MeasureTtft(*engine, prefill_tokens);
    if (!t.ok()) return ReportFlagError("bench", t.status());
    ttft = *t;
  }
  const int64_t rss_peak = PeakResidentBytes();
  // The host's read bandwidth is the roofline of a CPU model only; for a GPU model
  // qshard_cuda_bench measures the device's (a device-to-device copy) in the same run.
  const double bw = on_gpu ? 0.0 : MeasureReadBandwidth();
  if (on_gpu) {
    std::printf("roofline: not measured here for a GPU model (0 below); qshard_cuda_bench "
                "measures the device's copy bandwidth in the same run\n");
  }
  const WeightSummary& ws = model->weight_summary();
  const double weight_bytes = static_cast<double>(ws.total_bytes);
  // Decode at batch B streams all linear weights once per step. The embedding table is
  // gathered, not streamed: for dummy weights (bf16, untied) it is left out of the bytes
  // per step; for checkpoints everything counts, as it is small next to the rest.
  double streamed_bytes = weight_bytes;
  if (dummy && !model->config().tie_word_embeddings) {
    streamed_bytes -= static_cast<double>(model->config().vocab_size) *
                      static_cast<double>(model->config().hidden_size) * 2.0;
  }
  const double roofline_step = bw / streamed_bytes;

  if (dummy) {
    std::printf("model: dummy %s (%s weights, seed %lld)   backend: %s   threads: %d\n",
                shape_name.c_str(), dummy_format.c_str(), static_cast<long long>(seed),
                model->backend().name().c_str(), ThreadPool::Global().num_threads());
  } else {
    std::printf("model: %s   backend: %s   threads: %d\n", options->model_dir.c_str(),
                model->backend().name().c_str(), ThreadPool::Global().num_threads());
  }
  std::printf("quantization: %s   linear kernel: %s   lm_head: %s\n",
              ws.quantization.c_str(), ws.linear_kernel.c_str(), ws.lm_head_kernel.c_str());
  std::printf("fused projections: %s\n", FusionSummary(*model).c_str());
  std::printf("weights: %.1f MiB (%.1f MiB streamed per decode step)   load: %.1f s\n",
              weight_bytes / 1048576.0, streamed_bytes / 1048576.0, load_seconds);
  std::printf("resident memory: %.1f MiB after load, %.1f MiB peak   measured read bandwidth: "
              "%.1f GB/s\n\n",
              rss_after_load / 1048576.0, rss_peak / 1048576.0, bw / 1e9);
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
  if (!batches.empty() && bw > 0) {
    std::printf("\nweight streaming at decode batch %lld: %.1f GB/s (%.0f%% of the measured "
                "read bandwidth)\n",
                static_cast<long long>(batches[0]),
                simd->decode_tps[0] / batches[0] * streamed_bytes / 1e9,
                100 * simd->decode_tps[0] / batches[0] * streamed_bytes / bw);
  }
  if (engine != nullptr) {
    std::printf("\nTTFT, %lld-token prompt through the engine: cold %.2f ms, repeated %.2f ms "
                "(%.1fx; prefix caching %s)\n",
                static_cast<long long>(prefill_tokens), ttft.first * 1e3, ttft.second * 1e3,
                ttft.first / ttft.second, options->enable_prefix_caching ? "on" : "off");
  }

  if (ab_rounds > 0) {
    // The same weights loaded with the other fusion setting; both models stay resident and
    // run alternately (the other one first in each round), so drift of the machine hits
    // both alike.
    EngineOptions other_options = *options;
    other_options.fuse_projections = !options->fuse_projections;
    std::unique_ptr<Engine> other_engine;
    std::unique_ptr<Backend> other_backend;
    std::unique_ptr<LlamaModel> other_dummy;
    LlamaModel* other = nullptr;
    if (dummy) {
      auto built =
          BuildDummyModel(other_options, shape_name, dummy_format, static_cast<uint64_t>(seed),
                          prefill_tokens, batches, decode_steps);
      if (!built.ok()) return ReportFlagError("bench", built.status());
      other_backend = std::move(built->first);
      other_dummy = std::move(built->second);
      other = other_dummy.get();
    } else {
      auto created = Engine::Create(other_options);
      if (!created.ok()) return ReportFlagError("bench", created.status());
      other_engine = std::move(*created);
      other = &other_engine->model();
    }
    LlamaModel* fused = options->fuse_projections ? model : other;
    LlamaModel* separate = options->fuse_projections ? other : model;
    BenchResult best_fused, best_separate;
    for (int64_t round = 0; round < ab_rounds; ++round) {
      for (LlamaModel* m : {other, model}) {
        auto r = RunBench(*m, prefill_tokens, batches, decode_steps, repeats);
        if (!r.ok()) return ReportFlagError("bench", r.status());
        KeepBest(*r, m == fused ? best_fused : best_separate);
      }
    }
    std::printf(
        "\nfused (%s) vs separate Linears (%s), same run, %s model loaded first: "
        "best of %lld runs each, alternating\n",
        FusionSummary(*fused).c_str(), FusionSummary(*separate).c_str(),
        options->fuse_projections ? "fused" : "separate", static_cast<long long>(ab_rounds));
    std::printf("| %-22s | %12s | %14s | %16s |\n", "benchmark", "fused tok/s", "separate tok/s",
                "fused / separate");
    std::printf("|------------------------|--------------|----------------|------------------|\n");
    auto ab_row = [&](const std::string& name, double f, double s) {
      std::printf("| %-22s | %12.1f | %14.1f | %15.3fx |\n", name.c_str(), f, s,
                  s > 0 ? f / s : 0.0);
    };
    ab_row(absl::StrFormat("prefill %lld tokens", static_cast<long long>(prefill_tokens)),
           best_fused.prefill_tps, best_separate.prefill_tps);
    for (size_t i = 0; i < batches.size(); ++i) {
      ab_row(absl::StrFormat("decode batch %lld", static_cast<long long>(batches[i])),
             best_fused.decode_tps[i], best_separate.decode_tps[i]);
    }
  }
  return 0;
}

}  // namespace qshard
