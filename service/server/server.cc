#include "service/server/server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <exception>
#include <filesystem>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "runtime/base/log.h"

namespace qshard {
namespace {

using Clock = std::chrono::steady_clock;

// Polls cond every few milliseconds until it holds or timeout_s passes.
template <typename Cond>
bool WaitFor(double timeout_s, Cond cond) {
  const auto end = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(timeout_s));
  while (!cond()) {
    if (Clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

std::string HostForClients(const std::string& host) {
  if (host == "0.0.0.0" || host.empty()) return "127.0.0.1";
  if (host == "::" || host == "[::]") return "[::1]";
  return host;
}

}  // namespace

v1::ModelInfo DescribeModel(Engine& engine, const std::string& model_dir) {
  const ModelConfig& c = engine.config();
  const KvCacheSpec& kv = engine.kv_cache_spec();
  v1::ModelInfo info;
  info.set_model_path(model_dir);
  info.set_model_name(std::filesystem::path(model_dir).lexically_normal().filename().string());
  if (info.model_name().empty()) {  // "models/foo/" normalizes to a trailing empty name
    info.set_model_name(
        std::filesystem::path(model_dir).lexically_normal().parent_path().filename().string());
  }
  info.set_architecture(c.architecture);
  info.set_vocab_size(static_cast<int32_t>(c.vocab_size));
  info.set_max_context_length(engine.max_model_len());
  info.set_dtype(std::string(DTypeName(c.dtype)));
  // The selection function's answer: the effective method (an online --quantization fp8
  // shows "fp8") and the stable kernel id, as in qshard_quant_kernel_info.
  info.set_quantization_method(engine.kernel_choice().method);
  info.set_kernel(engine.kernel_choice().kernel);
  info.set_kv_cache_dtype(std::string(DTypeName(kv.dtype)));
  info.set_block_size(static_cast<int32_t>(kv.block_size));
  info.set_num_blocks(kv.num_blocks);
  info.set_device(engine.model().backend().device() == Device::kCpu ? "cpu" : "cuda");
  info.set_bos_token_id(c.bos_token_id);
  for (int32_t id : c.eos_token_ids) info.add_eos_token_ids(id);
  info.set_num_parameters(engine.model().weight_summary().num_parameters);
  return info;
}

QshardServer::QshardServer(const ServerOptions& options) : options_(options) {}

void QshardServer::StopExposer() {
  if (exposer_ == nullptr) return;
  // civetweb's listener thread only notices the stop request when its poll() returns,
  // which without traffic takes its full 2 s timeout. Connecting wakes it at once.
  std::atomic<bool> stopped{false};
  std::thread poke([&] {
    const std::string host = HostForClients(options_.host);
    while (!stopped.load()) {
      const int fd =
          socket(host.find(':') != std::string::npos ? AF_INET6 : AF_INET, SOCK_STREAM, 0);
      if (fd >= 0) {
        if (host.find(':') != std::string::npos) {
          sockaddr_in6 addr{};
          addr.sin6_family = AF_INET6;
          addr.sin6_port = htons(static_cast<uint16_t>(metrics_port_));
          addr.sin6_addr = in6addr_loopback;
          connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
        } else {
          sockaddr_in addr{};
          addr.sin_family = AF_INET;
          addr.sin_port = htons(static_cast<uint16_t>(metrics_port_));
          inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
          connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
        }
        close(fd);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  exposer_.reset();
  stopped.store(true);
  poke.join();
}

QshardServer::~QshardServer() { Shutdown(0); }

std::string QshardServer::address() const {
  return absl::StrCat(HostForClients(options_.host), ":", port_);
}

absl::Status QshardServer::Start() {
  if (options_.port < 0 || options_.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--port must be in [0, 65535], got ", options_.port));
  }
  if (options_.metrics_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--metrics-port must be at most 65535, got ", options_.metrics_port));
  }
  if (options_.max_queue < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-queue must be >= 0, got ", options_.max_queue));
  }
  ServerMetricsOptions mo;
  mo.vllm_compat = options_.vllm_compat_metrics;
  mo.model_name = std::filesystem::path(options_.engine.model_dir).lexically_normal().string();
  metrics_ = std::make_unique<ServerMetrics>(mo);
  service_ = std::make_unique<QshardServiceImpl>(metrics_.get());

  if (options_.metrics_port >= 0) {
    const std::string bind = absl::StrCat(options_.host, ":", options_.metrics_port);
    try {
      exposer_ = std::make_unique<prometheus::Exposer>(bind);
    } catch (const std::exception& e) {
      return absl::UnavailableError(
          absl::StrCat("--metrics-port: cannot listen on ", bind, ": ", e.what()));
    }
    exposer_->RegisterCollectable(metrics_->registry());
    const std::vector<int> ports = exposer_->GetListeningPorts();
    metrics_port_ = ports.empty() ? static_cast<int>(options_.metrics_port) : ports[0];
  }

  // Both are process-wide switches that must be set before the builder is created.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  const std::string addr = absl::StrCat(options_.host, ":", options_.port);
  builder.AddListeningPort(addr, grpc::InsecureServerCredentials(), &port_);
  builder.RegisterService(service_.get());
  if (options_.max_connection_age_s > 0) {
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS,
                               static_cast<int>(options_.max_connection_age_s * 1000));
  }
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    exposer_.reset();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", addr, " (address in use or not local?)"));
  }
  // Liveness ("") is SERVING as soon as we answer; readiness waits for the model.
  server_->GetHealthCheckService()->SetServingStatus("", true);
  server_->GetHealthCheckService()->SetServingStatus(kQshardServiceName, false);
  QSHARD_LOG(INFO) << "qshard " << QshardVersion() << " gRPC on " << options_.host << ":" << port_
                   << (metrics_port_ >= 0 ? absl::StrCat(", metrics on http://", options_.host, ":",
                                                         metrics_port_, "/metrics")
                                          : std::string(", no metrics endpoint"));
  return absl::OkStatus();
}

absl::Status QshardServer::LoadModel() {
  if (server_ == nullptr) return absl::FailedPreconditionError("Start() the server first");
  const auto t0 = Clock::now();
  absl::StatusOr<std::unique_ptr<Engine>> engine = Engine::Create(options_.engine);
  if (!engine.ok()) return engine.status();
  const v1::ModelInfo info = DescribeModel(**engine, options_.engine.model_dir);
  ModelMetricsInfo mi;
  mi.kv_cache_dtype = info.kv_cache_dtype();
  mi.block_size = info.block_size();
  mi.num_blocks = info.num_blocks();
  mi.quant_method = info.quantization_method();
  mi.kernel = info.kernel();
  mi.device = info.device();
  metrics_->SetModelInfo(mi);

  EngineLoopOptions lo;
  lo.max_queue = options_.max_queue;
  loop_ = std::make_unique<EngineLoop>(*std::move(engine), metrics_.get(), lo);
  loop_->Start();
  service_->SetEngine(loop_.get(), info);
  {
    std::lock_guard<std::mutex> lock(shutdown_mu_);
    // A shutdown that began during the load keeps readiness down.
    if (!shut_down_ && !service_->draining()) {
      server_->GetHealthCheckService()->SetServingStatus(kQshardServiceName, true);
    }
  }
  QSHARD_LOG(INFO) << "ready: " << info.model_name() << " (" << info.architecture() << ", "
                   << info.kernel() << ", KV " << info.num_blocks() << " x " << info.block_size()
                   << " " << info.kv_cache_dtype() << ") loaded in "
                   << std::chrono::duration<double>(Clock::now() - t0).count() << " s";
  return absl::OkStatus();
}

void QshardServer::Shutdown(double timeout_s) {
  std::lock_guard<std::mutex> lock(shutdown_mu_);
  if (shut_down_ || server_ == nullptr) return;
  shut_down_ = true;
  if (timeout_s < 0) timeout_s = options_.shutdown_timeout_s;

  // 1) Stop advertising: probes see NOT_SERVING (Shutdown also pins every status there),
  //    and the service refuses new work with UNAVAILABLE.
  service_->SetDraining();
  server_->GetHealthCheckService()->Shutdown();
  if (loop_ != nullptr) {
    const int64_t in_flight = loop_->stats().in_flight;
    QSHARD_LOG(INFO) << "draining: " << in_flight << " requests in flight, waiting up to "
                     << timeout_s << " s";
    // 2) Let in-flight requests finish, then abort what is left: those streams end with
    //    FINISH_REASON_ABORT rather than a broken connection.
    if (!WaitFor(timeout_s, [&] { return loop_->stats().in_flight == 0; })) {
      QSHARD_LOG(WARNING) << "shutdown timeout: aborting " << loop_->stats().in_flight
                          << " requests";
      loop_->AbortAll();
    }
  }
  // 3) Give the final messages time to reach their clients (aborts complete within one
  //    engine step), then close the server. Only idle connections and short unary calls
  //    are left by then; gRPC would otherwise wait for clients to hang up, so they get a
  //    short grace and are then cut.
  WaitFor(5.0, [&] { return service_->active_streams() == 0; });
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(250));
  server_->Wait();
  if (loop_ != nullptr) loop_->Stop();
  StopExposer();
  QSHARD_LOG(INFO) << "server stopped";
}

}  // namespace qshard
