#include "service/server/metrics.h"

#include <sstream>

#include "prometheus/text_serializer.h"

namespace qshard {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;

}  // namespace

// Bucket lists as vLLM's v1 metrics logger defines them (docs/reference/peer-servers.md).
const std::vector<double>& TimeToFirstTokenBuckets() {
  static const std::vector<double> kBuckets = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                               0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                               20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
  return kBuckets;
}

const std::vector<double>& InterTokenLatencyBuckets() {
  static const std::vector<double> kBuckets = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                                               0.3,  0.4,   0.5,  0.75,  1.0, 2.5,  5.0,
                                               7.5,  10.0,  20.0, 40.0,  80.0};
  return kBuckets;
}

const std::vector<double>& RequestLatencyBuckets() {
  static const std::vector<double> kBuckets = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                                               5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                                               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
  return kBuckets;
}

ServerMetrics::ServerMetrics(const ServerMetricsOptions& options)
    : options_(options), registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  running_ = &BuildGauge()
                  .Name("qshard_num_requests_running")
                  .Help("Requests in the running batch (holding KV cache blocks).")
                  .Register(r)
                  .Add({});
  waiting_ = &BuildGauge()
                  .Name("qshard_num_requests_waiting")
                  .Help("Requests accepted but not yet running (the queue --max-queue bounds).")
                  .Register(r)
                  .Add({});
  kv_usage_ = &BuildGauge()
                   .Name("qshard_kv_cache_usage_ratio")
                   .Help("Fraction of KV cache blocks in use, 0..1.")
                   .Register(r)
                   .Add({});
  auto& blocks =
      BuildGauge().Name("qshard_kv_cache_blocks").Help("KV cache blocks by state.").Register(r);
  kv_blocks_used_ = &blocks.Add({{"state", "used"}});
  kv_blocks_free_ = &blocks.Add({{"state", "free"}});
  kv_cache_info_ = &BuildGauge()
                        .Name("qshard_kv_cache_info")
                        .Help("KV cache configuration (value is always 1).")
                        .Register(r);
  quant_kernel_info_ = &BuildGauge()
                            .Name("qshard_quant_kernel_info")
                            .Help(
                                "Quantization method and the kernel selected for the linear "
                                "layers at load (value is always 1).")
                            .Register(r);

  prompt_tokens_ = &BuildCounter()
                        .Name("qshard_prompt_tokens_total")
                        .Help("Prompt tokens of finished requests.")
                        .Register(r)
                        .Add({});
  generation_tokens_ = &BuildCounter()
                            .Name("qshard_generation_tokens_total")
                            .Help("Generated tokens.")
                            .Register(r)
                            .Add({});
  preemptions_ = &BuildCounter()
                      .Name("qshard_num_preemptions_total")
                      .Help("Sequences preempted (KV blocks dropped, recomputed later).")
                      .Register(r)
                      .Add({});
  prefix_cache_queries_ = &BuildCounter()
                               .Name("qshard_prefix_cache_queries_total")
                               .Help("Prompt tokens looked up in the prefix cache.")
                               .Register(r)
                               .Add({});
  prefix_cache_hits_ = &BuildCounter()
                            .Name("qshard_prefix_cache_hits_total")
                            .Help("Prompt tokens found in the prefix cache.")
                            .Register(r)
                            .Add({});
  success_ = &BuildCounter()
                  .Name("qshard_request_success_total")
                  .Help("Generate calls that finished, by finish reason.")
                  .Register(r);
  failure_ = &BuildCounter()
                  .Name("qshard_request_failure_total")
                  .Help("Generate calls that ended with an error status, by gRPC code.")
                  .Register(r);
  // Every reason exists from the start, so rate() sees a 0 -> n step rather than a new
  // series appearing.
  for (const char* reason : {"stop", "length", "abort"}) success_->Add({{"finish_reason", reason}});
  // Likewise the codes a Generate call commonly fails with, so error-ratio alerts and
  // dashboards have a series (at 0) before the first failure.
  for (const char* code : {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                           "DEADLINE_EXCEEDED", "CANCELLED", "INTERNAL"}) {
    failure_->Add({{"code", code}});
  }

  ttft_ = &BuildHistogram()
               .Name("qshard_time_to_first_token_seconds")
               .Help("From arrival to the first generated token.")
               .Register(r)
               .Add({}, TimeToFirstTokenBuckets());
  itl_ = &BuildHistogram()
              .Name("qshard_inter_token_latency_seconds")
              .Help("Between consecutive generated tokens of a request.")
              .Register(r)
              .Add({}, InterTokenLatencyBuckets());
  e2e_ = &BuildHistogram()
              .Name("qshard_e2e_request_latency_seconds")
              .Help("From arrival to the last output of a request.")
              .Register(r)
              .Add({}, RequestLatencyBuckets());
  queue_time_ = &BuildHistogram()
                     .Name("qshard_request_queue_time_seconds")
                     .Help(
                         "From arrival to the start of the engine step that produced the "
                         "first token.")
                     .Register(r)
                     .Add({}, RequestLatencyBuckets());

  if (options_.vllm_compat) {
    const prometheus::Labels labels = {{"model_name", options_.model_name}};
    vllm_running_ = &BuildGauge()
                         .Name("vllm:num_requests_running")
                         .Help("Same as qshard_num_requests_running (vLLM name).")
                         .Register(r)
                         .Add(labels);
    vllm_waiting_ = &BuildGauge()
                         .Name("vllm:num_requests_waiting")
                         .Help("Same as qshard_num_requests_waiting (vLLM name).")
                         .Register(r)
                         .Add(labels);
    vllm_kv_usage_ = &BuildGauge()
                          .Name("vllm:kv_cache_usage_perc")
                          .Help("Same as qshard_kv_cache_usage_ratio, 0..1 (vLLM name).")
                          .Register(r)
                          .Add(labels);
    vllm_cache_config_ = &BuildGauge()
                              .Name("vllm:cache_config_info")
                              .Help("KV cache configuration (vLLM name; value is always 1).")
                              .Register(r);
  }
}

void ServerMetrics::SetModelInfo(const ModelMetricsInfo& info) {
  kv_cache_info_
      ->Add({{"dtype", info.kv_cache_dtype},
             {"block_size", std::to_string(info.block_size)},
             {"num_blocks", std::to_string(info.num_blocks)}})
      .Set(1);
  quant_kernel_info_
      ->Add({{"method", info.quant_method}, {"kernel", info.kernel}, {"device", info.device}})
      .Set(1);
  if (vllm_cache_config_ != nullptr) {
    vllm_cache_config_
        ->Add({{"block_size", std::to_string(info.block_size)},
               {"num_gpu_blocks", std::to_string(info.num_blocks)},
               {"cache_dtype", info.kv_cache_dtype}})
        .Set(1);
  }
  kv_blocks_free_->Set(static_cast<double>(info.num_blocks));
}

void ServerMetrics::SetEngineState(int32_t running, int32_t waiting, int32_t kv_blocks_used,
                                   int32_t kv_blocks_total) {
  const double usage =
      kv_blocks_total > 0 ? static_cast<double>(kv_blocks_used) / kv_blocks_total : 0.0;
  running_->Set(running);
  waiting_->Set(waiting);
  kv_usage_->Set(usage);
  kv_blocks_used_->Set(kv_blocks_used);
  kv_blocks_free_->Set(kv_blocks_total - kv_blocks_used);
  if (vllm_running_ != nullptr) {
    vllm_running_->Set(running);
    vllm_waiting_->Set(waiting);
    vllm_kv_usage_->Set(usage);
  }
}

void ServerMetrics::RequestSucceeded(const std::string& finish_reason) {
  success_->Add({{"finish_reason", finish_reason}}).Increment();
}

void ServerMetrics::RequestFailed(const std::string& code) {
  failure_->Add({{"code", code}}).Increment();
}

std::string ServerMetrics::Serialize() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, registry_->Collect());
  return out.str();
}

}  // namespace qshard
