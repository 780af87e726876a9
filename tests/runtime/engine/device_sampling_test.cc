// The engine's on-device sampling path (Backend::SupportsSampling / Sample, with the
// logits left in backend memory by LlamaModel::ForwardLogits) exercised on the CPU: a test
// backend forwards every op to the CPU backend and implements Sample with the host Sampler.
// Greedy sampling is exact, so the engine must produce the same tokens, logprobs and
// finish reasons as on its ordinary host path; what the engine hands the backend (rows in
// logit-row order, seeds, steps, penalty history, blocked ids) is checked directly; and a
// failing Sample ends that step's requests with the error while the engine keeps serving.
// (The CUDA Sample itself: tests/runtime/model_cuda/gpu_engine_sampling_test.cc.)
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/engine/engine.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

// What one Sample call received for one row (copied: the spans die with the step).
struct SeenRow {
  std::vector<int32_t> prompt, output, blocked;
  uint64_t seed = 0, step = 0;
  float temperature = 0, repetition = 0;
  int32_t num_logprobs = 0;
};

class HostSamplingBackend : public Backend {
 public:
  HostSamplingBackend() : cpu_(CreateCpuBackend()) {}

  std::vector<SeenRow> seen;  // every row of every Sample call, in order
  int fail_at_call = -1;      // Sample call number (0-based) that returns an error
  int calls = 0;

  bool SupportsSampling() const override { return true; }
  absl::Status Sample(const Tensor& logits, absl::Span<const SamplingRow> rows,
                      std::vector<SampledToken>* out) override {
    if (calls++ == fail_at_call) return absl::InternalError("injected sampling failure");
    if (logits.rank() != 2 || logits.dim(0) != static_cast<int64_t>(rows.size())) {
      return absl::InvalidArgumentError("logits rows != sampling rows");
    }
    const int64_t vocab = logits.dim(1);
    std::vector<float> host(static_cast<size_t>(logits.numel()));
    absl::Status st = cpu_->CopyToHost(logits, host.data());
    if (!st.ok()) return st;
    out->clear();
    for (size_t i = 0; i < rows.size(); ++i) {
      const SamplingRow& r = rows[i];
      SeenRow s;
      s.prompt.assign(r.prompt.begin(), r.prompt.end());
      s.output.assign(r.output.begin(), r.output.end());
      s.blocked.assign(r.blocked.begin(), r.blocked.end());
      s.seed = r.seed;
      s.step = r.step;
      s.temperature = r.temperature;
      s.repetition = r.repetition_penalty;
      s.num_logprobs = r.num_logprobs;
      seen.push_back(std::move(s));
      SamplingParams p;
      p.temperature = r.temperature;
      p.top_k = r.top_k;
      p.top_p = r.top_p;
      p.min_p = r.min_p;
      p.repetition_penalty = r.repetition_penalty;
      p.presence_penalty = r.presence_penalty;
      p.frequency_penalty = r.frequency_penalty;
      p.seed = r.seed;
      p.logprobs = r.num_logprobs;
      Sampler sampler(p);
      const SampleResult res = sampler.Sample(host.data() + i * vocab, static_cast<int32_t>(vocab),
                                              r.prompt, r.output, r.blocked);
      SampledToken t;
      t.token_id = res.token_id;
      t.logprob = res.logprob;
      for (const TokenLogprob& lp : res.top) t.top.emplace_back(lp.token_id, lp.logprob);
      out->push_back(std::move(t));
    }
    return absl::OkStatus();
  }

  // --- everything else is the CPU backend's ---
  Device device() const override { return cpu_->device(); }
  std::string name() const override { return "host-sampling test backend over " + cpu_->name(); }
  DType activation_dtype() const override { return cpu_->activation_dtype(); }
  DeviceInfo device_info() const override { return cpu_->device_info(); }
  absl::StatusOr<Tensor> UploadWeight(const Tensor& host) override {
    return cpu_->UploadWeight(host);
  }
  absl::StatusOr<std::unique_ptr<LinearOp>> PrepareLinear(const LinearWeights& w) override {
    return cpu_->PrepareLinear(w);
  }
  Tensor Allocate(int64_t rows, int64_t cols) override { return cpu_->Allocate(rows, cols); }
  Tensor AllocateF32(int64_t rows, int64_t cols) override { return cpu_->AllocateF32(rows, cols); }
  absl::Status AllocateKvCache(const KvCacheSpec& spec) override {
    return cpu_->AllocateKvCache(spec);
  }
  const KvCacheSpec& kv_cache_spec() const override { return cpu_->kv_cache_spec(); }
  void SetKvScales(int layer, float k, float v) override { cpu_->SetKvScales(layer, k, v); }
  std::pair<float, float> GetKvScales(int layer) const override { return cpu_->GetKvScales(layer); }
  void CalculateKvScalesAtNextStep() override { cpu_->CalculateKvScalesAtNextStep(); }
  absl::Status CopyToHost(const Tensor& src, float* dst) override {
    return cpu_->CopyToHost(src, dst);
  }
  absl::Status BeginStep(const StepMetadata& meta) override { return cpu_->BeginStep(meta); }
  void Embedding(const Tensor& table, const int32_t* ids, Tensor& out) override {
    cpu_->Embedding(table, ids, out);
  }
  void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    cpu_->RmsNorm(x, w, eps, out);
  }
  void AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& w, float eps,
                  Tensor& out) override {
    cpu_->AddRmsNorm(residual, x, w, eps, out);
  }
  void Linear(const Tensor& x, const LinearOp& op, Tensor& y) override { cpu_->Linear(x, op, y); }
  void Rope(Tensor& q, Tensor& k, int64_t head_dim, const RopeConfig& rope) override {
    cpu_->Rope(q, k, head_dim, rope);
  }
  void Attention(int layer, const Tensor& q, const Tensor& k, const Tensor& v, int64_t heads,
                 int64_t kv_heads, int64_t head_dim, float scale, Tensor& out) override {
    cpu_->Attention(layer, q, k, v, heads, kv_heads, head_dim, scale, out);
  }
  void SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    cpu_->SiluMul(gate, up, out);
  }
  void SiluMulPacked(const Tensor& gate_up, Tensor& out) override {
    cpu_->SiluMulPacked(gate_up, out);
  }
  void SplitColumns(const Tensor& x, absl::Span<Tensor* const> outs) override {
    cpu_->SplitColumns(x, outs);
  }
  void Add(Tensor& x, const Tensor& y) override { cpu_->Add(x, y); }
  void GatherRows(const Tensor& src, const std::vector<int32_t>& rows, Tensor& out) override {
    cpu_->GatherRows(src, rows, out);
  }

 private:
  std::unique_ptr<Backend> cpu_;
};

struct Output {
  std::vector<int32_t> tokens;
  std::vector<SampleResult> logprobs;
  FinishReason reason = FinishReason::kNone;
  absl::Status error;
};

EngineOptions Options() {
  EngineOptions o;
  o.model_dir = ::qshard::testing::SourceDir() + "/models/kjv-llama-12m";
  o.device = "cpu";
  o.kv_cache_memory_bytes = int64_t{64} << 20;
  return o;
}

std::map<std::string, Output> Drain(Engine& e) {
  std::map<std::string, Output> out;
  for (int steps = 0; e.HasWork() && steps < 10000; ++steps) {
    auto step = e.Step();
    EXPECT_TRUE(step.ok()) << step.status();
    if (!step.ok()) break;
    for (const RequestOutput& o : *step) {
      Output& t = out[o.id];
      t.tokens.insert(t.tokens.end(), o.token_ids.begin(), o.token_ids.end());
      t.logprobs.insert(t.logprobs.end(), o.logprobs.begin(), o.logprobs.end());
      if (o.finished) {
        t.reason = o.finish_reason;
        t.error = o.error;
      }
    }
  }
  EXPECT_FALSE(e.HasWork());
  return out;
}

std::vector<Request> Requests(const Engine& e) {
  auto make = [&](const std::string& id, const std::string& text, SamplingParams p) {
    Request r;
    r.id = id;
    r.prompt = e.tokenizer().Encode(text, true);
    r.params = std::move(p);
    return r;
  };
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.max_tokens = 24;
  greedy.ignore_eos = true;
  std::vector<Request> reqs;
  reqs.push_back(make("plain", "In the beginning", greedy));
  SamplingParams rep = greedy;
  rep.repetition_penalty = 1.3f;
  rep.presence_penalty = 0.4f;
  rep.frequency_penalty = 0.2f;
  reqs.push_back(make("penalties", "And the LORD said unto Moses,", rep));
  SamplingParams min_tokens = greedy;
  min_tokens.ignore_eos = false;
  min_tokens.min_tokens = 10;
  min_tokens.stop_token_ids = {5};
  reqs.push_back(make("min_tokens", "Thou shalt not", min_tokens));
  SamplingParams lp = greedy;
  lp.logprobs = 4;
  lp.max_tokens = 12;
  reqs.push_back(make("logprobs", "Blessed are the", lp));
  return reqs;
}

TEST(EngineDeviceSamplingTest, SameOutputsAsTheHostPathAndTheRightRows) {
  auto host_engine = Engine::Create(Options());
  ASSERT_TRUE(host_engine.ok()) << host_engine.status();
  auto backend = std::make_unique<HostSamplingBackend>();
  HostSamplingBackend* sampling = backend.get();
  auto dev_engine = Engine::Create(Options(), std::move(backend));
  ASSERT_TRUE(dev_engine.ok()) << dev_engine.status();

  const std::vector<Request> reqs = Requests(**host_engine);
  for (const Request& r : reqs) ASSERT_TRUE((*host_engine)->AddRequest(r).ok());
  for (const Request& r : reqs) ASSERT_TRUE((*dev_engine)->AddRequest(r).ok());
  const auto host = Drain(**host_engine);
  const auto dev = Drain(**dev_engine);
  for (const Request& r : reqs) {
    SCOPED_TRACE(r.id);
    const Output& h = host.at(r.id);
    const Output& d = dev.at(r.id);
    EXPECT_FALSE(h.tokens.empty());
    EXPECT_EQ(d.tokens, h.tokens);
    EXPECT_EQ(d.reason, h.reason);
    ASSERT_EQ(d.logprobs.size(), h.logprobs.size());
    for (size_t i = 0; i < d.logprobs.size(); ++i) {
      EXPECT_EQ(d.logprobs[i].token_id, h.logprobs[i].token_id);
      EXPECT_FLOAT_EQ(d.logprobs[i].logprob, h.logprobs[i].logprob);
      ASSERT_EQ(d.logprobs[i].top.size(), 4u);
      for (size_t j = 0; j < 4; ++j) {
        EXPECT_EQ(d.logprobs[i].top[j].token_id, h.logprobs[i].top[j].token_id);
        EXPECT_FLOAT_EQ(d.logprobs[i].top[j].logprob, h.logprobs[i].top[j].logprob);
      }
    }
  }

  // Every generated token was drawn once, from a row that described its request: the
  // prompt, the output so far (its length = the step), the blocked ids while min_tokens
  // is not reached, and the request's parameters.
  size_t drawn = 0;
  for (const auto& [id, o] : dev) drawn += o.tokens.size();
  EXPECT_EQ(sampling->seen.size(), drawn);
  std::map<std::string, int> step_of;
  for (const SeenRow& row : sampling->seen) {
    const Request* req = nullptr;
    for (const Request& r : reqs) {
      if (r.prompt == row.prompt) req = &r;
    }
    ASSERT_NE(req, nullptr) << "a row whose prompt is no request's";
    SCOPED_TRACE(req->id);
    const std::vector<int32_t>& toks = dev.at(req->id).tokens;
    const int step = step_of[req->id]++;
    EXPECT_EQ(row.step, static_cast<uint64_t>(step));
    EXPECT_EQ(row.output, std::vector<int32_t>(toks.begin(), toks.begin() + step));
    EXPECT_EQ(row.temperature, req->params.temperature);
    EXPECT_EQ(row.repetition, req->params.repetition_penalty);
    EXPECT_EQ(row.num_logprobs, req->params.logprobs);
    if (req->id == "min_tokens" && step < 10) {
      EXPECT_NE(std::find(row.blocked.begin(), row.blocked.end(), 5), row.blocked.end());
      for (int32_t eos : (*dev_engine)->config().eos_token_ids) {
        EXPECT_NE(std::find(row.blocked.begin(), row.blocked.end(), eos), row.blocked.end());
      }
    } else {
      EXPECT_TRUE(row.blocked.empty()) << "step " << step;
    }
  }
}

TEST(EngineDeviceSamplingTest, SeedsAreTheRequestsOrDrawnOncePerRequest) {
  auto backend = std::make_unique<HostSamplingBackend>();
  HostSamplingBackend* sampling = backend.get();
  auto engine = Engine::Create(Options(), std::move(backend));
  ASSERT_TRUE(engine.ok()) << engine.status();
  Request seeded;
  seeded.id = "seeded";
  seeded.prompt = (*engine)->tokenizer().Encode("In the beginning", true);
  seeded.params.seed = 0xC0FFEE;
  seeded.params.max_tokens = 6;
  seeded.params.ignore_eos = true;
  Request unseeded = seeded;
  unseeded.id = "unseeded";
  unseeded.prompt = (*engine)->tokenizer().Encode("Thou shalt not", true);
  unseeded.params.seed.reset();
  ASSERT_TRUE((*engine)->AddRequest(seeded).ok());
  ASSERT_TRUE((*engine)->AddRequest(unseeded).ok());
  Drain(**engine);
  std::map<bool, std::vector<uint64_t>> seeds;  // by "is the seeded request"
  for (const SeenRow& row : sampling->seen) seeds[row.prompt == seeded.prompt].push_back(row.seed);
  ASSERT_EQ(seeds[true].size(), 6u);
  ASSERT_EQ(seeds[false].size(), 6u);
  for (uint64_t s : seeds[true]) EXPECT_EQ(s, 0xC0FFEEu);
  // An unseeded request keeps one drawn seed for all its steps (the step advances the
  // stream, not a new seed).
  for (uint64_t s : seeds[false]) EXPECT_EQ(s, seeds[false][0]);
}

TEST(EngineDeviceSamplingTest, ASamplingFailureEndsThatStepsRequestsAndServingGoesOn) {
  auto backend = std::make_unique<HostSamplingBackend>();
  backend->fail_at_call = 2;  // the third step's sampling
  auto engine = Engine::Create(Options(), std::move(backend));
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::vector<Request> reqs = Requests(**engine);
  for (const Request& r : reqs) ASSERT_TRUE((*engine)->AddRequest(r).ok());
  const auto failed = Drain(**engine);
  for (const Request& r : reqs) {
    SCOPED_TRACE(r.id);
    EXPECT_EQ(failed.at(r.id).reason, FinishReason::kError);
    EXPECT_NE(failed.at(r.id).error.message().find("injected sampling failure"),
              std::string::npos)
        << failed.at(r.id).error;
    EXPECT_EQ(failed.at(r.id).tokens.size(), 2u);  // two good steps before the failure
  }
  EXPECT_EQ((*engine)->stats().kv_blocks_used, 0);
  // The next request is served normally.
  ASSERT_TRUE((*engine)->AddRequest(reqs[0]).ok());
  const auto after = Drain(**engine);
  EXPECT_EQ(after.at(reqs[0].id).reason, FinishReason::kLength);
  EXPECT_EQ(after.at(reqs[0].id).tokens.size(), 24u);
}

}  // namespace
}  // namespace qshard
