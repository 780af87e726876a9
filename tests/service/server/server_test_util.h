// File: server_test_util.h
// Helpers for the gRPC service tests: an in-process server on 127.0.0.1 with ephemeral
// ports, a blocking Generate client that collects the stream, and a /metrics scraper.
#ifndef QSHARD_TESTS_SERVICE_SERVER_SERVER_TEST_UTIL_H_
#define QSHARD_TESTS_SERVICE_SERVER_SERVER_TEST_UTIL_H_

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <functional>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <atomic>
#include <thread>
#include <vector>

#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "qshard/v1/qshard.grpc.pb.h"
#include "service/server/server.h"
#include "tests/test_support.h"

namespace qshard::testing {

inline std::string ModelDir() { return SourceDir() + "/models/kjv-llama-12m"; }

// Options for a small in-process server: loopback, ephemeral ports, a modest KV pool.
inline ServerOptions TestServerOptions() {
  ServerOptions o;
  o.engine.model_dir = ModelDir();
  o.engine.device = "cpu";
  o.engine.kv_cache_memory_bytes = int64_t{64} << 20;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = 0;
  o.shutdown_timeout_s = 5;
  return o;
}

// Starts and loads a server; fails the current test (returning null) when it can't.
inline std::unique_ptr<QshardServer> StartTestServer(const ServerOptions& options) {
  auto server = std::make_unique<QshardServer>(options);
  absl::Status st = server->Start();
  EXPECT_TRUE(st.ok()) << st;
  if (!st.ok()) return nullptr;
  st = server->LoadModel();
  EXPECT_TRUE(st.ok()) << st;
  if (!st.ok()) return nullptr;
  return server;
}

inline std::unique_ptr<v1::Qshard::Stub> MakeStub(const std::string& address) {
  return v1::Qshard::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

// Everything one Generate stream returned.
struct StreamResult {
  grpc::Status status;
  std::string request_id;  // as echoed by the responses
  std::vector<int32_t> token_ids;
  std::string text;
  int num_chunks = 0;
  std::optional<v1::Complete> complete;
  std::vector<v1::TokenLogprobs> logprobs;
};

// Runs one Generate to completion. on_chunk (optional) sees each chunk as it arrives and
// may cancel the context.
inline StreamResult Generate(
    v1::Qshard::Stub& stub, const v1::GenerateRequest& req, grpc::ClientContext* ctx = nullptr,
    const std::function<void(const v1::GenerateResponse&, grpc::ClientContext*)>& on_chunk =
        nullptr) {
  grpc::ClientContext local;
  if (ctx == nullptr) {
    local.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    ctx = &local;
  }
  StreamResult r;
  auto reader = stub.Generate(ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    if (!resp.request_id().empty()) r.request_id = resp.request_id();
    if (resp.has_chunk()) {
      ++r.num_chunks;
      r.token_ids.insert(r.token_ids.end(), resp.chunk().token_ids().begin(),
                         resp.chunk().token_ids().end());
      r.text += resp.chunk().text();
      r.logprobs.insert(r.logprobs.end(), resp.chunk().logprobs().begin(),
                        resp.chunk().logprobs().end());
    } else if (resp.has_complete()) {
      r.complete = resp.complete();
    }
    if (on_chunk) on_chunk(resp, ctx);
  }
  r.status = reader->Finish();
  return r;
}

inline v1::GenerateRequest TextRequest(const std::string& text, int max_tokens,
                                       float temperature = 0.0f) {
  v1::GenerateRequest req;
  req.set_text(text);
  req.mutable_sampling()->set_temperature(temperature);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  return req;
}

inline v1::GenerateRequest IdsRequest(const std::vector<int32_t>& ids, int max_tokens) {
  v1::GenerateRequest req;
  for (int32_t id : ids) req.mutable_token_ids()->add_ids(id);
  req.mutable_sampling()->set_temperature(0.0f);
  req.mutable_sampling()->set_max_tokens(max_tokens);
  return req;
}

// GET http://127.0.0.1:port/path; returns the body ("" on failure).
inline std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return "";
  }
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (send(fd, req.data(), req.size(), 0) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return "";
  }
  std::string resp;
  char buf[8192];
  for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) resp.append(buf, n);
  close(fd);
  const size_t body = resp.find("\r\n\r\n");
  return body == std::string::npos ? "" : resp.substr(body + 4);
}

// The value of one series in a Prometheus text exposition, e.g.
// MetricValue(text, "qshard_kv_cache_blocks{state=\"used\"}"); nullopt when absent.
inline std::optional<double> MetricValue(const std::string& text, const std::string& series) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.size() > series.size() && line.compare(0, series.size(), series) == 0 &&
        line[series.size()] == ' ') {
      return std::strtod(line.c_str() + series.size() + 1, nullptr);
    }
  }
  return std::nullopt;
}

// The sum over every series of one metric (all label sets); 0 when absent.
inline double MetricSum(const std::string& text, const std::string& name) {
  std::istringstream in(text);
  double sum = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.size() <= name.size() || line.compare(0, name.size(), name) != 0) continue;
    const char next = line[name.size()];
    if (next != ' ' && next != '{') continue;
    const size_t space = line.rfind(' ');
    sum += std::strtod(line.c_str() + space + 1, nullptr);
  }
  return sum;
}

// Polls cond every 5 ms for up to timeout; true once it holds.
inline bool WaitUntil(std::chrono::milliseconds timeout, const std::function<bool()>& cond) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (!cond()) {
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// The drain scenario's long request must still be running when a 1 s shutdown timeout
// expires on any machine: 900 tokens were not enough once the 12M model decoded at
// ~2,700 tok/s (it finished first and was not aborted). 8,000 tokens take several seconds
// at any speed seen (each token also attends over a longer context); the servers of these
// tests raise --max-model-len to fit it (the model's 1,024 positions are extrapolated by
// RoPE, which is fine for a drain test).
inline constexpr int32_t kDrainLongTokens = 8000;
inline constexpr int64_t kDrainMaxModelLen = 8192;

// The drain scenario's two streams: a long one (kDrainLongTokens, EOS ignored) that has
// produced its first chunk when Start returns, and a short one (30 tokens) started right
// after.
class DrainStreams {
 public:
  void Start(v1::Qshard::Stub& stub) {
    v1::GenerateRequest long_req = TextRequest("And God said", kDrainLongTokens);
    long_req.mutable_sampling()->set_ignore_eos(true);
    long_thread_ = std::thread([this, &stub, long_req] {
      long_result_ = Generate(stub, long_req, nullptr,
                              [this](const v1::GenerateResponse&, grpc::ClientContext*) {
                                started_ = true;
                              });
    });
    EXPECT_TRUE(WaitUntil(std::chrono::milliseconds(10000), [this] { return started_.load(); }));
    short_thread_ =
        std::thread([this, &stub] { short_result_ = Generate(stub, TextRequest("In the beginning", 30)); });
  }
  // Joins both and checks the drain outcome: the short one finished normally, the long one
  // was cut at the shutdown timeout with finish_reason ABORT.
  void JoinAndExpectShortStoppedLongAborted() {
    short_thread_.join();
    long_thread_.join();
    ASSERT_TRUE(short_result_.status.ok()) << short_result_.status.error_message();
    ASSERT_TRUE(short_result_.complete.has_value());
    EXPECT_EQ(short_result_.complete->finish_reason(), v1::FINISH_REASON_STOP);
    ASSERT_TRUE(long_result_.status.ok()) << long_result_.status.error_message();
    ASSERT_TRUE(long_result_.complete.has_value());
    EXPECT_EQ(long_result_.complete->finish_reason(), v1::FINISH_REASON_ABORT);
    EXPECT_GT(long_result_.token_ids.size(), 0u);
  }

 private:
  std::atomic<bool> started_{false};
  std::thread long_thread_, short_thread_;
  StreamResult long_result_, short_result_;
};

}  // namespace qshard::testing


#endif  // QSHARD_TESTS_SERVICE_SERVER_SERVER_TEST_UTIL_H_
