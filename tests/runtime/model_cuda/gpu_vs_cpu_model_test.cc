// The whole forward on the GPU against the CPU backend, for every weight format the dummy
// model builds (bf16, fp16, fp8 W8A8, int8 W8A8, gptq-4bit, awq-4bit) on a small random
// model, through steps a server runs: two prefills of different lengths in one step, then
// a mixed step (two decode tokens next to a third sequence's prefill chunk that starts
// after its first 8 cached tokens), then a decode step of all three, with shuffled
// (non-contiguous) block tables. Both backends get the same weights (same seed).
//
// Tolerances (on the logits, normwise ||gpu - cpu|| / ||cpu|| and per row):
//   - 16-bit weights and weight-only 4-bit: the GPU rounds activations to bf16 between ops
//     (relative 2^-9 each) where the CPU keeps fp32; over 2 layers that is ~1e-2 of the
//     logits' norm at most: bound 3e-2.
//   - W8A8 (fp8 / int8 activations): a bf16-rounded activation can land on the other side
//     of an 8-bit rounding boundary, moving that input by a whole code step (6% in e4m3,
//     0.8% of the row max in int8); a few such flips per row: bound 8e-2.
//   NaN never passes. A wrong index, a skipped block or a wrong group scale moves the
//   logits by O(1) of their norm, far outside both bounds.
// Skips without a GPU.
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kv/memory_planner.h"
#include "runtime/backend/backend.h"
#include "runtime/model/llama_model.h"
#include "tests/runtime/model_cuda/small_model.h"
#include "tests/test_support.h"

namespace qshard {
namespace {

struct Stepper {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<LlamaModel> model;
};

double NormwiseError(const std::vector<float>& got, const std::vector<float>& want) {
  double d = 0, w = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    d += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    w += double(want[i]) * want[i];
  }
  return std::sqrt(d / w);
}

class GpuVsCpuModelTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuVsCpuModelTest, ForwardStepsMatchCpu) {
  auto gpu_backend = CreateBackend("cuda");
  if (!gpu_backend.ok()) GTEST_SKIP() << "no usable GPU: " << gpu_backend.status().message();
  const std::string format = GetParam();
  const ModelConfig shape = testing::SmallGpuTestShape(512);
  Stepper cpu, gpu;
  cpu.backend = std::move(CreateBackend("cpu")).value();
  gpu.backend = std::move(*gpu_backend);
  for (Stepper* s : {&cpu, &gpu}) {
    auto m = LlamaModel::CreateDummy(shape, format, s->backend.get(), 99);
    ASSERT_TRUE(m.ok()) << m.status();
    s->model = std::move(*m);
    KvCacheSpec spec = KvCacheSpecFor(shape, DType::kF32, 16);
    spec.num_blocks = 40;
    ASSERT_TRUE(s->model->AllocateKvCache(spec).ok());
  }
  std::printf("[ %s: GPU kernel %s, CPU kernel %s ]\n", format.c_str(),
              gpu.model->weight_summary().linear_kernel.c_str(),
              cpu.model->weight_summary().linear_kernel.c_str());

  auto ids = [](int n, int salt) {
    std::vector<int32_t> v(n);
    for (int i = 0; i < n; ++i) v[i] = 3 + (i * 7919 + salt * 131) % 990;
    return v;
  };
  // Shuffled block tables (3 sequences x 8 blocks of 16 positions).
  const std::vector<int32_t> ta = {17, 3, 29, 8, 0, 33, 12, 21};
  const std::vector<int32_t> tb = {5, 38, 1, 26, 14, 9, 31, 19};
  const std::vector<int32_t> tc = {30, 11, 24, 2, 36, 7, 16, 27};
  const std::vector<int32_t> a = ids(37, 1), b = ids(5, 2), c_all = ids(28, 3);
  const std::vector<int32_t> c_head(c_all.begin(), c_all.begin() + 8);
  const std::vector<int32_t> c_tail(c_all.begin() + 8, c_all.end());
  const std::vector<int32_t> a1 = {42}, b1 = {77}, a2 = {5}, b2 = {600}, c2 = {123};

  const double tol = (format == "fp8" || format == "int8") ? 8e-2 : 3e-2;
  std::vector<std::vector<SequenceChunk>> steps = {
      {{a, 0, ta, LogitsMode::kAll}, {b, 0, tb, LogitsMode::kLast}, {c_head, 0, tc, LogitsMode::kNone}},
      {{a1, 37, ta, LogitsMode::kLast}, {c_tail, 8, tc, LogitsMode::kAll}, {b1, 5, tb, LogitsMode::kLast}},
      {{a2, 38, ta, LogitsMode::kLast}, {b2, 6, tb, LogitsMode::kLast}, {c2, 28, tc, LogitsMode::kLast}},
  };
  for (size_t i = 0; i < steps.size(); ++i) {
    std::vector<float> want, got;
    ASSERT_TRUE(cpu.model->Forward(steps[i], &want).ok());
    const absl::Status st = gpu.model->Forward(steps[i], &got);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_EQ(got.size(), want.size());
    const double err = NormwiseError(got, want);
    // Per row as well: one bad sequence must not hide behind the others.
    double worst_row = 0;
    const int64_t V = shape.vocab_size;
    for (size_t r = 0; r * V < want.size(); ++r) {
      std::vector<float> g(got.begin() + r * V, got.begin() + (r + 1) * V);
      std::vector<float> w(want.begin() + r * V, want.begin() + (r + 1) * V);
      worst_row = std::max(worst_row, NormwiseError(g, w));
    }
    std::printf("[ %s step %zu: %zu logit rows, normwise %.3g, worst row %.3g ]\n",
                format.c_str(), i, want.size() / V, err, worst_row);
    EXPECT_LE(err, tol) << format << " step " << i;
    EXPECT_LE(worst_row, 2 * tol) << format << " step " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, GpuVsCpuModelTest,
                         ::testing::ValuesIn(LlamaModel::DummyFormats()),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = i.param;
                           return ::qshard::testing::TestName(n);
                         });

}  // namespace
}  // namespace qshard
