// `qshard loadgen`: a bounded load generator, in the spirit of vLLM's serving benchmark:
// N requests of random prompt tokens, C at a time, each generating exactly --max-tokens
// (ignore_eos), reporting throughput and TTFT / inter-token / end-to-end percentiles.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "nlohmann/json.hpp"
#include "qshard/v1/qshard.grpc.pb.h"
#include "service/cli/commands.h"
#include "service/server/request_translation.h"
#include "service/server/server_commands.h"

namespace qshard {
namespace {

using Clock = std::chrono::steady_clock;

struct RequestResult {
  grpc::StatusCode code = grpc::StatusCode::OK;
  double ttft_s = -1;  // < 0: no token arrived
  double e2e_s = 0;
  std::vector<double> gaps_s;  // between consecutive token arrivals
  int64_t output_tokens = 0;
};

// Nearest-rank percentile of a sorted list (0 when empty).
double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  size_t rank = static_cast<size_t>(p / 100.0 * static_cast<double>(sorted.size()) + 0.999999);
  rank = std::clamp<size_t>(rank, 1, sorted.size());
  return sorted[rank - 1];
}

struct Summary {
  double p50 = 0, p90 = 0, p99 = 0, mean = 0;
};

Summary Summarize(std::vector<double> v) {
  Summary s;
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.p50 = Percentile(v, 50);
  s.p90 = Percentile(v, 90);
  s.p99 = Percentile(v, 99);
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  return s;
}

RequestResult RunOne(v1::Qshard::Stub& stub, const v1::GenerateRequest& req,
                     Clock::time_point deadline) {
  RequestResult r;
  grpc::ClientContext ctx;
  ctx.set_deadline(
      std::chrono::system_clock::now() +
      std::chrono::duration_cast<std::chrono::system_clock::duration>(deadline - Clock::now()));
  const auto start = Clock::now();
  auto last = start;
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    if (!resp.has_chunk() || resp.chunk().token_ids_size() == 0) continue;
    const auto now = Clock::now();
    const int n = resp.chunk().token_ids_size();
    if (r.ttft_s < 0) {
      r.ttft_s = std::chrono::duration<double>(now - start).count();
    } else {
      // Tokens coalesced into one message share the gap since the previous message.
      const double gap = std::chrono::duration<double>(now - last).count() / n;
      for (int i = 0; i < n; ++i) r.gaps_s.push_back(gap);
    }
    last = now;
    r.output_tokens += n;
  }
  r.code = reader->Finish().error_code();
  r.e2e_s = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

}  // namespace

int LoadgenMain(int argc, char** argv) {
  FlagSet flags("qshard loadgen",
                "Sends --requests Generate calls of --prompt-tokens random token ids, "
                "--concurrency at a time, each generating exactly --max-tokens (ignore_eos), "
                "and prints requests/s, output tokens/s, TTFT / inter-token / end-to-end "
                "latency percentiles and errors by status code.");
  std::string addr;
  int64_t concurrency = 1, requests = 100, prompt_tokens = 32, max_tokens = 64, seed = 0;
  double timeout_s = 600, temperature = 1.0;
  std::string format = "text";
  flags.AddString("addr", &addr, "server address HOST:PORT", /*required=*/true);
  flags.AddInt("concurrency", &concurrency, "requests in flight at once");
  flags.AddInt("requests", &requests, "requests to send in total");
  flags.AddInt("prompt-tokens", &prompt_tokens, "random prompt length in tokens (BOS included)");
  flags.AddInt("max-tokens", &max_tokens, "tokens to generate per request");
  flags.AddInt("seed", &seed, "seed of the prompts and of each request's sampling");
  flags.AddDouble("temperature", &temperature, "sampling temperature (0 = greedy)");
  flags.AddDouble("timeout-s", &timeout_s, "bound on the whole run; unfinished requests fail");
  flags.AddString("format", &format, "text or json (one object on stdout)");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("loadgen", st);
  if (concurrency < 1 || requests < 1 || prompt_tokens < 1 || max_tokens < 1 || !(timeout_s > 0)) {
    return ReportFlagError(
        "loadgen", absl::InvalidArgumentError("--concurrency, --requests, --prompt-tokens, "
                                              "--max-tokens and --timeout-s must be positive"));
  }
  if (format != "text" && format != "json") {
    return ReportFlagError("loadgen", absl::InvalidArgumentError("--format must be text or json"));
  }

  auto channel = grpc::CreateChannel(addr, grpc::InsecureChannelCredentials());
  auto stub = v1::Qshard::NewStub(channel);
  v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    ctx.set_wait_for_ready(true);
    grpc::Status st = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!st.ok()) {
      std::fprintf(stderr, "qshard loadgen: GetModelInfo on %s: %s\n", addr.c_str(),
                   st.error_message().c_str());
      return 1;
    }
  }

  // Random prompts over ordinary tokens: ids above every special id the model names.
  int32_t lowest = 0;
  lowest = std::max(lowest, info.bos_token_id() + 1);
  for (int32_t id : info.eos_token_ids()) lowest = std::max(lowest, id + 1);
  std::mt19937_64 rng(static_cast<uint64_t>(seed));
  std::uniform_int_distribution<int32_t> pick(lowest, info.vocab_size() - 1);
  std::vector<v1::GenerateRequest> reqs(static_cast<size_t>(requests));
  for (int64_t i = 0; i < requests; ++i) {
    v1::GenerateRequest& req = reqs[static_cast<size_t>(i)];
    req.set_request_id(absl::StrCat("loadgen-", seed, "-", i));
    v1::TokenIds* ids = req.mutable_token_ids();
    if (info.bos_token_id() >= 0) ids->add_ids(info.bos_token_id());
    while (ids->ids_size() < prompt_tokens) ids->add_ids(pick(rng));
    v1::SamplingParams* sp = req.mutable_sampling();
    sp->set_temperature(static_cast<float>(temperature));
    sp->set_max_tokens(static_cast<int32_t>(max_tokens));
    sp->set_ignore_eos(true);
    sp->set_seed(static_cast<uint64_t>(seed) * 1000003u + static_cast<uint64_t>(i));
  }

  std::vector<RequestResult> results(reqs.size());
  std::atomic<size_t> next{0};
  const auto start = Clock::now();
  const auto deadline =
      start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  std::vector<std::thread> workers;
  for (int64_t w = 0; w < std::min(concurrency, requests); ++w) {
    workers.emplace_back([&] {
      for (size_t i = next.fetch_add(1); i < reqs.size(); i = next.fetch_add(1)) {
        results[i] = RunOne(*stub, reqs[i], deadline);
      }
    });
  }
  for (auto& t : workers) t.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();

  std::vector<double> ttft, itl, e2e;
  std::map<std::string, int64_t> errors;
  int64_t ok = 0, output_tokens = 0;
  for (const RequestResult& r : results) {
    output_tokens += r.output_tokens;
    if (r.code != grpc::StatusCode::OK) {
      ++errors[StatusCodeName(r.code)];
      continue;
    }
    ++ok;
    if (r.ttft_s >= 0) ttft.push_back(r.ttft_s);
    itl.insert(itl.end(), r.gaps_s.begin(), r.gaps_s.end());
    e2e.push_back(r.e2e_s);
  }
  const Summary s_ttft = Summarize(ttft), s_itl = Summarize(itl), s_e2e = Summarize(e2e);
  const double rps = static_cast<double>(ok) / elapsed;
  const double tps = static_cast<double>(output_tokens) / elapsed;

  if (format == "json") {
    nlohmann::json j;
    j["addr"] = addr;
    j["model"] = info.model_name();
    j["concurrency"] = concurrency;
    j["requests"] = requests;
    j["prompt_tokens"] = prompt_tokens;
    j["max_tokens"] = max_tokens;
    j["succeeded"] = ok;
    j["duration_s"] = elapsed;
    j["requests_per_s"] = rps;
    j["output_tokens"] = output_tokens;
    j["output_tokens_per_s"] = tps;
    const auto ms = [](const Summary& s) {
      return nlohmann::json{
          {"mean", s.mean * 1e3}, {"p50", s.p50 * 1e3}, {"p90", s.p90 * 1e3}, {"p99", s.p99 * 1e3}};
    };
    j["ttft_ms"] = ms(s_ttft);
    j["itl_ms"] = ms(s_itl);
    j["e2e_ms"] = ms(s_e2e);
    j["errors"] = nlohmann::json::object();
    for (const auto& [code, n] : errors) j["errors"][code] = n;
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("============ qshard loadgen ============\n");
  std::printf("%-28s %s (%s)\n", "Server:", addr.c_str(), info.model_name().c_str());
  std::printf("%-28s %lld x %lld prompt tokens -> %lld tokens, concurrency %lld\n",
              "Requests:", static_cast<long long>(requests), static_cast<long long>(prompt_tokens),
              static_cast<long long>(max_tokens), static_cast<long long>(concurrency));
  std::printf("%-28s %lld\n", "Successful requests:", static_cast<long long>(ok));
  std::printf("%-28s %.2f\n", "Duration (s):", elapsed);
  std::printf("%-28s %.2f\n", "Request throughput (req/s):", rps);
  std::printf("%-28s %.2f\n", "Output tokens/s:", tps);
  const auto row = [](const char* name, const Summary& s) {
    std::printf("%-28s mean %8.2f  p50 %8.2f  p90 %8.2f  p99 %8.2f\n", name, s.mean * 1e3,
                s.p50 * 1e3, s.p90 * 1e3, s.p99 * 1e3);
  };
  row("TTFT (ms):", s_ttft);
  row("Inter-token latency (ms):", s_itl);
  row("End-to-end latency (ms):", s_e2e);
  if (errors.empty()) {
    std::printf("%-28s none\n", "Errors:");
  } else {
    std::string list;
    for (const auto& [code, n] : errors)
      absl::StrAppend(&list, list.empty() ? "" : ", ", code, " ", n);
    std::printf("%-28s %s\n", "Errors:", list.c_str());
  }
  return 0;
}

}  // namespace qshard
