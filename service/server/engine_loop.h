// File: engine_loop.h
// Runs the single-threaded Engine on its own thread and lets any thread submit and abort
// requests. Each request's outputs go to its OutputSink on the engine thread as soon as a
// step produces them; the loop also keeps the Prometheus metrics that need per-request
// timing (TTFT, inter-token latency, queue time, e2e) and the scheduler gauges.
//
//   EngineLoop loop(std::move(engine), &metrics, {.max_queue = 256});
//   loop.Start();
//   absl::Status st = loop.Submit(std::move(request), sink, deadline);
//   loop.Abort("req-1");   // the sink's final output has finish_reason kAbort
#ifndef QSHARD_SERVICE_SERVER_ENGINE_LOOP_H_
#define QSHARD_SERVICE_SERVER_ENGINE_LOOP_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "absl/status/status.h"
#include "runtime/engine/engine.h"
#include "service/server/metrics.h"

namespace qshard {

// Receives one request's outputs, on the engine thread. Must not block (the whole batch
// waits). After the output with finished == true the loop never touches the sink again.
// A request the engine rejects or fails gets one output with finish_reason kError.
class OutputSink {
 public:
  virtual ~OutputSink() = default;
  virtual void OnOutput(const RequestOutput& output) = 0;
};

struct EngineLoopOptions {
  // Submit answers ResourceExhausted while this many requests wait (queued, not running).
  int64_t max_queue = 256;
};

// A consistent view of the scheduler, updated after every step.
struct EngineLoopStats {
  int32_t running = 0;
  int32_t waiting = 0;  // in the engine's queue + submitted but not yet handed over
  int32_t kv_blocks_used = 0;
  int32_t kv_blocks_total = 0;
  int64_t in_flight = 0;  // submitted and not yet finished
};

class EngineLoop {
 public:
  using Clock = std::chrono::steady_clock;
  using Deadline = std::chrono::system_clock::time_point;  // max() = none

  EngineLoop(std::unique_ptr<Engine> engine, ServerMetrics* metrics,
             const EngineLoopOptions& options);
  ~EngineLoop();  // Stop()s
  EngineLoop(const EngineLoop&) = delete;
  EngineLoop& operator=(const EngineLoop&) = delete;

  void Start();
  // Aborts whatever is still in flight (each sink gets its final kAbort output), then
  // joins the thread. Later Submit calls get Unavailable.
  void Stop();

  // Queues a validated request. ResourceExhausted when the queue is full, AlreadyExists
  // when request.id is in flight, Unavailable after Stop. On success the sink gets outputs
  // until one is finished. A request still running at `deadline` is aborted.
  absl::Status Submit(Request request, OutputSink* sink, Deadline deadline = Deadline::max());
  // Aborts an in-flight request before the next engine step; false when the id is not in
  // flight.
  bool Abort(const std::string& id);
  void AbortAll();

  EngineLoopStats stats() const;
  // Immutable engine facts (config, tokenizer, KV spec) are safe to read from any thread;
  // everything else about the engine belongs to the loop's thread.
  const Engine& engine() const { return *engine_; }

 private:
  struct Pending {
    Request request;
    OutputSink* sink;
    Clock::time_point arrival;
    Deadline deadline;
  };
  // Engine-thread bookkeeping of a request the engine has accepted.
  struct Tracked {
    OutputSink* sink = nullptr;
    Clock::time_point arrival;
    Deadline deadline;
    Clock::time_point last_token;
    bool has_token = false;
    bool abort_sent = false;
  };

  void Run();
  // Hands queued adds / aborts to the engine (called with mu_ held).
  void DrainCommandsLocked();
  void AbortExpired();
  // Forwards one output to its sink and records its metrics.
  void Dispatch(const RequestOutput& out, Clock::time_point step_start, Clock::time_point now);
  // Finishes a request the engine never accepted.
  void FailPending(Pending& p, const std::string& id, const absl::Status& status);
  void PublishStatsLocked();

  std::unique_ptr<Engine> engine_;
  ServerMetrics* metrics_;
  EngineLoopOptions options_;
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool started_ = false;
  std::vector<Pending> adds_;                  // guarded by mu_
  std::vector<std::string> aborts_;            // guarded by mu_
  bool abort_all_ = false;                     // guarded by mu_
  std::unordered_set<std::string> in_flight_;  // guarded by mu_: ids submitted, not finished
  EngineLoopStats stats_;                      // guarded by mu_
  int64_t engine_waiting_ = 0;  // guarded by mu_: the engine's queue at the last step

  // Engine thread only.
  std::map<std::string, Tracked> tracked_;
  std::vector<RequestOutput> failed_;  // rejected adds, reported outside mu_
  std::vector<OutputSink*> failed_sinks_;
  EngineStats last_;  // the engine's counters at the previous publish
};

}  // namespace qshard

#endif  // QSHARD_SERVICE_SERVER_ENGINE_LOOP_H_
