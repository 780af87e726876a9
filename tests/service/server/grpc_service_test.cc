// The Qshard RPCs against an in-process server on 127.0.0.1: model/server info,
// tokenization, streamed greedy generation against reference.json, concurrency,
// cancellation / deadline / Abort freeing KV blocks, queue limits and request ids.
#include <atomic>
#include <chrono>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "gtest/gtest.h"
#include "tests/service/server/server_test_util.h"

namespace qshard::testing {
namespace {

using std::chrono::milliseconds;

class ServiceGrpcTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = StartTestServer(TestServerOptions()).release(); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    stub_ = MakeStub(server_->address());
  }

  int UsedBlocks() { return server_->engine_loop()->stats().kv_blocks_used; }
  std::optional<double> ScrapedUsedBlocks() {
    return MetricValue(HttpGet(server_->metrics_port(), "/metrics"),
                       "qshard_kv_cache_blocks{state=\"used\"}");
  }
  // KV blocks return to the pool, as the engine and the /metrics scrape both see it.
  void ExpectBlocksFreedWithin(milliseconds limit) {
    EXPECT_TRUE(WaitUntil(limit, [&] { return UsedBlocks() == 0; }))
        << UsedBlocks() << " blocks still in use";
    EXPECT_TRUE(WaitUntil(limit, [&] { return ScrapedUsedBlocks() == 0.0; }));
  }

  static QshardServer* server_;
  std::unique_ptr<v1::Qshard::Stub> stub_;
};

QshardServer* ServiceGrpcTest::server_ = nullptr;

// A request that runs for seconds unless stopped: no EOS, many tokens.
v1::GenerateRequest LongRequest(const std::string& id) {
  v1::GenerateRequest req = TextRequest("And God said", 900);
  req.set_request_id(id);
  req.mutable_sampling()->set_ignore_eos(true);
  return req;
}

TEST_F(ServiceGrpcTest, GetModelInfoDescribesTheLoadedModel) {
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.model_name(), "kjv-llama-12m");
  EXPECT_EQ(info.model_path(), ModelDir());
  EXPECT_EQ(info.architecture(), "LlamaForCausalLM");
  EXPECT_EQ(info.vocab_size(), 4096);
  EXPECT_EQ(info.max_context_length(), 1024);
  EXPECT_EQ(info.dtype(), "bfloat16");
  EXPECT_EQ(info.quantization_method(), "none");
  EXPECT_EQ(info.kernel(), "cpu-simd-dense");  // the selection function's stable id
  EXPECT_EQ(info.kv_cache_dtype(), "float32");
  EXPECT_EQ(info.block_size(), 16);
  EXPECT_GT(info.num_blocks(), 0);
  EXPECT_EQ(info.device(), "cpu");
  EXPECT_EQ(info.bos_token_id(), 1);
  ASSERT_GE(info.eos_token_ids_size(), 1);
  EXPECT_EQ(info.eos_token_ids(0), 2);
  EXPECT_GT(info.num_parameters(), 10'000'000);
}

TEST_F(ServiceGrpcTest, GetServerInfoReportsStateAndVersion) {
  grpc::ClientContext ctx;
  v1::ServerInfo info;
  ASSERT_TRUE(stub_->GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info).ok());
  EXPECT_EQ(info.version(), QshardVersion());
  EXPECT_FALSE(info.version().empty());
  EXPECT_FALSE(info.draining());
  EXPECT_GE(info.uptime_seconds(), 0.0);
  EXPECT_GT(info.kv_cache_blocks_total(), 0);
  EXPECT_EQ(info.num_requests_running(), 0);
  EXPECT_EQ(info.num_requests_waiting(), 0);
}

TEST_F(ServiceGrpcTest, TokenizeMatchesReferencePromptIds) {
  const nlohmann::json ref = LoadReference(SharedModel("kjv-llama-12m"));
  ASSERT_FALSE(ref.is_null());
  for (const auto& p : ref["prompts"]) {
    grpc::ClientContext ctx;
    v1::TokenizeRequest req;
    req.set_text(p["prompt"].get<std::string>());
    v1::TokenizeResponse resp;
    ASSERT_TRUE(stub_->Tokenize(&ctx, req, &resp).ok());
    const std::vector<int32_t> ids(resp.token_ids().begin(), resp.token_ids().end());
    EXPECT_EQ(ids, p["prompt_ids"].get<std::vector<int32_t>>()) << req.text();
    EXPECT_EQ(resp.tokens_size(), resp.token_ids_size());
  }
  grpc::ClientContext ctx;
  v1::TokenizeRequest req;
  req.set_text("In the beginning");
  req.set_add_special_tokens(false);
  v1::TokenizeResponse resp;
  ASSERT_TRUE(stub_->Tokenize(&ctx, req, &resp).ok());
  EXPECT_EQ(std::vector<int32_t>(resp.token_ids().begin(), resp.token_ids().end()),
            (std::vector<int32_t>{1025, 261, 2060}));
}

TEST_F(ServiceGrpcTest, StreamedGreedyOutputMatchesReference) {
  const nlohmann::json ref = LoadReference(SharedModel("kjv-llama-12m"));
  ASSERT_FALSE(ref.is_null());
  for (const auto& p : ref["prompts"]) {
    const auto want_ids = p["greedy_ids"].get<std::vector<int32_t>>();
    const auto prompt_ids = p["prompt_ids"].get<std::vector<int32_t>>();
    for (const bool as_text : {true, false}) {
      SCOPED_TRACE(p["prompt"].get<std::string>() + (as_text ? " (text)" : " (token_ids)"));
      v1::GenerateRequest req =
          as_text ? TextRequest(p["prompt"].get<std::string>(), 256) : IdsRequest(prompt_ids, 256);
      StreamResult r = Generate(*stub_, req);
      ASSERT_TRUE(r.status.ok()) << r.status.error_message();
      EXPECT_EQ(r.token_ids, want_ids);
      // The deltas concatenate to the completion; it starts with the word's space.
      EXPECT_EQ(std::string(absl::StripLeadingAsciiWhitespace(r.text)),
                p["greedy_text"].get<std::string>());
      // Streamed as produced: one chunk per engine step, not one at the end.
      EXPECT_GE(r.num_chunks, static_cast<int>(want_ids.size()) / 2);
      ASSERT_TRUE(r.complete.has_value());
      EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_STOP);
      EXPECT_EQ(r.complete->usage().prompt_tokens(), static_cast<int>(prompt_ids.size()));
      EXPECT_EQ(r.complete->usage().completion_tokens(), static_cast<int>(want_ids.size()));
      EXPECT_LT(r.complete->usage().cached_prompt_tokens(), static_cast<int>(prompt_ids.size()));
    }
  }
}

TEST_F(ServiceGrpcTest, ConcurrentStreamsEachMatchTheirSoloOutput) {
  const std::vector<std::string> texts = {
      "In the beginning",        "And the LORD said unto Moses,",
      "Blessed are the",         "And God said",
      "The LORD is my shepherd", "For God so loved",
      "And it came to pass",     "Thus saith the LORD"};
  std::vector<v1::GenerateRequest> reqs;
  for (int i = 0; i < 32; ++i) {
    v1::GenerateRequest req = TextRequest(texts[i % texts.size()], 6 + (i * 7) % 34);
    // Different lengths also through ignore_eos on some of them.
    req.mutable_sampling()->set_ignore_eos(i % 3 == 0);
    reqs.push_back(req);
  }
  std::vector<StreamResult> solo;
  for (const auto& req : reqs) solo.push_back(Generate(*stub_, req));

  std::vector<StreamResult> together(reqs.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] { together[i] = Generate(*stub_, reqs[i]); });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(solo[i].status.ok()) << solo[i].status.error_message();
    ASSERT_TRUE(together[i].status.ok()) << together[i].status.error_message();
    EXPECT_FALSE(solo[i].token_ids.empty());
    EXPECT_EQ(together[i].token_ids, solo[i].token_ids);
    EXPECT_EQ(together[i].text, solo[i].text);
  }
  ExpectBlocksFreedWithin(milliseconds(1000));
}

TEST_F(ServiceGrpcTest, MaxTokensEndsWithLength) {
  StreamResult r = Generate(*stub_, TextRequest("And God said", 5));
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.token_ids.size(), 5u);
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.complete->usage().completion_tokens(), 5);
}

TEST_F(ServiceGrpcTest, MaxTokensBeyondTheContextEndsWithLength) {
  std::vector<int32_t> ids(1000, 300);
  ids[0] = 1;
  v1::GenerateRequest req = IdsRequest(ids, 200);
  req.mutable_sampling()->set_ignore_eos(true);
  StreamResult r = Generate(*stub_, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.complete->usage().completion_tokens(), 1024 - 1000);
}

TEST_F(ServiceGrpcTest, StopStringEndsTheStreamBeforeIt) {
  v1::GenerateRequest req = TextRequest("In the beginning", 64);
  req.mutable_sampling()->add_stop("kingdom");
  StreamResult r = Generate(*stub_, req);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.text, " of his ");
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_STOP);
}

TEST_F(ServiceGrpcTest, LogprobsComeWithEachToken) {
  v1::GenerateRequest req = TextRequest("In the beginning", 6);
  req.mutable_sampling()->set_logprobs(3);
  StreamResult r = Generate(*stub_, req);
  ASSERT_TRUE(r.status.ok());
  ASSERT_EQ(r.logprobs.size(), r.token_ids.size());
  for (size_t i = 0; i < r.logprobs.size(); ++i) {
    EXPECT_EQ(r.logprobs[i].token_id(), r.token_ids[i]);
    ASSERT_EQ(r.logprobs[i].top_size(), 3);
    // Greedy: the chosen token is the most likely one.
    EXPECT_EQ(r.logprobs[i].top(0).token_id(), r.token_ids[i]);
    EXPECT_LE(r.logprobs[i].logprob(), 0.0f);
  }
}

TEST_F(ServiceGrpcTest, SeededSamplingIsReproducible) {
  v1::GenerateRequest req = TextRequest("And God said", 20, /*temperature=*/1.0f);
  req.mutable_sampling()->set_seed(1234);
  req.mutable_sampling()->set_top_p(0.9f);
  StreamResult a = Generate(*stub_, req);
  StreamResult b = Generate(*stub_, req);
  ASSERT_TRUE(a.status.ok());
  EXPECT_EQ(a.token_ids, b.token_ids);
}

TEST_F(ServiceGrpcTest, EmptyRequestIdGetsAServerAssignedOne) {
  StreamResult a = Generate(*stub_, TextRequest("And God said", 3));
  StreamResult b = Generate(*stub_, TextRequest("And God said", 3));
  ASSERT_TRUE(a.status.ok());
  EXPECT_FALSE(a.request_id.empty());
  EXPECT_NE(a.request_id, b.request_id);

  v1::GenerateRequest named = TextRequest("And God said", 3);
  named.set_request_id("my-id");
  StreamResult c = Generate(*stub_, named);
  EXPECT_EQ(c.request_id, "my-id");
}

TEST_F(ServiceGrpcTest, DuplicateInFlightRequestIdIsAlreadyExists) {
  grpc::ClientContext ctx;
  std::atomic<bool> started{false};
  StreamResult first;
  std::thread t([&] {
    first = Generate(*stub_, LongRequest("dup"), &ctx,
                     [&](const v1::GenerateResponse&, grpc::ClientContext*) { started = true; });
  });
  ASSERT_TRUE(WaitUntil(milliseconds(10000), [&] { return started.load(); }));
  StreamResult second = Generate(*stub_, LongRequest("dup"));
  EXPECT_EQ(second.status.error_code(), grpc::StatusCode::ALREADY_EXISTS);
  EXPECT_NE(second.status.error_message().find("dup"), std::string::npos);
  ctx.TryCancel();
  t.join();
  // Once the first has ended, the id is free again.
  ASSERT_TRUE(WaitUntil(milliseconds(2000),
                        [&] { return server_->engine_loop()->stats().in_flight == 0; }));
  v1::GenerateRequest again = TextRequest("And God said", 2);
  again.set_request_id("dup");
  EXPECT_TRUE(Generate(*stub_, again).status.ok());
}

TEST_F(ServiceGrpcTest, ClientCancelMidStreamFreesKvBlocks) {
  grpc::ClientContext ctx;
  int chunks = 0;
  StreamResult r = Generate(*stub_, LongRequest("cancel-me"), &ctx,
                            [&](const v1::GenerateResponse& resp, grpc::ClientContext* c) {
                              if (resp.has_chunk() && ++chunks == 3) c->TryCancel();
                            });
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_FALSE(r.complete.has_value());
  ExpectBlocksFreedWithin(milliseconds(1000));
  EXPECT_EQ(server_->engine_loop()->stats().in_flight, 0);
}

TEST_F(ServiceGrpcTest, DeadlineExpiryFreesKvBlocks) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + milliseconds(300));
  const auto start = std::chrono::steady_clock::now();
  StreamResult r = Generate(*stub_, LongRequest("deadline"), &ctx);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
  EXPECT_GT(r.token_ids.size(), 0u);
  ExpectBlocksFreedWithin(milliseconds(1000));
}

TEST_F(ServiceGrpcTest, AbortRpcEndsTheStreamWithAbort) {
  std::atomic<bool> started{false};
  StreamResult r;
  std::thread t([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    r = Generate(*stub_, LongRequest("abort-me"), &ctx,
                 [&](const v1::GenerateResponse&, grpc::ClientContext*) { started = true; });
  });
  ASSERT_TRUE(WaitUntil(milliseconds(10000), [&] { return started.load(); }));
  grpc::ClientContext ctx;
  v1::AbortRequest req;
  req.set_request_id("abort-me");
  v1::AbortResponse resp;
  ASSERT_TRUE(stub_->Abort(&ctx, req, &resp).ok());
  EXPECT_TRUE(resp.aborted());
  t.join();
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_ABORT);
  EXPECT_EQ(r.complete->usage().completion_tokens(), static_cast<int>(r.token_ids.size()));
  ExpectBlocksFreedWithin(milliseconds(1000));

  // Unknown (or already finished) ids are not an error: nothing to abort.
  grpc::ClientContext ctx2;
  ASSERT_TRUE(stub_->Abort(&ctx2, req, &resp).ok());
  EXPECT_FALSE(resp.aborted());
}

TEST(ServiceQueueTest, FullQueueIsResourceExhausted) {
  ServerOptions o = TestServerOptions();
  o.engine.max_num_seqs = 1;
  o.max_queue = 1;
  auto server = StartTestServer(o);
  ASSERT_NE(server, nullptr);
  auto stub = MakeStub(server->address());

  // A runs (the only slot), B waits (the whole queue), C is refused.
  grpc::ClientContext ctx_a, ctx_b;
  std::atomic<bool> a_started{false};
  StreamResult a, b;
  std::thread ta([&] {
    a = Generate(*stub, LongRequest("a"), &ctx_a,
                 [&](const v1::GenerateResponse&, grpc::ClientContext*) { a_started = true; });
  });
  ASSERT_TRUE(WaitUntil(milliseconds(10000), [&] { return a_started.load(); }));
  std::thread tb([&] { b = Generate(*stub, LongRequest("b"), &ctx_b); });
  ASSERT_TRUE(
      WaitUntil(milliseconds(5000), [&] { return server->engine_loop()->stats().waiting == 1; }));
  StreamResult c = Generate(*stub, LongRequest("c"));
  EXPECT_EQ(c.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(c.status.error_message().find("--max-queue"), std::string::npos);

  ctx_a.TryCancel();
  ctx_b.TryCancel();
  ta.join();
  tb.join();
  EXPECT_EQ(a.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(WaitUntil(milliseconds(1000),
                        [&] { return server->engine_loop()->stats().kv_blocks_used == 0; }));
}

TEST(ServiceLoadingTest, CallsBeforeTheModelLoadsAreUnavailable) {
  QshardServer server(TestServerOptions());
  ASSERT_TRUE(server.Start().ok());
  auto stub = MakeStub(server.address());
  StreamResult r = Generate(*stub, TextRequest("And God said", 3));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  EXPECT_EQ(stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).error_code(),
            grpc::StatusCode::UNAVAILABLE);
  ASSERT_TRUE(server.LoadModel().ok());
  EXPECT_TRUE(Generate(*stub, TextRequest("And God said", 3)).status.ok());
}

}  // namespace
}  // namespace qshard::testing
