// Decode steps replayed from CUDA graphs against the same steps run eagerly, on two
// backends holding the same random model: the logits must be bitwise equal (every kernel
// is deterministic: split-K partials are summed in split order, never by atomics; a stale
// pointer, a skipped upload or a wrong context bound moves them by O(1)). The decode
// steps cross a context bucket (256), so a second graph is captured on the way; halfway,
// a 300-token prefill of a third sequence grows the kernels' shared scratch (activation
// codes, split-K partials), which must retire the graphs that point at the old buffers.
// The graph counters must show captures and replays. The same steps also compare the
// opt-in fused kernels with the separate launches they replace. Skips without a GPU.
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kv/memory_planner.h"
#include "runtime/backend/backend.h"
#include "runtime/backend/cuda/attention.h"
#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/backend/cuda/fp8_linear.h"
#include "runtime/model/llama_model.h"
#include "tests/runtime/model_cuda/small_model.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

// Two backends holding the same random model run the same steps: a prefill of two
// sequences, 14 decode steps of both, and halfway a 300-token prefill of a third one.
// Before every Forward of model i, before_forward(i) runs (it may flip process-wide
// switches). The logits must be bitwise equal after every step.
struct TwinRun {
  std::unique_ptr<Backend> backends[2];
  double worst = 0;  // normwise logits difference, over the decode steps
  int decode_steps = 0;
};

void RunTwins(const std::string& format, const bool graphs[2],
              const std::function<void(int)>& before_forward, TwinRun* run) {
  for (int i = 0; i < 2; ++i) {
    auto b = CreateBackend("cuda");
    if (!b.ok()) GTEST_SKIP() << "no usable GPU: " << b.status().message();
    run->backends[i] = std::move(*b);
    ASSERT_TRUE(SetCudaGraphs(*run->backends[i], graphs[i]).ok());
  }
  const ModelConfig shape = testing::SmallGpuTestShape(1024);
  std::unique_ptr<LlamaModel> models[2];
  for (int i = 0; i < 2; ++i) {
    auto m = LlamaModel::CreateDummy(shape, format, run->backends[i].get(), 7);
    ASSERT_TRUE(m.ok()) << m.status();
    models[i] = std::move(*m);
    KvCacheSpec spec = KvCacheSpecFor(shape, DType::kBF16, 16);
    spec.num_blocks = 64;
    ASSERT_TRUE(models[i]->AllocateKvCache(spec).ok());
  }
  // Two sequences: A starts at 250 tokens (crosses the 256 bucket while decoding), B at 30.
  std::vector<int32_t> ta(20), tb(20), tc(20);
  std::iota(ta.begin(), ta.end(), 0);
  std::iota(tb.begin(), tb.end(), 20);
  std::iota(tc.begin(), tc.end(), 40);
  auto ids = [](int n, int salt) {
    std::vector<int32_t> v(n);
    for (int i = 0; i < n; ++i) v[i] = 3 + (i * 7919 + salt * 131) % 990;
    return v;
  };
  const std::vector<int32_t> a = ids(250, 1), b = ids(30, 2), c = ids(300, 3);
  std::vector<float> logits[2];
  for (int i = 0; i < 2; ++i) {
    std::vector<SequenceChunk> prefill = {{a, 0, ta, LogitsMode::kLast},
                                          {b, 0, tb, LogitsMode::kLast}};
    before_forward(i);
    ASSERT_TRUE(models[i]->Forward(prefill, &logits[i]).ok());
  }
  ASSERT_EQ(logits[0], logits[1]) << format << ": the first prefill";
  constexpr int kSteps = 14;
  run->decode_steps = kSteps;
  for (int step = 0; step < kSteps; ++step) {
    const std::vector<int32_t> na = {ids(1, 100 + step)[0]}, nb = {ids(1, 200 + step)[0]};
    if (step == kSteps / 2) {
      for (int i = 0; i < 2; ++i) {
        std::vector<SequenceChunk> prefill = {{c, 0, tc, LogitsMode::kLast}};
        before_forward(i);
        ASSERT_TRUE(models[i]->Forward(prefill, &logits[i]).ok());
      }
      ASSERT_EQ(logits[0], logits[1]) << format << ": the prefill between the decode steps";
    }
    for (int i = 0; i < 2; ++i) {
      std::vector<SequenceChunk> decode = {{na, 250 + step, ta, LogitsMode::kLast},
                                           {nb, 30 + step, tb, LogitsMode::kLast}};
      before_forward(i);
      const absl::Status st = models[i]->Forward(decode, &logits[i]);
      ASSERT_TRUE(st.ok()) << "step " << step << " (model " << i << "): " << st;
    }
    ASSERT_EQ(logits[0].size(), logits[1].size());
    double d = 0, w = 0;
    for (size_t j = 0; j < logits[0].size(); ++j) {
      ASSERT_TRUE(std::isfinite(logits[1][j])) << "step " << step << " logit " << j;
      d += (double(logits[1][j]) - logits[0][j]) * (double(logits[1][j]) - logits[0][j]);
      w += double(logits[0][j]) * logits[0][j];
    }
    const double err = std::sqrt(d / w);
    run->worst = std::max(run->worst, err);
    EXPECT_EQ(err, 0.0) << format << " decode step " << step;
  }
}

class CudaGraphTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaGraphTest, ReplayedDecodeStepsMatchEager) {
  TwinRun run;
  const bool graphs[2] = {false, true};
  ASSERT_NO_FATAL_FAILURE(RunTwins(
      GetParam(), graphs, [](int) {}, &run));
  if (run.backends[1] == nullptr) return;  // skipped
  const auto [captures, replays] = CudaGraphStats(*run.backends[1]);
  std::printf(
      "[ %s: %lld graphs captured, %lld replays over %d decode steps, worst normwise "
      "difference %.3g ]\n",
      GetParam().c_str(), static_cast<long long>(captures), static_cast<long long>(replays),
      run.decode_steps, run.worst);
  // One shape per context bucket (2 buckets), each captured on its second step, and again
  // after the prefill when it grew the shared scratch.
  EXPECT_GE(captures, 2);
  EXPECT_LE(captures, 3);
  EXPECT_GE(replays, run.decode_steps - 6);
  EXPECT_EQ(CudaGraphStats(*run.backends[0]).first, 0);
}

// The fused kernels that are off by default (cuda::SetFusedRopeKvWrite: q|k|v split + RoPE
// + KV write in one launch; cuda::SetFusedSplitCombine: attention's split combine inside
// the attention kernel; cuda::SetFusedActQuant: fp8 activations quantized by the norm /
// SiLU kernels that produce them) against the separate launches: model 0 runs eagerly with
// them off, model 1 with them on and with graphs (so their capture is covered too).
TEST_P(CudaGraphTest, FusedDecodeKernelsMatchSeparate) {
  const bool saved_rope = cuda::FusedRopeKvWriteEnabled();
  const bool saved_combine = cuda::FusedSplitCombineEnabled();
  const bool saved_quant = cuda::FusedActQuantEnabled();
  const auto fused = [](int i) {
    cuda::SetFusedRopeKvWrite(i == 1);
    cuda::SetFusedSplitCombine(i == 1);
    cuda::SetFusedActQuant(i == 1);
  };
  TwinRun run;
  const bool graphs[2] = {false, true};
  RunTwins(GetParam(), graphs, fused, &run);
  cuda::SetFusedRopeKvWrite(saved_rope);
  cuda::SetFusedSplitCombine(saved_combine);
  cuda::SetFusedActQuant(saved_quant);
  if (run.backends[1] == nullptr) return;  // skipped
  std::printf("[ %s: fused vs separate, worst normwise difference %.3g ]\n", GetParam().c_str(),
              run.worst);
}

INSTANTIATE_TEST_SUITE_P(Formats, CudaGraphTest,
                         ::testing::Values("bf16", "fp8", "gptq-4bit", "awq-4bit"),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = i.param;
                           return ::qshard::testing::TestName(n);
                         });

}  // namespace
}  // namespace qshard
