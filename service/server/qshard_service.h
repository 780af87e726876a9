// File: qshard_service.h
// The qshard.v1.Qshard gRPC service on the callback (reactor) API. Generate streams each
// request's tokens from the engine thread straight to its reactor; no thread is held per
// stream.
#ifndef QSHARD_SERVICE_SERVER_QSHARD_SERVICE_H_
#define QSHARD_SERVICE_SERVER_QSHARD_SERVICE_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "qshard/v1/qshard.grpc.pb.h"
#include "service/server/engine_loop.h"
#include "service/server/metrics.h"

namespace qshard {

// The readiness service name of grpc.health.v1 (the full proto service name).
inline constexpr char kQshardServiceName[] = "qshard.v1.Qshard";

// The release, as the build's project(VERSION) says.
std::string QshardVersion();

class QshardServiceImpl final : public v1::Qshard::CallbackService {
 public:
  explicit QshardServiceImpl(ServerMetrics* metrics);

  // Makes the service usable once the model is loaded; until then calls get UNAVAILABLE.
  // The loop must outlive the gRPC server.
  void SetEngine(EngineLoop* loop, const v1::ModelInfo& model_info);
  // From now on Generate and Tokenize answer UNAVAILABLE (shutdown started).
  void SetDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }
  // Generate calls whose reactor has not finished yet.
  int64_t active_streams() const { return active_streams_.load(); }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* context,
                                  const v1::AbortRequest* request,
                                  v1::AbortResponse* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;

 private:
  friend class GenerateReactor;

  EngineLoop* loop() const { return loop_.load(std::memory_order_acquire); }
  // "req-<boot nonce>-<counter>": unique within this process and unlikely to collide with
  // ids of other replicas in logs.
  std::string NewRequestId();

  ServerMetrics* metrics_;
  std::atomic<EngineLoop*> loop_{nullptr};
  v1::ModelInfo model_info_;  // written once by SetEngine before loop_ is published
  std::atomic<bool> draining_{false};
  std::atomic<int64_t> active_streams_{0};
  std::atomic<uint64_t> next_id_{0};
  std::string id_prefix_;
  std::chrono::steady_clock::time_point start_time_;
};

}  // namespace qshard

#endif  // QSHARD_SERVICE_SERVER_QSHARD_SERVICE_H_
