// Full-size perplexity run of the embedded base model on the shared validation text,
// through the CLI, against the fixture's reference (25.282 +/- 0.005).
#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "tests/cli_runner.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

TEST(EvalPplTest, BaseModelMatchesReferencePerplexity) {
  auto ref = ::qshard::testing::LoadReference(::qshard::testing::SharedModel("kjv-llama-12m"));
  ASSERT_FALSE(ref.is_null());
  const double want = ref["val_ppl_bf16_fp32math"].get<double>();  // 25.28195...
  auto r = ::qshard::testing::RunQshard(
      {"eval-ppl", "--model", ::qshard::testing::SourceDir() + "/models/kjv-llama-12m", "--text",
       ::qshard::testing::SharedDir() + "/data/kjv-val.txt", "--device", "cpu"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // The output ends with the line the issue asks for.
  ASSERT_GE(r.out.size(), 1u);
  const std::string last = r.out.substr(r.out.rfind("perplexity: "));
  EXPECT_EQ(last.back(), '\n');
  EXPECT_EQ(last.size(), std::string("perplexity: 25.2820\n").size()) << last;
  EXPECT_NEAR(::qshard::testing::LastPerplexity(r.out), want, 0.005) << r.out;
}

}  // namespace
}  // namespace qshard
