// Perplexity with an fp8 KV cache: the bound is +0.05 over the fp32-cache 25.282.
#include <cstdlib>

#include "gtest/gtest.h"
#include "tests/cli_runner.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

double Ppl(const std::string& kv_dtype) {
  auto r = ::qshard::testing::RunQshard(
      {"eval-ppl", "--model", ::qshard::testing::SourceDir() + "/models/kjv-llama-12m", "--text",
       ::qshard::testing::SharedDir() + "/data/kjv-val.txt", "--device", "cpu",
       "--kv-cache-dtype", kv_dtype});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return ::qshard::testing::LastPerplexity(r.out);
}

TEST(Fp8KvPplTest, E4M3WithinFiveHundredthsOfBase) {
  const double base = 25.282;
  const double p = Ppl("fp8_e4m3");
  EXPECT_GE(p, base - 0.05);
  EXPECT_LE(p, base + 0.05);
}

}  // namespace
}  // namespace qshard
