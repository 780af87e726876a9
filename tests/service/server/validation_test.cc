// One test per request validation rule: each bad field is answered INVALID_ARGUMENT with a
// message that names the field (and so tells the client what to fix).
#include <cmath>
#include <functional>
#include <limits>
#include <ostream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/service/server/server_test_util.h"

namespace qshard::testing {
namespace {

struct Rule {
  std::string name;
  std::function<void(v1::GenerateRequest&)> break_it;
  std::string field;  // must appear in the error message
};

// Test names show the rule, not its bytes.
void PrintTo(const Rule& rule, std::ostream* os) { *os << rule.name; }

v1::SamplingParams* S(v1::GenerateRequest& r) { return r.mutable_sampling(); }

std::vector<Rule> Rules() {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  return {
      {"NegativeTemperature", [](auto& r) { S(r)->set_temperature(-0.5f); },
       "sampling.temperature"},
      {"NanTemperature", [nan](auto& r) { S(r)->set_temperature(nan); }, "sampling.temperature"},
      {"HugeTemperature", [](auto& r) { S(r)->set_temperature(1000.0f); }, "sampling.temperature"},
      {"ZeroTopP", [](auto& r) { S(r)->set_top_p(0.0f); }, "sampling.top_p"},
      {"TopPAboveOne", [](auto& r) { S(r)->set_top_p(1.5f); }, "sampling.top_p"},
      {"NegativeTopK", [](auto& r) { S(r)->set_top_k(-1); }, "sampling.top_k"},
      {"NegativeMinP", [](auto& r) { S(r)->set_min_p(-0.1f); }, "sampling.min_p"},
      {"MinPAboveOne", [](auto& r) { S(r)->set_min_p(1.5f); }, "sampling.min_p"},
      {"ZeroRepetitionPenalty", [](auto& r) { S(r)->set_repetition_penalty(0.0f); },
       "sampling.repetition_penalty"},
      {"HugeRepetitionPenalty", [](auto& r) { S(r)->set_repetition_penalty(5.0f); },
       "sampling.repetition_penalty"},
      {"PresencePenaltyOutOfRange", [](auto& r) { S(r)->set_presence_penalty(2.5f); },
       "sampling.presence_penalty"},
      {"FrequencyPenaltyOutOfRange", [](auto& r) { S(r)->set_frequency_penalty(-2.5f); },
       "sampling.frequency_penalty"},
      {"ZeroMaxTokens", [](auto& r) { S(r)->set_max_tokens(0); }, "sampling.max_tokens"},
      {"MinTokensAboveMaxTokens",
       [](auto& r) {
         S(r)->set_max_tokens(4);
         S(r)->set_min_tokens(5);
       },
       "sampling.min_tokens"},
      {"TooManyLogprobs", [](auto& r) { S(r)->set_logprobs(21); }, "sampling.logprobs"},
      {"NegativeLogprobs", [](auto& r) { S(r)->set_logprobs(-1); }, "sampling.logprobs"},
      {"TooManyStopStrings",
       [](auto& r) {
         for (int i = 0; i < 17; ++i) S(r)->add_stop("x" + std::to_string(i));
       },
       "sampling.stop"},
      {"EmptyStopString", [](auto& r) { S(r)->add_stop(""); }, "sampling.stop[0]"},
      {"OverlongStopString", [](auto& r) { S(r)->add_stop(std::string(300, 'a')); },
       "sampling.stop[0]"},
      {"StopTokenIdOutOfVocab", [](auto& r) { S(r)->add_stop_token_ids(4096); },
       "sampling.stop_token_ids[0]"},
      {"TooManyStopTokenIds",
       [](auto& r) {
         for (int i = 0; i < 65; ++i) S(r)->add_stop_token_ids(5);
       },
       "sampling.stop_token_ids"},
      {"TokenIdOutOfVocab",
       [](auto& r) {
         r.mutable_token_ids()->add_ids(1);
         r.mutable_token_ids()->add_ids(4096);
       },
       "token_ids.ids[1]"},
      {"NegativeTokenId", [](auto& r) { r.mutable_token_ids()->add_ids(-3); }, "token_ids.ids[0]"},
      {"EmptyTokenIds", [](auto& r) { r.mutable_token_ids(); }, "token_ids"},
      {"EmptyText", [](auto& r) { r.set_text(""); }, "text"},
      {"NoInput", [](auto& r) { r.clear_input(); }, "input"},
      {"OversizedText", [](auto& r) { r.set_text(std::string((1 << 20) + 1, 'a')); }, "text"},
      {"PromptLongerThanContext",
       [](auto& r) {
         r.clear_input();
         for (int i = 0; i < 1024; ++i) r.mutable_token_ids()->add_ids(300);
       },
       "token_ids"},
      {"OverlongRequestId", [](auto& r) { r.set_request_id(std::string(300, 'r')); }, "request_id"},
  };
}

class ServiceValidationTest : public ::testing::TestWithParam<Rule> {
 protected:
  static void SetUpTestSuite() { server_ = StartTestServer(TestServerOptions()).release(); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  static QshardServer* server_;
};

QshardServer* ServiceValidationTest::server_ = nullptr;

TEST_P(ServiceValidationTest, IsInvalidArgumentNamingTheField) {
  ASSERT_NE(server_, nullptr);
  auto stub = MakeStub(server_->address());
  v1::GenerateRequest req;
  req.set_text("In the beginning");
  req.mutable_sampling()->set_max_tokens(4);
  // The baseline is valid; only the rule's change makes it bad.
  ASSERT_TRUE(Generate(*stub, req).status.ok());
  GetParam().break_it(req);
  StreamResult r = Generate(*stub, req);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r.status.error_message();
  EXPECT_NE(r.status.error_message().find(GetParam().field), std::string::npos)
      << "message: " << r.status.error_message();
  EXPECT_EQ(r.num_chunks, 0);
}

INSTANTIATE_TEST_SUITE_P(Rules, ServiceValidationTest, ::testing::ValuesIn(Rules()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qshard::testing
