// The offline quantizer's quality targets on the embedded base model (validation perplexity
// 25.282, calibration text kjv-calib.txt), through the executable:
//   GPTQ 4-bit g128 sym     <= +0.20   (round-to-nearest, the shared fixture, gives +0.33)
//   AWQ 4-bit g128 zero-pt  <= +0.22   (round-to-nearest asymmetric gives +0.29)
//   fp8 per-channel dynamic <= +0.03   (GPTQ on the e4m3 grid; round-to-nearest: +0.034)
//   int8 W8A8               <= +0.05   (round-to-nearest per channel)
// and each written checkpoint, loaded back by `qshard eval-ppl`, gives the perplexity the
// quantizer measured on its in-memory model right after quantizing (printed with 4
// decimals: equal within 2e-4). Round-to-nearest fp8 and int8 also equal --quantization
// fp8|int8 at load, which runs the same per-channel quantizer.
#include <cstdio>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/cli_runner.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

using ::qshard::testing::LastPerplexity;
using ::qshard::testing::RunQshard;

constexpr double kBasePpl = 25.282;

std::string BaseModel() { return ::qshard::testing::SourceDir() + "/models/kjv-llama-12m"; }
std::string ValText() { return ::qshard::testing::SharedDir() + "/data/kjv-val.txt"; }

double EvalPpl(const std::vector<std::string>& extra) {
  std::vector<std::string> args = {"eval-ppl", "--text", ValText(), "--device", "cpu"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = RunQshard(args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return LastPerplexity(r.out);
}

struct Case {
  std::string method;
  std::vector<std::string> flags;  // besides --calib (given when calibrate)
  double max_increase;
  std::string online;  // --quantization value that must give the same ppl ("" = none)
  bool calibrate = true;
};
void PrintTo(const Case& c, std::ostream* os) {
  *os << c.method;
  for (const std::string& f : c.flags) *os << " " << f;
}

class QuantizePplTest : public ::testing::TestWithParam<Case> {};

TEST_P(QuantizePplTest, MeetsTargetAndReloadGivesTheSamePerplexity) {
  const Case& c = GetParam();
  const std::string out = ::qshard::testing::MakeTempDir("qshard-qppl-" + c.method) + "/q";
  std::vector<std::string> args = {"quantize", "--model", BaseModel(), "--out", out,
                                   "--method", c.method, "--eval-ppl", ValText()};
  if (c.calibrate) {
    args.push_back("--calib");
    args.push_back(::qshard::testing::SharedDir() + "/data/kjv-calib.txt");
  }
  args.insert(args.end(), c.flags.begin(), c.flags.end());
  auto q = RunQshard(args);
  ASSERT_EQ(q.exit_code, 0) << q.err;
  const double after = LastPerplexity(q.out);
  ASSERT_GT(after, 0.0) << q.out;
  std::printf("[ %s: perplexity %.4f (+%.4f over %.3f) ]\n%s", c.method.c_str(), after,
              after - kBasePpl, kBasePpl, q.out.c_str());
  EXPECT_LE(after - kBasePpl, c.max_increase);

  const double reloaded = EvalPpl({"--model", out});
  EXPECT_NEAR(reloaded, after, 2e-4) << "the written checkpoint does not reproduce the model "
                                        "the quantizer measured";
  if (!c.online.empty()) {
    const double online = EvalPpl({"--model", BaseModel(), "--quantization", c.online});
    EXPECT_NEAR(online, after, 2e-4) << "--quantization " << c.online << " at load";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Methods, QuantizePplTest,
    ::testing::Values(Case{"gptq", {"--bits", "4", "--group-size", "128", "--sym"}, 0.20, ""},
                      // act-order: non-monotone g_idx written and read back.
                      Case{"gptq", {"--bits", "4", "--group-size", "128", "--desc-act"}, 0.20, ""},
                      Case{"awq", {"--bits", "4", "--group-size", "128"}, 0.22, ""},
                      // GPTQ on the e4m3 grid (with --calib).
                      Case{"fp8", {}, 0.03, ""},
                      // Round-to-nearest fp8 (no --calib): the same codes as --quantization
                      // fp8 at load and as the shared fp8-dynamic fixture, whose W8A8
                      // reference perplexity is 25.311 (+0.029); we measure 25.3161 for it.
                      Case{"fp8", {}, 0.05, "fp8", /*calibrate=*/false},
                      Case{"int8", {}, 0.05, "int8", /*calibrate=*/false}),
    [](const ::testing::TestParamInfo<Case>& info) {
      std::string n = info.param.method;
      for (const std::string& f : info.param.flags) {
        if (f == "--desc-act") n += "_desc_act";
      }
      return info.param.calibrate ? n : n + "_rtn";
    });

}  // namespace
}  // namespace qshard
