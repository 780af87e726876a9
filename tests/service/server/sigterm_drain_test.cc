// `qshard serve` as a real process: it reports its ephemeral ports on stderr, and SIGTERM
// drains it (readiness NOT_SERVING, new calls UNAVAILABLE, in-flight requests finish up to
// --shutdown-timeout, the rest end with FINISH_REASON_ABORT) before it exits 0.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "tests/cli_runner.h"
#include "tests/service/server/server_test_util.h"

namespace qshard::testing {
namespace {

using std::chrono::milliseconds;

// A child `qshard serve` whose stderr is collected by a thread (so it never blocks on a
// full pipe).
class ServeProcess {
 public:
  explicit ServeProcess(const std::vector<std::string>& args) {
    // Everything the child needs is prepared first: after fork() in a threaded process
    // only async-signal-safe calls are allowed (no malloc).
    std::vector<std::string> argv_s = {QshardBinary(), "serve"};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    int fds[2];
    if (pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], STDERR_FILENO);
      const int devnull = open("/dev/null", O_WRONLY);
      dup2(devnull, STDOUT_FILENO);
      close(fds[0]);
      close(fds[1]);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(fds[1]);
    reader_ = std::thread([this, fd = fds[0]] {
      char buf[4096];
      for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) {
        std::lock_guard<std::mutex> lock(mu_);
        err_.append(buf, n);
      }
      close(fd);
    });
  }

  ~ServeProcess() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (reader_.joinable()) reader_.join();
  }

  std::string err() {
    std::lock_guard<std::mutex> lock(mu_);
    return err_;
  }

  // Parses "listening on HOST:PORT metrics HOST:MPORT" once the child prints it.
  bool WaitForPorts(milliseconds timeout) {
    const std::regex line(R"(listening on ([^ ]+):(\d+) metrics [^ ]+:(-?\d+)\n)");
    return WaitUntil(timeout, [&] {
      std::smatch m;
      const std::string text = err();
      if (!std::regex_search(text, m, line)) return false;
      port_ = std::stoi(m[2]);
      metrics_port_ = std::stoi(m[3]);
      return true;
    });
  }

  // Waits for exit; the exit code, or -1 on timeout / abnormal end.
  int Wait(milliseconds timeout) {
    int status = 0;
    const bool done = WaitUntil(timeout, [&] { return waitpid(pid_, &status, WNOHANG) == pid_; });
    if (!done) return -1;
    reaped_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

  pid_t pid() const { return pid_; }
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  std::thread reader_;
  std::mutex mu_;
  std::string err_;
  int port_ = 0;
  int metrics_port_ = 0;
};

int Readiness(const std::string& address) {
  auto stub = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + milliseconds(500));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service("qshard.v1.Qshard");
  grpc::health::v1::HealthCheckResponse resp;
  if (!stub->Check(&ctx, req, &resp).ok()) return -1;
  return resp.status();
}

TEST(ServiceSigtermTest, ServeDrainsAndExitsZero) {
  ServeProcess serve({"--model", ModelDir(), "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                      "0", "--kv-cache-memory-bytes", "64M", "--shutdown-timeout", "1",
                      "--max-model-len", std::to_string(kDrainMaxModelLen), "--log-format",
                      "json"});
  ASSERT_GT(serve.pid(), 0);
  ASSERT_TRUE(serve.WaitForPorts(milliseconds(20000))) << serve.err();
  const std::string addr = "127.0.0.1:" + std::to_string(serve.port());
  ASSERT_TRUE(WaitUntil(milliseconds(20000), [&] {
    return Readiness(addr) == grpc::health::v1::HealthCheckResponse::SERVING;
  })) << serve.err();
  EXPECT_GT(serve.metrics_port(), 0);
  EXPECT_FALSE(HttpGet(serve.metrics_port(), "/metrics").empty());

  auto stub = MakeStub(addr);
  DrainStreams streams;
  streams.Start(*stub);
  // Both must be accepted before the signal, or the short one would be refused.
  ASSERT_TRUE(WaitUntil(milliseconds(5000), [&] {
    grpc::ClientContext ctx;
    v1::ServerInfo info;
    return stub->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok() &&
           info.num_requests_running() + info.num_requests_waiting() == 2;
  }));

  ASSERT_EQ(kill(serve.pid(), SIGTERM), 0);
  EXPECT_TRUE(WaitUntil(milliseconds(2000), [&] {
    return Readiness(addr) != grpc::health::v1::HealthCheckResponse::SERVING;
  }));
  StreamResult refused = Generate(*stub, TextRequest("And God said", 3));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);

  streams.JoinAndExpectShortStoppedLongAborted();
  EXPECT_EQ(serve.Wait(milliseconds(15000)), 0) << serve.err();
  // JSON logs: one object per line.
  EXPECT_NE(serve.err().find("\"msg\""), std::string::npos) << serve.err();
}

TEST(ServiceSigtermTest, IdleServerExitsPromptlyOnSigint) {
  ServeProcess serve({"--model", ModelDir(), "--host", "127.0.0.1", "--port", "0", "--metrics-port",
                      "-1", "--kv-cache-memory-bytes", "16M"});
  ASSERT_TRUE(serve.WaitForPorts(milliseconds(20000))) << serve.err();
  EXPECT_EQ(serve.metrics_port(), -1);
  const std::string addr = "127.0.0.1:" + std::to_string(serve.port());
  ASSERT_TRUE(WaitUntil(milliseconds(20000), [&] {
    return Readiness(addr) == grpc::health::v1::HealthCheckResponse::SERVING;
  }));
  ASSERT_EQ(kill(serve.pid(), SIGINT), 0);
  EXPECT_EQ(serve.Wait(milliseconds(5000)), 0) << serve.err();
}

TEST(ServiceSigtermTest, BadFlagsExitOneNamingTheFlag) {
  CliResult r = RunQshard({"serve", "--model", ModelDir(), "--log-format", "xml"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--log-format"), std::string::npos) << r.err;
  r = RunQshard({"serve", "--model", ModelDir(), "--metrics-compat", "tgi"});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("--metrics-compat"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace qshard::testing
