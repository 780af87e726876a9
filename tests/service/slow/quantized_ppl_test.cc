// Full validation perplexity of the quantized fixtures through the CLI, against the val_ppl
// of their reference.json (+/- 0.01). The FP8 model runs as its checkpoint says (W8A8 with
// dynamic per-token activations), so it is held to the W8A8 reference.
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "tests/cli_runner.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

struct PplCase {
  std::string model;
  std::string reference;  // key in reference.json holding val_ppl
};
// Short test names in ctest (otherwise gtest prints the struct's bytes).
void PrintTo(const PplCase& c, std::ostream* os) { *os << c.model; }

class QuantizedPplTest : public ::testing::TestWithParam<PplCase> {};

TEST_P(QuantizedPplTest, MatchesReferencePerplexity) {
  const std::string dir = ::qshard::testing::SharedModel(GetParam().model);
  auto ref = ::qshard::testing::LoadReference(dir);
  ASSERT_FALSE(ref.is_null());
  const double want = ref[GetParam().reference]["val_ppl"].get<double>();
  auto r = ::qshard::testing::RunQshard({"eval-ppl", "--model", dir, "--text",
                                         ::qshard::testing::SharedDir() + "/data/kjv-val.txt",
                                         "--device", "cpu"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const double got = ::qshard::testing::LastPerplexity(r.out);
  std::printf("[ %s: perplexity %.4f, reference %.4f ]\n", GetParam().model.c_str(), got, want);
  EXPECT_NEAR(got, want, 0.01) << r.out;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, QuantizedPplTest,
                         ::testing::Values(PplCase{"kjv-llama-12m-gptq-4bit", "weight_only"},
                                           PplCase{"kjv-llama-12m-awq-4bit", "weight_only"},
                                           PplCase{"kjv-llama-12m-fp8-dynamic",
                                                   "w8a8_dynamic_per_token"}),
                         [](const ::testing::TestParamInfo<PplCase>& i) {
                           std::string n = i.param.model;
                           return ::qshard::testing::TestName(n);
                         });

}  // namespace
}  // namespace qshard
