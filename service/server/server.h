// File: server.h
// The qshard gRPC server: the Qshard service, grpc.health.v1 (gRPC's own health service),
// server reflection, the Prometheus /metrics endpoint, and the engine loop behind them.
// Start() listens first (readiness NOT_SERVING) so probes get an answer while LoadModel()
// runs; LoadModel() flips readiness to SERVING. Shutdown() drains.
//
//   QshardServer server(options);
//   QSHARD_RETURN_IF_ERROR(server.Start());      // server.port() is the bound port
//   QSHARD_RETURN_IF_ERROR(server.LoadModel());
//   ... wait for SIGTERM ...
//   server.Shutdown();
#ifndef QSHARD_SERVICE_SERVER_SERVER_H_
#define QSHARD_SERVICE_SERVER_SERVER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "grpcpp/server.h"
#include "prometheus/exposer.h"
#include "runtime/engine/engine.h"
#include "service/server/engine_loop.h"
#include "service/server/metrics.h"
#include "service/server/qshard_service.h"

namespace qshard {

struct ServerOptions {
  EngineOptions engine;
  std::string host = "0.0.0.0";
  int64_t port = 50051;              // 0 picks a free port (see QshardServer::port())
  int64_t metrics_port = 9400;       // 0 picks a free port; < 0 serves no /metrics
  int64_t max_queue = 256;           // waiting requests before RESOURCE_EXHAUSTED
  double shutdown_timeout_s = 30;    // how long Shutdown() lets in-flight requests finish
  int64_t max_connection_age_s = 0;  // > 0: GOAWAY after this long, so clients rebalance
  bool vllm_compat_metrics = true;
};

class QshardServer {
 public:
  explicit QshardServer(const ServerOptions& options);
  ~QshardServer();  // Shutdown(0) when still running
  QshardServer(const QshardServer&) = delete;
  QshardServer& operator=(const QshardServer&) = delete;

  // Binds the gRPC port (and the metrics port); health: "" SERVING, readiness NOT_SERVING.
  absl::Status Start();
  // Loads the model, starts the engine thread and sets readiness SERVING.
  absl::Status LoadModel();
  // Graceful stop: readiness and liveness NOT_SERVING, new Generate calls UNAVAILABLE,
  // in-flight requests get up to timeout_s to finish, the rest end with FINISH_REASON_ABORT.
  // Idempotent; a negative timeout means options.shutdown_timeout_s.
  void Shutdown(double timeout_s = -1);

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  // "host:port" a local client can dial (0.0.0.0 / :: become loopback).
  std::string address() const;
  ServerMetrics& metrics() { return *metrics_; }
  // Null until LoadModel succeeds.
  EngineLoop* engine_loop() { return loop_.get(); }
  QshardServiceImpl& service() { return *service_; }

 private:
  // Destroys the metrics endpoint without waiting out the HTTP server's poll timeout.
  void StopExposer();

  ServerOptions options_;
  std::unique_ptr<ServerMetrics> metrics_;
  std::unique_ptr<QshardServiceImpl> service_;
  std::unique_ptr<EngineLoop> loop_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  int port_ = 0;
  int metrics_port_ = -1;
  std::mutex shutdown_mu_;
  bool shut_down_ = false;  // guarded by shutdown_mu_
};

// ModelInfo for GetModelInfo and the *_info metrics, from a loaded engine.
v1::ModelInfo DescribeModel(Engine& engine, const std::string& model_dir);

}  // namespace qshard

#endif  // QSHARD_SERVICE_SERVER_SERVER_H_
