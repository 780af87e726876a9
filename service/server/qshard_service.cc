#include "service/server/qshard_service.h"

#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/base/log.h"
#include "service/server/request_translation.h"

#ifndef QSHARD_VERSION
#define QSHARD_VERSION "0.0.0-dev"
#endif

namespace qshard {

std::string QshardVersion() { return QSHARD_VERSION; }

// One Generate call. Two parties hold it: gRPC (until OnDone) and, once the request is
// submitted, the engine loop (until it delivers the final output). Whichever lets go last
// deletes it, so neither side can see it freed while still inside one of its methods.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse>,
                              public OutputSink {
 public:
  GenerateReactor(QshardServiceImpl* service, grpc::CallbackServerContext* context,
                  const v1::GenerateRequest* request)
      : service_(service), deadline_(context->deadline()) {
    service_->active_streams_.fetch_add(1);
    Start(*request);
  }

  // Engine thread.
  void OnOutput(const RequestOutput& out) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!finish_called_ && !cancelled_ && !write_failed_) Enqueue(out);
      PumpLocked();
    }
    if (out.finished) Unref();
  }

  void OnWriteDone(bool ok) override {
    bool abort = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok && !write_failed_) {
        // The stream is broken (client gone): stop generating for it.
        write_failed_ = true;
        abort = !engine_done_;
      }
      PumpLocked();
    }
    if (abort) service_->loop()->Abort(id_);
  }

  void OnCancel() override {
    bool abort = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      abort = submitted_ && !engine_done_;
      PumpLocked();
    }
    // The engine frees the sequence's blocks before its next step.
    if (abort) service_->loop()->Abort(id_);
  }

  void OnDone() override {
    service_->active_streams_.fetch_sub(1);
    Unref();
  }

 private:
  void Start(const v1::GenerateRequest& request) {
    if (service_->draining()) {
      Reject(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          "the server is shutting down; retry on another replica"));
      return;
    }
    EngineLoop* loop = service_->loop();
    if (loop == nullptr) {
      Reject(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading"));
      return;
    }
    const Engine& engine = loop->engine();
    TranslationLimits limits;
    limits.vocab_size = static_cast<int32_t>(engine.config().vocab_size);
    limits.max_model_len = engine.max_model_len();
    absl::StatusOr<Request> req = TranslateGenerateRequest(request, engine.tokenizer(), limits);
    if (!req.ok()) {
      Reject(ToGrpcStatus(req.status()));
      return;
    }
    if (req->id.empty()) req->id = service_->NewRequestId();
    id_ = req->id;
    {
      std::lock_guard<std::mutex> lock(mu_);
      submitted_ = true;
    }
    // The engine thread may call OnOutput before Submit returns: take its reference first.
    refs_.fetch_add(1);
    absl::Status st = loop->Submit(*std::move(req), this, deadline_);
    if (!st.ok()) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        submitted_ = false;
      }
      refs_.fetch_sub(1);
      Reject(ToGrpcStatus(st));
    }
  }

  // Ends a call the engine never saw; it counts as a failed request.
  void Reject(const grpc::Status& status) {
    service_->metrics_->RequestFailed(StatusCodeName(status.error_code()));
    std::lock_guard<std::mutex> lock(mu_);
    engine_done_ = true;
    final_status_ = status;
    PumpLocked();
  }

  bool DeadlinePassed() const {
    return deadline_ != std::chrono::system_clock::time_point::max() &&
           std::chrono::system_clock::now() >= deadline_;
  }

  v1::Chunk* PendingChunk() {
    // Coalesce with a chunk not yet handed to gRPC: a slow reader gets fewer, larger
    // messages instead of an ever-growing queue.
    if (!queue_.empty() && queue_.back().has_chunk()) return queue_.back().mutable_chunk();
    queue_.emplace_back();
    queue_.back().set_request_id(id_);
    return queue_.back().mutable_chunk();
  }

  void Enqueue(const RequestOutput& out) {
    if (!out.token_ids.empty() || !out.text.empty()) {
      v1::Chunk* chunk = PendingChunk();
      for (int32_t id : out.token_ids) chunk->add_token_ids(id);
      chunk->mutable_text()->append(out.text);
      for (const SampleResult& r : out.logprobs) {
        v1::TokenLogprobs* lp = chunk->add_logprobs();
        lp->set_token_id(r.token_id);
        lp->set_logprob(r.logprob);
        for (const TokenLogprob& t : r.top) {
          v1::TopLogprob* top = lp->add_top();
          top->set_token_id(t.token_id);
          top->set_logprob(t.logprob);
        }
      }
    }
    if (!out.finished) return;
    engine_done_ = true;
    if (out.finish_reason == FinishReason::kError) {
      final_status_ = ToGrpcStatus(out.error);
      return;
    }
    if (out.finish_reason == FinishReason::kAbort && DeadlinePassed()) {
      final_status_ = grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded");
      return;
    }
    queue_.emplace_back();
    v1::GenerateResponse& resp = queue_.back();
    resp.set_request_id(id_);
    v1::Complete* complete = resp.mutable_complete();
    complete->set_finish_reason(ToProtoFinishReason(out.finish_reason));
    v1::Usage* usage = complete->mutable_usage();
    usage->set_prompt_tokens(out.prompt_tokens);
    usage->set_completion_tokens(out.completion_tokens);
    usage->set_cached_prompt_tokens(out.cached_prompt_tokens);
    final_status_ = grpc::Status::OK;
  }

  // Starts the next write, or Finish once everything is written (or can't be).
  void PumpLocked() {
    if (finish_called_ || writing_) return;
    if (cancelled_ || write_failed_) {
      // Nothing more can reach the client; the engine still holds its reference until
      // it reports the abort, so finishing now is safe.
      finish_called_ = true;
      Finish(DeadlinePassed()
                 ? grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline exceeded")
                 : grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
      return;
    }
    if (!queue_.empty()) {
      in_write_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      StartWrite(&in_write_);
      return;
    }
    if (final_status_.has_value()) {
      finish_called_ = true;
      Finish(*final_status_);
    }
  }

  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  QshardServiceImpl* service_;
  const std::chrono::system_clock::time_point deadline_;
  std::string id_;
  std::atomic<int> refs_{1};  // gRPC's; the engine's is added on submission

  std::mutex mu_;
  std::deque<v1::GenerateResponse> queue_;    // guarded by mu_: not yet handed to gRPC
  v1::GenerateResponse in_write_;             // owned by gRPC between StartWrite / OnWriteDone
  bool writing_ = false;                      // guarded by mu_
  bool submitted_ = false;                    // guarded by mu_
  bool engine_done_ = false;                  // guarded by mu_: final output seen (or never sent)
  bool cancelled_ = false;                    // guarded by mu_
  bool write_failed_ = false;                 // guarded by mu_
  bool finish_called_ = false;                // guarded by mu_
  std::optional<grpc::Status> final_status_;  // guarded by mu_
};

QshardServiceImpl::QshardServiceImpl(ServerMetrics* metrics)
    : metrics_(metrics), start_time_(std::chrono::steady_clock::now()) {
  std::random_device rd;
  id_prefix_ = absl::StrFormat("req-%08x-", rd());
}

void QshardServiceImpl::SetEngine(EngineLoop* loop, const v1::ModelInfo& model_info) {
  model_info_ = model_info;
  loop_.store(loop, std::memory_order_release);
}

std::string QshardServiceImpl::NewRequestId() {
  return absl::StrCat(id_prefix_, next_id_.fetch_add(1) + 1);
}

grpc::ServerWriteReactor<v1::GenerateResponse>* QshardServiceImpl::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  return new GenerateReactor(this, context, request);
}

grpc::ServerUnaryReactor* QshardServiceImpl::Abort(grpc::CallbackServerContext* context,
                                                   const v1::AbortRequest* request,
                                                   v1::AbortResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  EngineLoop* l = loop();
  if (request->request_id().empty()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 "request_id: required (the id of a Generate call)"));
    return reactor;
  }
  response->set_aborted(l != nullptr && l->Abort(request->request_id()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* QshardServiceImpl::Tokenize(grpc::CallbackServerContext* context,
                                                      const v1::TokenizeRequest* request,
                                                      v1::TokenizeResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  EngineLoop* l = loop();
  if (draining() || l == nullptr) {
    reactor->Finish(
        grpc::Status(grpc::StatusCode::UNAVAILABLE,
                     draining() ? "the server is shutting down" : "the model is still loading"));
    return reactor;
  }
  if (request->text().size() > kMaxTextBytes) {
    reactor->Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                                 absl::StrCat("text must be at most ", kMaxTextBytes,
                                              " bytes, got ", request->text().size())));
    return reactor;
  }
  const Tokenizer& tok = l->engine().tokenizer();
  const bool add_special = !request->has_add_special_tokens() || request->add_special_tokens();
  for (int32_t id : tok.Encode(request->text(), add_special)) {
    response->add_token_ids(id);
    response->add_tokens(tok.IdToPiece(id));
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* QshardServiceImpl::GetModelInfo(grpc::CallbackServerContext* context,
                                                          const v1::GetModelInfoRequest*,
                                                          v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (loop() == nullptr) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading"));
    return reactor;
  }
  *response = model_info_;
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* QshardServiceImpl::GetServerInfo(grpc::CallbackServerContext* context,
                                                           const v1::GetServerInfoRequest*,
                                                           v1::ServerInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (EngineLoop* l = loop(); l != nullptr) {
    const EngineLoopStats st = l->stats();
    response->set_num_requests_running(st.running);
    response->set_num_requests_waiting(st.waiting);
    response->set_kv_cache_blocks_used(st.kv_blocks_used);
    response->set_kv_cache_blocks_total(st.kv_blocks_total);
  }
  response->set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time_).count());
  response->set_version(QshardVersion());
  response->set_draining(draining());
  response->set_active_streams(static_cast<int32_t>(active_streams()));
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace qshard
