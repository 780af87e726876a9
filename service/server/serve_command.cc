// `qshard serve`: the long-running gRPC server process.
#include <csignal>
#include <cstdio>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/base/log.h"
#include "service/cli/commands.h"
#include "service/server/server.h"
#include "service/server/server_commands.h"

namespace qshard {

int ServeMain(int argc, char** argv) {
  // Block the shutdown signals before any thread exists, so every thread (gRPC's, the
  // engine's) inherits the mask and the main thread alone receives them via sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  FlagSet flags("qshard serve",
                "Serves the model over gRPC (qshard.v1.Qshard, grpc.health.v1, reflection) with "
                "Prometheus metrics on --metrics-port. SIGTERM / SIGINT drain and exit 0.");
  EngineFlags ef;
  ef.Register(flags, /*with_batching=*/true);
  ServerOptions so;
  std::string log_format = "text";
  std::string metrics_compat = "vllm";
  flags.AddString("host", &so.host, "address to listen on (gRPC and metrics)");
  flags.AddInt("port", &so.port, "gRPC port (0: pick a free one)");
  flags.AddInt("metrics-port", &so.metrics_port,
               "Prometheus /metrics HTTP port (0: pick a free one, -1: off)");
  flags.AddInt("max-queue", &so.max_queue,
               "waiting requests beyond which Generate answers RESOURCE_EXHAUSTED");
  flags.AddDouble("shutdown-timeout", &so.shutdown_timeout_s,
                  "seconds in-flight requests may run after SIGTERM before they are aborted");
  flags.AddString("log-format", &log_format, "text or json (one JSON object per line)");
  flags.AddInt("grpc-max-connection-age", &so.max_connection_age_s,
               "seconds after which a connection is asked to reconnect (GOAWAY), so long-lived "
               "channels rebalance across replicas; 0 = off");
  flags.AddString("metrics-compat", &metrics_compat,
                  "vllm: also export vllm:* gauges (Gateway API Inference Extension); none: off");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("serve", st);
  if (log_format == "json") {
    SetLogFormat(LogFormat::kJson);
  } else if (log_format != "text") {
    return ReportFlagError(
        "serve", absl::InvalidArgumentError(absl::StrCat("--log-format: unknown value '",
                                                         log_format, "'; expected text or json")));
  }
  if (metrics_compat != "vllm" && metrics_compat != "none") {
    return ReportFlagError("serve", absl::InvalidArgumentError(
                                        absl::StrCat("--metrics-compat: unknown value '",
                                                     metrics_compat, "'; expected vllm or none")));
  }
  so.vllm_compat_metrics = metrics_compat == "vllm";
  if (!(so.shutdown_timeout_s >= 0)) {
    return ReportFlagError("serve", absl::InvalidArgumentError("--shutdown-timeout must be >= 0"));
  }
  if (so.max_connection_age_s < 0) {
    return ReportFlagError("serve",
                           absl::InvalidArgumentError("--grpc-max-connection-age must be >= 0"));
  }
  auto engine_options = ef.ToOptions();
  if (!engine_options.ok()) return ReportFlagError("serve", engine_options.status());
  so.engine = *engine_options;

  QshardServer server(so);
  if (absl::Status st = server.Start(); !st.ok()) {
    std::fprintf(stderr, "qshard serve: %s\n", std::string(st.message()).c_str());
    return 1;
  }
  // One fixed-format line for scripts and tests that start the server with port 0.
  std::fprintf(stderr, "qshard serve: listening on %s:%d metrics %s:%d\n", so.host.c_str(),
               server.port(), so.host.c_str(), server.metrics_port());
  std::fflush(stderr);
  if (absl::Status st = server.LoadModel(); !st.ok()) {
    std::fprintf(stderr, "qshard serve: %s\n", std::string(st.message()).c_str());
    server.Shutdown(0);
    return 1;
  }

  int sig = 0;
  sigwait(&signals, &sig);
  QSHARD_LOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT") << ", shutting down";
  server.Shutdown();
  return 0;
}

}  // namespace qshard
