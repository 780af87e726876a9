#include "service/server/engine_loop.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/base/log.h"
#include "service/server/request_translation.h"

namespace qshard {
namespace {

double Seconds(EngineLoop::Clock::duration d) { return std::chrono::duration<double>(d).count(); }

}  // namespace

EngineLoop::EngineLoop(std::unique_ptr<Engine> engine, ServerMetrics* metrics,
                       const EngineLoopOptions& options)
    : engine_(std::move(engine)), metrics_(metrics), options_(options) {
  std::lock_guard<std::mutex> lock(mu_);
  PublishStatsLocked();
}

EngineLoop::~EngineLoop() { Stop(); }

void EngineLoop::Start() {
  std::lock_guard<std::mutex> lock(mu_);
  if (started_) return;
  started_ = true;
  thread_ = std::thread([this] { Run(); });
}

void EngineLoop::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

absl::Status EngineLoop::Submit(Request request, OutputSink* sink, Deadline deadline) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_ || !started_) {
      return absl::UnavailableError("the engine is not running (server starting or stopping)");
    }
    if (in_flight_.count(request.id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("request_id '", request.id, "' is already in flight"));
    }
    const int64_t waiting = engine_waiting_ + static_cast<int64_t>(adds_.size());
    if (waiting >= options_.max_queue) {
      return absl::ResourceExhaustedError(absl::StrCat("the request queue is full (", waiting,
                                                       " requests waiting, --max-queue ",
                                                       options_.max_queue, "); retry later"));
    }
    in_flight_.insert(request.id);
    adds_.push_back(Pending{std::move(request), sink, Clock::now(), deadline});
    stats_.waiting = static_cast<int32_t>(waiting + 1);
    stats_.in_flight = static_cast<int64_t>(in_flight_.size());
  }
  cv_.notify_one();
  return absl::OkStatus();
}

bool EngineLoop::Abort(const std::string& id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!in_flight_.count(id)) return false;
    aborts_.push_back(id);
  }
  cv_.notify_one();
  return true;
}

void EngineLoop::AbortAll() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    abort_all_ = true;
  }
  cv_.notify_one();
}

EngineLoopStats EngineLoop::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void EngineLoop::Run() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] {
        return stop_ || abort_all_ || !adds_.empty() || !aborts_.empty() || engine_->HasWork();
      });
      // Stopping aborts everything, including requests that arrive while the last
      // steps run; the loop ends once every sink has had its final output.
      if (stop_) abort_all_ = true;
      DrainCommandsLocked();
      PublishStatsLocked();
      if (stop_ && tracked_.empty() && !engine_->HasWork()) break;
    }
    // Sinks run outside mu_: they may call back into Abort / stats.
    for (size_t i = 0; i < failed_.size(); ++i) failed_sinks_[i]->OnOutput(failed_[i]);
    failed_.clear();
    failed_sinks_.clear();

    AbortExpired();
    if (!engine_->HasWork()) continue;

    const Clock::time_point step_start = Clock::now();
    absl::StatusOr<std::vector<RequestOutput>> outs = engine_->Step();
    const Clock::time_point now = Clock::now();
    {
      // Gauges first: a client that has just seen a token finds them up to date.
      std::lock_guard<std::mutex> lock(mu_);
      PublishStatsLocked();
    }
    if (!outs.ok()) {
      // The engine could not even report per-request errors: fail everything in flight
      // (outputs of these ids that a later step reports are ignored).
      QSHARD_LOG(ERROR) << "engine step failed: " << outs.status();
      std::vector<std::string> ids;
      for (const auto& [id, t] : tracked_) ids.push_back(id);
      for (const std::string& id : ids) {
        engine_->Abort(id);
        RequestOutput out;
        out.id = id;
        out.finished = true;
        out.finish_reason = FinishReason::kError;
        out.error = absl::InternalError(
            absl::StrCat("engine step failed: ", std::string(outs.status().message())));
        Dispatch(out, step_start, now);
      }
    } else {
      for (const RequestOutput& out : *outs) Dispatch(out, step_start, now);
    }
  }
  QSHARD_LOG(DEBUG) << "engine loop stopped";
}

void EngineLoop::DrainCommandsLocked() {
  for (Pending& p : adds_) {
    const std::string id = p.request.id;
    if (absl::Status st = engine_->AddRequest(std::move(p.request)); !st.ok()) {
      in_flight_.erase(id);
      FailPending(p, id, st);
      continue;
    }
    Tracked& t = tracked_[id];
    t.sink = p.sink;
    t.arrival = p.arrival;
    t.deadline = p.deadline;
  }
  adds_.clear();
  const auto abort = [&](const std::string& id, Tracked& t) {
    if (t.abort_sent) return;
    t.abort_sent = true;
    engine_->Abort(id);
  };
  for (const std::string& id : aborts_) {
    if (auto it = tracked_.find(id); it != tracked_.end()) abort(id, it->second);
  }
  aborts_.clear();
  if (abort_all_) {
    for (auto& [id, t] : tracked_) abort(id, t);
    abort_all_ = false;
  }
}

void EngineLoop::FailPending(Pending& p, const std::string& id, const absl::Status& status) {
  RequestOutput out;
  out.id = id;
  out.finished = true;
  out.finish_reason = FinishReason::kError;
  out.error = status;
  metrics_->RequestFailed(StatusCodeName(static_cast<grpc::StatusCode>(status.code())));
  failed_.push_back(std::move(out));
  failed_sinks_.push_back(p.sink);
}

void EngineLoop::AbortExpired() {
  const auto now = std::chrono::system_clock::now();
  for (auto& [id, t] : tracked_) {
    if (!t.abort_sent && t.deadline != Deadline::max() && t.deadline <= now) {
      t.abort_sent = true;
      engine_->Abort(id);
    }
  }
}

void EngineLoop::Dispatch(const RequestOutput& out, Clock::time_point step_start,
                          Clock::time_point now) {
  auto it = tracked_.find(out.id);
  if (it == tracked_.end()) return;
  Tracked& t = it->second;
  const int64_t n = static_cast<int64_t>(out.token_ids.size());
  if (n > 0) {
    metrics_->AddGenerationTokens(n);
    if (!t.has_token) {
      metrics_->ObserveTimeToFirstToken(Seconds(now - t.arrival));
      metrics_->ObserveQueueTime(Seconds(step_start - t.arrival));
    } else {
      const double gap = Seconds(now - t.last_token) / static_cast<double>(n);
      for (int64_t i = 0; i < n; ++i) metrics_->ObserveInterTokenLatency(gap);
    }
    t.has_token = true;
    t.last_token = now;
  }
  OutputSink* sink = t.sink;
  if (out.finished) {
    // Count before the sink sees the end, so a client that has its answer reads
    // consistent counters.
    metrics_->ObserveE2eLatency(Seconds(now - t.arrival));
    metrics_->AddPromptTokens(out.prompt_tokens);
    if (out.finish_reason == FinishReason::kError) {
      metrics_->RequestFailed(StatusCodeName(static_cast<grpc::StatusCode>(out.error.code())));
    } else {
      metrics_->RequestSucceeded(FinishReasonName(out.finish_reason));
    }
    tracked_.erase(it);
    std::lock_guard<std::mutex> lock(mu_);
    // Free the id first: a client may reuse it as soon as it sees the end of its stream.
    in_flight_.erase(out.id);
    stats_.in_flight = static_cast<int64_t>(in_flight_.size());
  }
  sink->OnOutput(out);
}

void EngineLoop::PublishStatsLocked() {
  const EngineStats es = engine_->stats();
  engine_waiting_ = es.num_waiting;
  stats_.running = es.num_running;
  stats_.waiting = es.num_waiting + static_cast<int32_t>(adds_.size());
  stats_.kv_blocks_used = es.kv_blocks_used;
  stats_.kv_blocks_total = es.kv_blocks_total;
  stats_.in_flight = static_cast<int64_t>(in_flight_.size());
  metrics_->SetEngineState(stats_.running, stats_.waiting, stats_.kv_blocks_used,
                           stats_.kv_blocks_total);
  // The engine keeps running totals; the counters advance by what is new since the last
  // step.
  if (es.num_preemptions > last_.num_preemptions) {
    metrics_->AddPreemptions(es.num_preemptions - last_.num_preemptions);
  }
  if (es.prefix_cache_queries > last_.prefix_cache_queries) {
    metrics_->AddPrefixCacheQueries(es.prefix_cache_queries - last_.prefix_cache_queries);
  }
  if (es.prefix_cache_hits > last_.prefix_cache_hits) {
    metrics_->AddPrefixCacheHits(es.prefix_cache_hits - last_.prefix_cache_hits);
  }
  last_ = es;
}

}  // namespace qshard
