// grpc.health.v1 (liveness "" / readiness "qshard.v1.Qshard" through loading, serving and
// draining), server reflection, the `qshard health` command, in-process graceful drain,
// and the protobuf/SentencePiece symbol isolation the server binary depends on.
#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>

#include "google/protobuf/message_lite.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"
#include "gtest/gtest.h"
#include "tests/cli_runner.h"
#include "tests/service/server/server_test_util.h"

namespace qshard::testing {
namespace {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
using std::chrono::milliseconds;

// The status a health Check answers, or -1 when the RPC itself fails.
int HealthStatus(const std::string& address, const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  HealthCheckRequest req;
  req.set_service(service);
  HealthCheckResponse resp;
  if (!stub->Check(&ctx, req, &resp).ok()) return -1;
  return resp.status();
}

TEST(ServiceHealthTest, ReadinessFollowsModelLoading) {
  QshardServer server(TestServerOptions());
  ASSERT_TRUE(server.Start().ok());
  // Listening, alive, not ready: probes get an answer while the model loads.
  EXPECT_EQ(HealthStatus(server.address(), ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(HealthStatus(server.address(), "qshard.v1.Qshard"), HealthCheckResponse::NOT_SERVING);
  ASSERT_TRUE(server.LoadModel().ok());
  EXPECT_EQ(HealthStatus(server.address(), ""), HealthCheckResponse::SERVING);
  EXPECT_EQ(HealthStatus(server.address(), "qshard.v1.Qshard"), HealthCheckResponse::SERVING);
}

TEST(ServiceHealthTest, HealthCommandExitsZeroOnlyWhenServing) {
  QshardServer server(TestServerOptions());
  ASSERT_TRUE(server.Start().ok());
  const std::string addr = server.address();
  EXPECT_EQ(RunQshard({"health", "--addr", addr}).exit_code, 0);
  CliResult not_ready = RunQshard({"health", "--addr", addr, "--service", "qshard.v1.Qshard"});
  EXPECT_EQ(not_ready.exit_code, 1);
  EXPECT_NE(not_ready.out.find("NOT_SERVING"), std::string::npos);
  ASSERT_TRUE(server.LoadModel().ok());
  CliResult ready = RunQshard({"health", "--addr", addr, "--service", "qshard.v1.Qshard"});
  EXPECT_EQ(ready.exit_code, 0) << ready.err;
  EXPECT_NE(ready.out.find("SERVING"), std::string::npos);
  EXPECT_NE(RunQshard({"health", "--addr", addr, "--service", "no.such.Service"}).exit_code, 0);
  server.Shutdown(0);
  CliResult gone = RunQshard({"health", "--addr", addr, "--timeout-ms", "300"});
  EXPECT_EQ(gone.exit_code, 2);
}

TEST(ServiceHealthTest, DrainRefusesNewWorkAndAbortsWhatOutlivesTheTimeout) {
  ServerOptions options = TestServerOptions();
  options.engine.max_model_len = kDrainMaxModelLen;  // room for the long request
  auto server = StartTestServer(options);
  ASSERT_NE(server, nullptr);
  auto stub = MakeStub(server->address());

  // One request that would run for seconds, one that finishes well within the timeout.
  DrainStreams streams;
  streams.Start(*stub);
  ASSERT_TRUE(
      WaitUntil(milliseconds(5000), [&] { return server->engine_loop()->stats().in_flight == 2; }));

  std::thread drain([&] { server->Shutdown(/*timeout_s=*/1.0); });
  ASSERT_TRUE(WaitUntil(milliseconds(2000), [&] { return server->service().draining(); }));
  EXPECT_EQ(HealthStatus(server->address(), "qshard.v1.Qshard"), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(HealthStatus(server->address(), ""), HealthCheckResponse::NOT_SERVING);
  StreamResult refused = Generate(*stub, TextRequest("And God said", 3));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  {
    grpc::ClientContext ctx;
    v1::ServerInfo info;
    ASSERT_TRUE(stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok());
    EXPECT_TRUE(info.draining());
  }

  drain.join();
  streams.JoinAndExpectShortStoppedLongAborted();
}

// Waits for the completion queue to return `tag`; false when the operation failed.
bool Await(grpc::CompletionQueue& cq, void* tag) {
  void* got = nullptr;
  bool ok = false;
  if (!cq.Next(&got, &ok)) return false;
  EXPECT_EQ(got, tag);
  return ok;
}

TEST(ServiceHealthTest, ReflectionListsTheServices) {
  auto server = StartTestServer(TestServerOptions());
  ASSERT_NE(server, nullptr);
  // ServerReflectionInfo is a bidi stream of grpc.reflection.v1alpha messages; Debian ships
  // no reflection.proto, so the one request is written by hand: field 7 (list_services),
  // an empty string.
  grpc::GenericStub stub(
      grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()));
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  int tags[5];
  call->StartCall(&tags[0]);
  ASSERT_TRUE(Await(cq, &tags[0]));
  const char request[] = {0x3a, 0x00};
  grpc::Slice slice(request, sizeof(request));
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, &tags[1]);
  ASSERT_TRUE(Await(cq, &tags[1]));
  call->WritesDone(&tags[2]);
  ASSERT_TRUE(Await(cq, &tags[2]));
  grpc::ByteBuffer in;
  call->Read(&in, &tags[3]);
  ASSERT_TRUE(Await(cq, &tags[3]));
  grpc::Status status;
  call->Finish(&status, &tags[4]);
  ASSERT_TRUE(Await(cq, &tags[4]));
  EXPECT_TRUE(status.ok()) << status.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_NE(bytes.find("qshard.v1.Qshard"), std::string::npos);
  EXPECT_NE(bytes.find("grpc.health.v1.Health"), std::string::npos);
  cq.Shutdown();
  void* tag;
  bool ok;
  while (cq.Next(&tag, &ok)) {
  }
}

int FindLibprotobuf(dl_phdr_info* info, size_t, void* found) {
  if (info->dlpi_name != nullptr &&
      std::string(info->dlpi_name).find("libprotobuf.so") != std::string::npos) {
    *static_cast<bool*>(found) = true;
  }
  return 0;
}

// Debian's libsentencepiece exports its own protobuf 3.14 runtime. The server links
// protobuf statically and ahead of it; if a protobuf call ever bound to SentencePiece's
// copy (or libprotobuf.so were loaded too), the process would abort at startup or
// corrupt messages.
TEST(ServiceHealthTest, ProtobufIsNotSharedWithSentencePiece) {
  bool shared_protobuf = false;
  dl_iterate_phdr(FindLibprotobuf, &shared_protobuf);
  EXPECT_FALSE(shared_protobuf) << "libprotobuf.so is loaded";
  Dl_info info{};
  const auto fn = &google::protobuf::MessageLite::ParseFromString;
  void* addr = nullptr;
  static_assert(sizeof(fn) >= sizeof(addr));
  std::memcpy(&addr, &fn, sizeof(addr));
  ASSERT_NE(dladdr(addr, &info), 0);
  ASSERT_NE(info.dli_fname, nullptr);
  EXPECT_EQ(std::string(info.dli_fname).find("sentencepiece"), std::string::npos) << info.dli_fname;
}

}  // namespace
}  // namespace qshard::testing
