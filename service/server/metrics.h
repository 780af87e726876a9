// File: metrics.h
// The server's Prometheus metrics (prometheus-cpp): native qshard_* names plus, unless
// turned off, the vLLM-named gauges the Gateway API Inference Extension reads by default.
// All methods are thread-safe (prometheus-cpp metrics are atomics).
//
//   ServerMetrics metrics({.vllm_compat = true, .model_name = "kjv-llama-12m"});
//   exposer.RegisterCollectable(metrics.registry());
//   metrics.ObserveTimeToFirstToken(0.012);
#ifndef QSHARD_SERVICE_SERVER_METRICS_H_
#define QSHARD_SERVICE_SERVER_METRICS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace qshard {

struct ServerMetricsOptions {
  // Also export vllm:num_requests_waiting / _running, vllm:kv_cache_usage_perc and
  // vllm:cache_config_info (--metrics-compat vllm).
  bool vllm_compat = true;
  // The model_name label of the vllm: gauges (vLLM labels them so).
  std::string model_name;
};

// What the info gauges describe; known once the model is loaded.
struct ModelMetricsInfo {
  std::string kv_cache_dtype;
  int64_t block_size = 0;
  int64_t num_blocks = 0;
  std::string quant_method;  // "none" for an unquantized checkpoint
  std::string kernel;        // the linear kernel selected at load
  std::string device;        // "cpu" | "cuda"
};

// vLLM's bucket boundaries (seconds), so dashboards and SLOs carry over.
const std::vector<double>& TimeToFirstTokenBuckets();
const std::vector<double>& InterTokenLatencyBuckets();
const std::vector<double>& RequestLatencyBuckets();  // e2e and queue time

class ServerMetrics {
 public:
  explicit ServerMetrics(const ServerMetricsOptions& options);
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  std::shared_ptr<prometheus::Registry> registry() const { return registry_; }

  // Sets the *_info gauges (call once, after the model loads).
  void SetModelInfo(const ModelMetricsInfo& info);
  // Scheduler / KV cache state after an engine step.
  void SetEngineState(int32_t running, int32_t waiting, int32_t kv_blocks_used,
                      int32_t kv_blocks_total);

  void AddPromptTokens(int64_t n) { prompt_tokens_->Increment(static_cast<double>(n)); }
  void AddGenerationTokens(int64_t n) { generation_tokens_->Increment(static_cast<double>(n)); }
  void AddPreemptions(int64_t n) { preemptions_->Increment(static_cast<double>(n)); }
  void AddPrefixCacheQueries(int64_t n) {
    prefix_cache_queries_->Increment(static_cast<double>(n));
  }
  void AddPrefixCacheHits(int64_t n) { prefix_cache_hits_->Increment(static_cast<double>(n)); }
  void ObserveTimeToFirstToken(double seconds) { ttft_->Observe(seconds); }
  void ObserveInterTokenLatency(double seconds) { itl_->Observe(seconds); }
  void ObserveE2eLatency(double seconds) { e2e_->Observe(seconds); }
  void ObserveQueueTime(double seconds) { queue_time_->Observe(seconds); }

  // Exactly one of these per Generate call: finish_reason "stop" | "length" | "abort";
  // code is a gRPC status code name ("INVALID_ARGUMENT", ...).
  void RequestSucceeded(const std::string& finish_reason);
  void RequestFailed(const std::string& code);

  // The Prometheus text exposition of everything (what GET /metrics returns).
  std::string Serialize() const;

 private:
  ServerMetricsOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;

  prometheus::Gauge* running_;
  prometheus::Gauge* waiting_;
  prometheus::Gauge* kv_usage_;
  prometheus::Gauge* kv_blocks_used_;
  prometheus::Gauge* kv_blocks_free_;
  prometheus::Family<prometheus::Gauge>* kv_cache_info_;
  prometheus::Family<prometheus::Gauge>* quant_kernel_info_;

  prometheus::Counter* prompt_tokens_;
  prometheus::Counter* generation_tokens_;
  prometheus::Counter* preemptions_;
  prometheus::Counter* prefix_cache_queries_;
  prometheus::Counter* prefix_cache_hits_;
  prometheus::Family<prometheus::Counter>* success_;
  prometheus::Family<prometheus::Counter>* failure_;

  prometheus::Histogram* ttft_;
  prometheus::Histogram* itl_;
  prometheus::Histogram* e2e_;
  prometheus::Histogram* queue_time_;

  // vLLM compatibility (null when off).
  prometheus::Gauge* vllm_running_ = nullptr;
  prometheus::Gauge* vllm_waiting_ = nullptr;
  prometheus::Gauge* vllm_kv_usage_ = nullptr;
  prometheus::Family<prometheus::Gauge>* vllm_cache_config_ = nullptr;
};

}  // namespace qshard

#endif  // QSHARD_SERVICE_SERVER_METRICS_H_
