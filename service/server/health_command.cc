// `qshard health`: a grpc.health.v1 probe (for Kubernetes exec probes, scripts, tests).
#include <chrono>
#include <cstdio>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "service/cli/commands.h"
#include "service/server/server_commands.h"

namespace qshard {

int HealthMain(int argc, char** argv) {
  FlagSet flags("qshard health",
                "Asks a server's grpc.health.v1.Health/Check for a service and exits 0 only "
                "when it is SERVING (1: any other status, 2: no answer). Service \"\" is "
                "liveness, \"qshard.v1.Qshard\" readiness.");
  std::string addr;
  std::string service;
  int64_t timeout_ms = 1000;
  flags.AddString("addr", &addr, "server address HOST:PORT", /*required=*/true);
  flags.AddString("service", &service, "service name to check (\"\": the whole server)");
  flags.AddInt("timeout-ms", &timeout_ms, "deadline of the check in milliseconds");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("health", st);
  if (timeout_ms <= 0) {
    return ReportFlagError("health", absl::InvalidArgumentError("--timeout-ms must be > 0"));
  }

  auto channel = grpc::CreateChannel(addr, grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  grpc::health::v1::HealthCheckResponse resp;
  const grpc::Status st = stub->Check(&ctx, req, &resp);
  if (!st.ok()) {
    std::fprintf(stderr, "qshard health: %s: %s\n", addr.c_str(), st.error_message().c_str());
    std::printf("UNREACHABLE\n");
    return 2;
  }
  std::printf("%s\n",
              grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()).c_str());
  return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

}  // namespace qshard
