// The Prometheus endpoint: every documented series is exported, gauges follow the engine,
// counters and histograms agree with what clients saw after a load run, and the vLLM
// compatibility gauges mirror the native ones (or are absent with --metrics-compat none).
#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/service/server/server_test_util.h"

namespace qshard::testing {
namespace {

using std::chrono::milliseconds;

class ServiceMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartTestServer(TestServerOptions());
    ASSERT_NE(server_, nullptr);
    stub_ = MakeStub(server_->address());
  }
  std::string Scrape() { return HttpGet(server_->metrics_port(), "/metrics"); }

  std::unique_ptr<QshardServer> server_;
  std::unique_ptr<v1::Qshard::Stub> stub_;
};

TEST_F(ServiceMetricsTest, ExportsEveryDocumentedSeries) {
  const std::string text = Scrape();
  ASSERT_FALSE(text.empty());
  for (const char* name :
       {"qshard_num_requests_running", "qshard_num_requests_waiting", "qshard_kv_cache_usage_ratio",
        "qshard_kv_cache_blocks{state=\"used\"}", "qshard_kv_cache_blocks{state=\"free\"}",
        "qshard_prompt_tokens_total", "qshard_generation_tokens_total",
        "qshard_num_preemptions_total", "qshard_prefix_cache_queries_total",
        "qshard_prefix_cache_hits_total", "qshard_request_success_total{finish_reason=\"stop\"}",
        "qshard_request_success_total{finish_reason=\"length\"}",
        "qshard_request_success_total{finish_reason=\"abort\"}",
        "qshard_time_to_first_token_seconds_count", "qshard_inter_token_latency_seconds_count",
        "qshard_e2e_request_latency_seconds_count", "qshard_request_queue_time_seconds_count"}) {
    EXPECT_TRUE(MetricValue(text, name).has_value()) << name;
  }
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  const std::string blocks = std::to_string(info.num_blocks());
  EXPECT_EQ(MetricValue(text,
                        "qshard_kv_cache_info{block_size=\"16\",dtype=\"float32\","
                        "num_blocks=\"" +
                            blocks + "\"}"),
            1.0);
  EXPECT_EQ(MetricValue(text, "qshard_quant_kernel_info{device=\"cpu\",kernel=\"" + info.kernel() +
                                  "\",method=\"none\"}"),
            1.0);
  EXPECT_EQ(MetricValue(text, "qshard_kv_cache_blocks{state=\"free\"}"),
            static_cast<double>(info.num_blocks()));
  // vLLM's buckets, e.g. TTFT's first and last.
  EXPECT_TRUE(MetricValue(text, "qshard_time_to_first_token_seconds_bucket{le=\"0.001\"}"));
  EXPECT_TRUE(MetricValue(text, "qshard_time_to_first_token_seconds_bucket{le=\"2560\"}"));
  EXPECT_TRUE(MetricValue(text, "qshard_e2e_request_latency_seconds_bucket{le=\"7680\"}"));
  // Gateway API Inference Extension defaults.
  const std::string model = "{model_name=\"" + ModelDir() + "\"}";
  EXPECT_EQ(MetricValue(text, "vllm:num_requests_waiting" + model), 0.0);
  EXPECT_EQ(MetricValue(text, "vllm:num_requests_running" + model), 0.0);
  EXPECT_EQ(MetricValue(text, "vllm:kv_cache_usage_perc" + model), 0.0);
  EXPECT_EQ(MetricValue(text,
                        "vllm:cache_config_info{block_size=\"16\",cache_dtype=\"float32\","
                        "num_gpu_blocks=\"" +
                            blocks + "\"}"),
            1.0);
}

TEST_F(ServiceMetricsTest, GaugesFollowARunningRequest) {
  v1::GenerateRequest req = TextRequest("And God said", 900);
  req.mutable_sampling()->set_ignore_eos(true);
  grpc::ClientContext ctx;
  std::string during;
  StreamResult r =
      Generate(*stub_, req, &ctx, [&](const v1::GenerateResponse& resp, grpc::ClientContext* c) {
        if (resp.has_chunk() && during.empty()) {
          during = Scrape();
          c->TryCancel();
        }
      });
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(MetricValue(during, "qshard_num_requests_running"), 1.0);
  const auto usage = MetricValue(during, "qshard_kv_cache_usage_ratio");
  ASSERT_TRUE(usage.has_value());
  EXPECT_GT(*usage, 0.0);
  EXPECT_LE(*usage, 1.0);
  EXPECT_EQ(MetricSum(during, "vllm:kv_cache_usage_perc"), *usage);
  EXPECT_EQ(MetricSum(during, "vllm:num_requests_running"), 1.0);
  EXPECT_GT(MetricValue(during, "qshard_kv_cache_blocks{state=\"used\"}").value_or(0), 0.0);

  // The cancelled request counts as finish_reason abort and gives its blocks back.
  EXPECT_TRUE(WaitUntil(milliseconds(1000), [&] {
    const std::string after = Scrape();
    return MetricValue(after, "qshard_kv_cache_blocks{state=\"used\"}") == 0.0 &&
           MetricValue(after, "qshard_request_success_total{finish_reason=\"abort\"}") == 1.0 &&
           MetricValue(after, "qshard_num_requests_running") == 0.0;
  })) << Scrape();
}

TEST_F(ServiceMetricsTest, CountersAgreeWithClientsAfterALoadRun) {
  // 24 requests from 8 threads: 20 valid of varying lengths, 4 invalid.
  std::vector<v1::GenerateRequest> reqs;
  const std::vector<std::string> texts = {"In the beginning", "And God said", "Blessed are the",
                                          "And the LORD said unto Moses,"};
  for (int i = 0; i < 24; ++i) {
    v1::GenerateRequest req = TextRequest(texts[i % texts.size()], 4 + (i * 5) % 30,
                                          /*temperature=*/i % 2 ? 0.8f : 0.0f);
    req.mutable_sampling()->set_seed(i);
    if (i % 6 == 5) req.mutable_sampling()->set_top_p(2.0f);  // invalid
    reqs.push_back(req);
  }
  std::vector<StreamResult> results(reqs.size());
  std::atomic<size_t> next{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (size_t i = next++; i < reqs.size(); i = next++) results[i] = Generate(*stub_, reqs[i]);
    });
  }
  for (auto& t : threads) t.join();

  int ok = 0, invalid = 0;
  int64_t completion = 0, prompt = 0, itl = 0;
  for (const auto& r : results) {
    if (r.status.ok()) {
      ++ok;
      ASSERT_TRUE(r.complete.has_value());
      completion += r.complete->usage().completion_tokens();
      prompt += r.complete->usage().prompt_tokens();
      itl += r.complete->usage().completion_tokens() - 1;
      EXPECT_EQ(r.complete->usage().completion_tokens(), static_cast<int>(r.token_ids.size()));
    } else {
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      ++invalid;
    }
  }
  EXPECT_EQ(ok, 20);
  EXPECT_EQ(invalid, 4);

  const std::string text = Scrape();
  const double success = MetricSum(text, "qshard_request_success_total");
  const double failure = MetricSum(text, "qshard_request_failure_total");
  EXPECT_EQ(success + failure, static_cast<double>(reqs.size()));
  EXPECT_EQ(success, ok);
  EXPECT_EQ(MetricValue(text, "qshard_request_failure_total{code=\"INVALID_ARGUMENT\"}"),
            static_cast<double>(invalid));
  EXPECT_EQ(MetricValue(text, "qshard_generation_tokens_total"), static_cast<double>(completion));
  EXPECT_EQ(MetricValue(text, "qshard_prompt_tokens_total"), static_cast<double>(prompt));
  EXPECT_EQ(MetricValue(text, "qshard_e2e_request_latency_seconds_count"), ok);
  EXPECT_EQ(MetricValue(text, "qshard_time_to_first_token_seconds_count"), ok);
  EXPECT_EQ(MetricValue(text, "qshard_request_queue_time_seconds_count"), ok);
  EXPECT_EQ(MetricValue(text, "qshard_inter_token_latency_seconds_count"),
            static_cast<double>(itl));
  // At rest again.
  EXPECT_EQ(MetricValue(text, "qshard_num_requests_running"), 0.0);
  EXPECT_EQ(MetricValue(text, "qshard_num_requests_waiting"), 0.0);
  EXPECT_EQ(MetricValue(text, "qshard_kv_cache_usage_ratio"), 0.0);
}

TEST_F(ServiceMetricsTest, PrefixCacheCountersFollowTheEngine) {
  // 40 prompt tokens = two full 16-token blocks the second request can reuse.
  std::vector<int32_t> ids = {1};
  for (int i = 1; i < 40; ++i) ids.push_back(300 + i);
  int64_t cached = 0;
  for (int i = 0; i < 2; ++i) {
    StreamResult r = Generate(*stub_, IdsRequest(ids, 2));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    ASSERT_TRUE(r.complete.has_value());
    cached += r.complete->usage().cached_prompt_tokens();
  }
  EXPECT_GE(cached, 32);
  const std::string text = Scrape();
  EXPECT_EQ(MetricValue(text, "qshard_prefix_cache_hits_total"), static_cast<double>(cached));
  EXPECT_GE(MetricValue(text, "qshard_prefix_cache_queries_total").value_or(0),
            static_cast<double>(cached));
}

TEST(ServiceMetricsCompatTest, NoneTurnsTheVllmNamesOff) {
  ServerOptions o = TestServerOptions();
  o.vllm_compat_metrics = false;
  auto server = StartTestServer(o);
  ASSERT_NE(server, nullptr);
  const std::string text = HttpGet(server->metrics_port(), "/metrics");
  ASSERT_NE(text.find("qshard_kv_cache_usage_ratio"), std::string::npos);
  EXPECT_EQ(text.find("vllm:"), std::string::npos);
}

TEST(ServiceQuantKernelInfoTest, OnlineFp8ShowsTheSelectedKernelAndMethod) {
  // --quantization fp8 on the bf16 model: quantized at load, and the info series, the model
  // info and the selection function agree on what runs.
  ServerOptions o = TestServerOptions();
  o.engine.quantization = "fp8";
  auto server = StartTestServer(o);
  ASSERT_NE(server, nullptr);
  const std::string text = HttpGet(server->metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(text, "qshard_quant_kernel_info{device=\"cpu\",kernel=\"cpu-simd-fp8\","
                              "method=\"fp8\"}"),
            1.0)
      << text;
  auto stub = MakeStub(server->address());
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.quantization_method(), "fp8");
  EXPECT_EQ(info.kernel(), "cpu-simd-fp8");
}

}  // namespace
}  // namespace qshard::testing
