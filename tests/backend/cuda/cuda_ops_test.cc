// GPU ops against the CPU ops (runtime/backend/cpu/ops.h) on the same inputs.
//
// Without a CUDA device (CI, developer machines) every device test skips with a message;
// scripts/device-check.sh builds and runs this binary on a GPU machine.
//
// Method: fresh random inputs per case (fixed seeds, never zeros), every GPU output
// poisoned with 0xFF bytes (NaN in fp32 and bf16) before the run, so an element the
// kernel forgot to write fails as non-finite. Inputs that the GPU reads as bf16 are given
// to the CPU as the same bf16-rounded values, so only the arithmetic differs.
//
// Tolerances (why each bound holds, and stays tight enough to catch a wrong index):
//   - Embedding is a copy: exact equality.
//   - The residual add is one fp32 addition on both sides (then one round-to-nearest-even
//     to bf16 where the residual is bf16): exact equality.
//   - RMSNorm with fp32 output: the sum of squares is accumulated in a different order
//     (relative error far under 1e-5 for d <= 4096) and rsqrtf is within 2 ulp, so
//     |gpu - cpu| <= 1e-4 |cpu| elementwise and 2e-5 normwise leave a wide margin.
//   - Linear with fp32 output: both accumulate exact bf16 x bf16 products in fp32, in
//     different orders; the expected difference is ~1e-6 of the row's RMS. The bound is
//     1e-3 of the row's RMS per element and 1e-4 normwise: dropping a single k term of a
//     k = 4096 row already moves an element by ~1e-2 of the row's RMS.
//   - Any bf16 output adds one rounding of the fp32 result: at most half an ulp, 2^-8 of
//     |value| (3.9e-3), so elementwise 5e-3 |cpu| on top of the fp32 bound, and 4e-3
//     normwise (the RMS of that rounding error is ~1.5e-3).
//   - NaN or inf anywhere fails.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/backend/cuda/cublaslt_linear.h"
#include "runtime/backend/cuda/cublaslt_loader.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/backend/cuda/embedding_rmsnorm.h"
#include "runtime/backend/cuda/fp8_linear.h"
#include "runtime/backend/cuda/int_weight_gemm.h"
#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "runtime/base/status_macros.h"
#include "runtime/base/tensor.h"
#include "tests/backend/cuda/cuda_test_util.h"

namespace qshard::cuda {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kEps = 1e-5f;

using ::qshard::cuda::testing::Name;

// ---------------------------------------------------------------------------
// Host-side data helpers
// ---------------------------------------------------------------------------

// Uniform values in [lo, hi), already rounded to bf16 (returned as fp32).
std::vector<float> RandomBf16Values(size_t count, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(count);
  for (float& x : v) x = Bf16ToF32(F32ToBf16(dist(rng)));
  return v;
}

// Activations [rows, cols]: uniform in [-1, 1) times a per-row scale spread over
// e^-3 .. e^3, so RMSNorm sees rows of very different magnitude. Rounded to bf16 when
// `dtype` is bf16, so the CPU gets exactly what the GPU reads.
std::vector<float> RandomActivations(int64_t rows, int64_t cols, DType dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-3.0f, 3.0f);
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = std::exp(log_scale(rng));
    for (int64_t c = 0; c < cols; ++c) {
      float x = unit(rng) * scale;
      if (dtype == DType::kBF16) x = Bf16ToF32(F32ToBf16(x));
      v[r * cols + c] = x;
    }
  }
  return v;
}

std::vector<uint16_t> ToBf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> bits(v.size());
  for (size_t i = 0; i < v.size(); ++i) bits[i] = F32ToBf16(v[i]);
  return bits;
}

// A host bf16 Tensor (the CPU ops' weight format) holding `values`.
Tensor HostBf16Tensor(const std::vector<float>& values, Shape shape) {
  Tensor t = Tensor::Empty(DType::kBF16, std::move(shape));
  const std::vector<uint16_t> bits = ToBf16Bits(values);
  std::memcpy(t.raw(), bits.data(), bits.size() * sizeof(uint16_t));
  return t;
}

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// Uploads fp32 values as `dtype` (f32 or bf16).
absl::StatusOr<DeviceBuffer> Upload(const std::vector<float>& values, DType dtype,
                                    cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf,
                          DeviceBuffer::Allocate(values.size() * DTypeSize(dtype)));
  if (dtype == DType::kF32) {
    QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(values.data(), values.size() * sizeof(float), stream));
  } else {
    const std::vector<uint16_t> bits = ToBf16Bits(values);
    QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(bits.data(), bits.size() * sizeof(uint16_t), stream));
  }
  return buf;
}

// A buffer of `count` elements filled with NaN (0xFF bytes), so unwritten outputs show.
absl::StatusOr<DeviceBuffer> Poisoned(size_t count, DType dtype, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(count * DTypeSize(dtype)));
  QSHARD_RETURN_IF_ERROR(buf.Fill(0xFF, stream));
  return buf;
}

// Reads `count` elements of `dtype` as fp32. CopyToHost synchronizes the stream, so a
// fault inside an earlier kernel is reported here.
absl::StatusOr<std::vector<float>> Download(const DeviceBuffer& buf, DType dtype, size_t count,
                                            cudaStream_t stream) {
  std::vector<float> out(count);
  if (dtype == DType::kF32) {
    QSHARD_RETURN_IF_ERROR(buf.CopyToHost(out.data(), count * sizeof(float), stream));
  } else {
    std::vector<uint16_t> bits(count);
    QSHARD_RETURN_IF_ERROR(buf.CopyToHost(bits.data(), count * sizeof(uint16_t), stream));
    for (size_t i = 0; i < count; ++i) out[i] = Bf16ToF32(bits[i]);
  }
  return out;
}

// ---------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------

struct Tolerance {
  double rel = 0;       // times |want|, per element
  double row_rms = 0;   // times the RMS of want's row, per element
  double normwise = 0;  // bound on ||got - want|| / ||want|| over the whole output
};

constexpr Tolerance kExact{0, 0, 0};

// Fails on any non-finite `got`, any element outside rel*|want| + row_rms*rms(row), or a
// normwise error above the bound. Written so that NaN can never pass (!(err <= bound)).
void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, int64_t rows,
                 int64_t cols, const Tolerance& tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  ASSERT_EQ(static_cast<int64_t>(want.size()), rows * cols) << what;
  int64_t non_finite = 0;
  int64_t outside = 0;
  double worst_ratio = 0;  // largest err / bound seen (for the failure message)
  double diff_sq = 0;
  double want_sq = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double row_sq = 0;
    for (int64_t c = 0; c < cols; ++c) row_sq += double(want[r * cols + c]) * want[r * cols + c];
    const double rms = std::sqrt(row_sq / static_cast<double>(cols));
    for (int64_t c = 0; c < cols; ++c) {
      const double g = got[r * cols + c];
      const double w = want[r * cols + c];
      if (!std::isfinite(g) || !std::isfinite(w)) {
        if (non_finite++ < 3) {
          ADD_FAILURE() << what << ": non-finite at [" << r << ", " << c << "]: got " << g
                        << ", want " << w;
        }
        continue;
      }
      const double err = std::fabs(g - w);
      const double bound = tol.rel * std::fabs(w) + tol.row_rms * rms;
      diff_sq += err * err;
      want_sq += w * w;
      if (!(err <= bound)) {
        if (outside++ < 5) {
          ADD_FAILURE() << what << ": [" << r << ", " << c << "] got " << g << ", want " << w
                        << ", |diff| " << err << " > bound " << bound;
        }
        if (bound > 0) worst_ratio = std::max(worst_ratio, err / bound);
      }
    }
  }
  EXPECT_EQ(non_finite, 0) << what << ": non-finite outputs (unwritten poison or overflow)";
  EXPECT_EQ(outside, 0) << what << ": elements outside the bound (worst err/bound " << worst_ratio
                        << ")";
  const double normwise = want_sq > 0 ? std::sqrt(diff_sq / want_sq) : std::sqrt(diff_sq);
  EXPECT_LE(normwise, tol.normwise) << what << ": normwise relative error";
}

// Bounds for the RMSNorm family and the linear, by output dtype (see the file comment).
Tolerance NormTolerance(DType out) {
  return out == DType::kF32 ? Tolerance{1e-4, 1e-6, 2e-5} : Tolerance{5e-3 + 1e-4, 1e-6, 4e-3};
}
Tolerance LinearTolerance(DType out) {
  return out == DType::kF32 ? Tolerance{0, 1e-3, 1e-4} : Tolerance{5e-3, 1e-3, 4e-3};
}

// ---------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------

class CudaOpsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) {
      GTEST_SKIP() << "no CUDA device or driver on this machine: GPU op tests skipped "
                      "(scripts/device-check.sh runs them on a GPU machine)";
    }
    QSHARD_ASSERT_OK_AND_ASSIGN(info_, QueryDevice(0));
    QSHARD_ASSERT_OK_AND_ASSIGN(stream_, CudaStream::Create());
  }

  cudaStream_t stream() const { return stream_.get(); }

  DeviceInfo info_;
  CudaStream stream_;
};

TEST_F(CudaOpsTest, DeviceQuery) {
  EXPECT_FALSE(info_.name.empty());
  EXPECT_GE(info_.cc_major, 7);
  EXPECT_GT(info_.multiprocessors, 0);
  EXPECT_GT(info_.total_memory_bytes, 0);
  EXPECT_GT(info_.free_memory_bytes, 0);
  RecordProperty("device", info_.ToString());
  std::printf("device: %s\n", info_.ToString().c_str());
}

TEST_F(CudaOpsTest, EmbeddingMatchesCpu) {
  constexpr int64_t kVocab = 1000;
  uint32_t seed = 100;
  for (int64_t hidden : {384, 390, 4096}) {
    const std::vector<float> table = RandomBf16Values(kVocab * hidden, -1.0f, 1.0f, ++seed);
    const Tensor host_table = HostBf16Tensor(table, {kVocab, hidden});
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(table, DType::kBF16, stream()));
    for (int64_t n : {1, 7, 64}) {
      std::mt19937 rng(++seed);
      std::uniform_int_distribution<int32_t> pick(0, kVocab - 1);
      std::vector<int32_t> ids(n);
      for (int32_t& id : ids) id = pick(rng);
      ids.front() = kVocab - 1;  // both ends of the table
      ids.back() = 0;
      QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ids, DeviceBuffer::Allocate(n * sizeof(int32_t)));
      QSHARD_ASSERT_OK(d_ids.CopyFromHost(ids.data(), n * sizeof(int32_t), stream()));

      std::vector<float> want(n * hidden, kNaN);
      cpu::Embedding(host_table, ids.data(), n, want.data());
      for (DType out : {DType::kF32, DType::kBF16}) {
        const std::string what =
            absl::StrCat("Embedding n=", n, " hidden=", hidden, " out=", Name(out));
        SCOPED_TRACE(what);
        QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(n * hidden, out, stream()));
        QSHARD_ASSERT_OK(LaunchEmbedding(d_table.get(), DType::kBF16, kVocab, hidden, d_ids.as<int32_t>(), n,
                                         d_out.get(), out, stream()));
        QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got,
                                    Download(d_out, out, n * hidden, stream()));
        ExpectClose(got, want, n, hidden, kExact, what);
      }
    }
  }
}

TEST_F(CudaOpsTest, EmbeddingOutOfRangeIdGivesNaNRow) {
  constexpr int64_t kVocab = 50;
  constexpr int64_t kHidden = 64;
  const std::vector<float> table = RandomBf16Values(kVocab * kHidden, -1.0f, 1.0f, 7);
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_table, Upload(table, DType::kBF16, stream()));
  const std::vector<int32_t> ids = {3, -1, kVocab, 0};
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_ids, DeviceBuffer::Allocate(ids.size() * 4));
  QSHARD_ASSERT_OK(d_ids.CopyFromHost(ids.data(), ids.size() * 4, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, DeviceBuffer::Allocate(ids.size() * kHidden * 4));
  QSHARD_ASSERT_OK(d_out.Fill(0, stream()));
  QSHARD_ASSERT_OK(LaunchEmbedding(d_table.get(), DType::kBF16, kVocab, kHidden, d_ids.as<int32_t>(),
                                   static_cast<int64_t>(ids.size()), d_out.get(), DType::kF32,
                                   stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got,
                              Download(d_out, DType::kF32, ids.size() * kHidden, stream()));
  for (int64_t c = 0; c < kHidden; ++c) {
    EXPECT_EQ(got[0 * kHidden + c], table[3 * kHidden + c]);
    EXPECT_TRUE(std::isnan(got[1 * kHidden + c])) << "id -1, column " << c;
    EXPECT_TRUE(std::isnan(got[2 * kHidden + c])) << "id == vocab, column " << c;
    EXPECT_EQ(got[3 * kHidden + c], table[c]);
  }
}

TEST_F(CudaOpsTest, RmsNormMatchesCpu) {
  uint32_t seed = 200;
  for (int64_t d : {384, 390, 4096}) {
    const std::vector<float> weight = RandomBf16Values(d, 0.5f, 1.5f, ++seed);
    const Tensor host_weight = HostBf16Tensor(weight, {d});
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_weight, Upload(weight, DType::kF32, stream()));
    for (int64_t n : {1, 7, 64}) {
      for (DType in : {DType::kF32, DType::kBF16}) {
        const std::vector<float> x = RandomActivations(n, d, in, ++seed);
        QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x, in, stream()));
        std::vector<float> want(n * d, kNaN);
        cpu::RmsNorm(x.data(), host_weight, kEps, n, d, want.data());
        for (DType out : {DType::kF32, DType::kBF16}) {
          const std::string what =
              absl::StrCat("RmsNorm n=", n, " d=", d, " in=", Name(in), " out=", Name(out));
          SCOPED_TRACE(what);
          QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(n * d, out, stream()));
          QSHARD_ASSERT_OK(
              LaunchRmsNorm(d_x.get(), in, d_weight.get(), kEps, n, d, d_out.get(), out, stream()));
          QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got,
                                      Download(d_out, out, n * d, stream()));
          ExpectClose(got, want, n, d, NormTolerance(out), what);
        }
      }
    }
  }
}

TEST_F(CudaOpsTest, RmsNormInPlace) {
  constexpr int64_t kN = 5;
  constexpr int64_t kD = 4096;
  const std::vector<float> weight = RandomBf16Values(kD, 0.5f, 1.5f, 301);
  const std::vector<float> x = RandomActivations(kN, kD, DType::kF32, 302);
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_weight, Upload(weight, DType::kF32, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x, DType::kF32, stream()));
  std::vector<float> want(kN * kD, kNaN);
  cpu::RmsNorm(x.data(), HostBf16Tensor(weight, {kD}), kEps, kN, kD, want.data());
  QSHARD_ASSERT_OK(LaunchRmsNorm(d_x.get(), DType::kF32, d_weight.get(), kEps, kN, kD, d_x.get(),
                                 DType::kF32, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got,
                              Download(d_x, DType::kF32, kN * kD, stream()));
  ExpectClose(got, want, kN, kD, NormTolerance(DType::kF32), "RmsNorm in place");
}

TEST_F(CudaOpsTest, AddRmsNormMatchesCpu) {
  uint32_t seed = 400;
  for (int64_t d : {390, 4096}) {
    const std::vector<float> weight = RandomBf16Values(d, 0.5f, 1.5f, ++seed);
    const Tensor host_weight = HostBf16Tensor(weight, {d});
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_weight, Upload(weight, DType::kF32, stream()));
    for (int64_t n : {1, 7, 64}) {
      for (DType res_dtype : {DType::kF32, DType::kBF16}) {
        for (DType in : {DType::kF32, DType::kBF16}) {
          const std::vector<float> residual = RandomActivations(n, d, res_dtype, ++seed);
          const std::vector<float> x = RandomActivations(n, d, in, ++seed);
          // CPU reference: with an fp32 residual, the fused CPU op itself; with a bf16
          // residual, the sum rounded to bf16 (what the GPU stores) and then RmsNorm.
          std::vector<float> want_residual = residual;
          std::vector<float> want(n * d, kNaN);
          if (res_dtype == DType::kF32) {
            cpu::AddRmsNorm(want_residual.data(), x.data(), host_weight, kEps, n, d, want.data());
          } else {
            for (size_t i = 0; i < want_residual.size(); ++i) {
              want_residual[i] = Bf16ToF32(F32ToBf16(residual[i] + x[i]));
            }
            cpu::RmsNorm(want_residual.data(), host_weight, kEps, n, d, want.data());
          }
          for (DType out : {DType::kF32, DType::kBF16}) {
            const std::string what =
                absl::StrCat("AddRmsNorm n=", n, " d=", d, " residual=", Name(res_dtype),
                             " in=", Name(in), " out=", Name(out));
            SCOPED_TRACE(what);
            QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_res, Upload(residual, res_dtype, stream()));
            QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x, in, stream()));
            QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_out, Poisoned(n * d, out, stream()));
            QSHARD_ASSERT_OK(LaunchAddRmsNorm(d_res.get(), res_dtype, d_x.get(), in, d_weight.get(),
                                              kEps, n, d, d_out.get(), out, stream()));
            QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got_residual,
                                        Download(d_res, res_dtype, n * d, stream()));
            ExpectClose(got_residual, want_residual, n, d, kExact, what + " (residual)");
            QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got,
                                        Download(d_out, out, n * d, stream()));
            ExpectClose(got, want, n, d, NormTolerance(out), what);
          }
        }
      }
    }
  }
}

TEST_F(CudaOpsTest, LinearMatchesCpu) {
  QSHARD_ASSERT_OK_AND_ASSIGN(std::unique_ptr<CublasLtLinear> blas, CublasLtLinear::Create());
  struct Shape2 {
    int64_t n;
    int64_t k;
  };
  // (n, k): a small model's projection, a 7B-sized square one, and an odd one (n not a
  // multiple of any tile, k not a multiple of 64).
  const Shape2 shapes[] = {{1024, 384}, {4096, 4096}, {1000, 392}};
  const int64_t ms[] = {1, 8, 33, 256};
  uint32_t seed = 500;
  for (const Shape2& s : shapes) {
    // Weights ~ U(-1, 1) / sqrt(k), like an initialized layer, so outputs are O(1).
    const float w_scale = 1.0f / std::sqrt(static_cast<float>(s.k));
    const std::vector<float> w = RandomBf16Values(s.n * s.k, -w_scale, w_scale, ++seed);
    const Tensor host_w = HostBf16Tensor(w, {s.n, s.k});
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(w, DType::kBF16, stream()));
    for (int64_t m : ms) {
      const std::vector<float> x = RandomBf16Values(m * s.k, -1.0f, 1.0f, ++seed);
      QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x, DType::kBF16, stream()));
      std::vector<float> want(m * s.n, kNaN);
      cpu::Linear(x.data(), m, host_w, nullptr, want.data());
      for (DType out : {DType::kF32, DType::kBF16}) {
        const std::string what =
            absl::StrCat("Linear m=", m, " n=", s.n, " k=", s.k, " out=", Name(out));
        SCOPED_TRACE(what);
        QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_y, Poisoned(m * s.n, out, stream()));
        QSHARD_ASSERT_OK(blas->Linear(d_x.get(), d_w.get(), d_y.get(), out, m, s.n, s.k, stream()));
        QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_y, out, m * s.n, stream()));
        ExpectClose(got, want, m, s.n, LinearTolerance(out), what);
      }
    }
  }
  // One algorithm choice per (m, n, k, output dtype): all buffers are cudaMalloc-aligned.
  const size_t plans = blas->cached_plans();
  EXPECT_EQ(plans, std::size(shapes) * std::size(ms) * 2);
  // A second run of a known problem reuses its plan.
  const std::vector<float> x = RandomBf16Values(8 * 384, -1.0f, 1.0f, 999);
  const std::vector<float> w = RandomBf16Values(1024 * 384, -0.05f, 0.05f, 998);
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x, DType::kBF16, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(w, DType::kBF16, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_y, Poisoned(8 * 1024, DType::kF32, stream()));
  QSHARD_ASSERT_OK(
      blas->Linear(d_x.get(), d_w.get(), d_y.get(), DType::kF32, 8, 1024, 384, stream()));
  QSHARD_ASSERT_OK(stream_.Synchronize());
  EXPECT_EQ(blas->cached_plans(), plans);
}

// cuBLASLt autotuning (SetBlasAutotune): the timed choice is still a correct algorithm for
// the problem (same tolerance as the heuristic's), and a second CublasLtLinear of the process
// takes the same choice (bitwise equal outputs, no re-timing needed), which is what keeps
// two backends of one process (graph and eager in the graph test) in agreement.
TEST_F(CudaOpsTest, LinearAutotunedMatchesCpuAndIsSharedByTheProcess) {
  const bool saved = BlasAutotuneEnabled();
  SetBlasAutotune(true);
  QSHARD_ASSERT_OK_AND_ASSIGN(std::unique_ptr<CublasLtLinear> a, CublasLtLinear::Create());
  QSHARD_ASSERT_OK_AND_ASSIGN(std::unique_ptr<CublasLtLinear> b, CublasLtLinear::Create());
  const int64_t n = 4096, k = 4096;
  const std::vector<float> w = RandomBf16Values(n * k, -1.0f / 64, 1.0f / 64, 701);
  const Tensor host_w = HostBf16Tensor(w, {n, k});
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(w, DType::kBF16, stream()));
  for (int64_t m : {1, 16}) {
    const std::vector<float> x = RandomBf16Values(m * k, -1.0f, 1.0f, 702 + m);
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x, DType::kBF16, stream()));
    std::vector<float> want(m * n, kNaN);
    cpu::Linear(x.data(), m, host_w, nullptr, want.data());
    const std::string what = absl::StrCat("autotuned Linear m=", m, " n=", n, " k=", k);
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer ya, Poisoned(m * n, DType::kF32, stream()));
    QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer yb, Poisoned(m * n, DType::kF32, stream()));
    const absl::Status sa =
        a->Linear(d_x.get(), d_w.get(), ya.get(), DType::kF32, m, n, k, stream());
    const absl::Status sb =
        b->Linear(d_x.get(), d_w.get(), yb.get(), DType::kF32, m, n, k, stream());
    SetBlasAutotune(saved);
    QSHARD_ASSERT_OK(sa);
    QSHARD_ASSERT_OK(sb);
    SetBlasAutotune(true);
    QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got_a,
                                Download(ya, DType::kF32, m * n, stream()));
    QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> got_b,
                                Download(yb, DType::kF32, m * n, stream()));
    ExpectClose(got_a, want, m, n, LinearTolerance(DType::kF32), what);
    EXPECT_TRUE(got_a == got_b) << what << ": two CublasLtLinear instances chose differently";
  }
  SetBlasAutotune(saved);
}

TEST(CudaOpsArgsTest, EnvSwitchReadsOnlyZeroAndOne) {
  const char* name = "QSHARD_CUDA_TEST_ONLY_SWITCH";
  ::unsetenv(name);
  EXPECT_TRUE(EnvSwitch(name, true));
  EXPECT_FALSE(EnvSwitch(name, false));
  ::setenv(name, "0", 1);
  EXPECT_FALSE(EnvSwitch(name, true));
  EXPECT_FALSE(EnvSwitch(name, false));
  ::setenv(name, "1", 1);
  EXPECT_TRUE(EnvSwitch(name, true));
  EXPECT_TRUE(EnvSwitch(name, false));
  ::setenv(name, "yes", 1);  // neither: the default stays
  EXPECT_TRUE(EnvSwitch(name, true));
  EXPECT_FALSE(EnvSwitch(name, false));
  ::unsetenv(name);
}

// EnvFlag starts from the environment when constructed and then follows Set only.
TEST(CudaOpsArgsTest, EnvFlagStartsFromTheEnvironment) {
  const char* name = "QSHARD_CUDA_TEST_ONLY_FLAG";
  ::setenv(name, "1", 1);
  EnvFlag on(name, /*default_on=*/false);
  ::unsetenv(name);
  EnvFlag off(name, /*default_on=*/false);
  EXPECT_TRUE(on.Get());
  EXPECT_FALSE(off.Get());
  ::setenv(name, "0", 1);  // read once: later changes of the environment do not matter
  EXPECT_TRUE(on.Get());
  on.Set(false);
  off.Set(true);
  EXPECT_FALSE(on.Get());
  EXPECT_TRUE(off.Get());
  ::unsetenv(name);
}

// The process-wide switches of the opt-in kernels follow their setters (the default of each
// is asserted nowhere: a GPU run decides them).
TEST(CudaOpsArgsTest, OptInSwitches) {
  struct Switch {
    void (*set)(bool);
    bool (*get)();
  };
  const Switch switches[] = {{SetIntGemmFactoredScales, IntGemmFactoredScalesEnabled},
                             {SetIntGemv4, IntGemv4Enabled},
                             {SetFp8BlasScaled, Fp8BlasScaledEnabled},
                             {SetGemv8Ring, Gemv8RingEnabled},
                             {SetFusedActQuant, FusedActQuantEnabled}};
  for (const Switch& sw : switches) {
    const bool saved = sw.get();
    sw.set(!saved);
    EXPECT_EQ(sw.get(), !saved);
    sw.set(saved);
    EXPECT_EQ(sw.get(), saved);
  }
}

TEST(CudaOpsArgsTest, BlasAutotuneSwitch) {
  const bool saved = BlasAutotuneEnabled();
  SetBlasAutotune(true);
  EXPECT_TRUE(BlasAutotuneEnabled());
  SetBlasAutotune(false);
  EXPECT_FALSE(BlasAutotuneEnabled());
  SetBlasAutotune(saved);
}

// Row views start in the middle of a buffer, less aligned than cudaMalloc's 256 bytes:
// the heuristic must be told, or it may pick an algorithm that faults or is refused.
TEST_F(CudaOpsTest, LinearOnUnalignedRowViews) {
  QSHARD_ASSERT_OK_AND_ASSIGN(std::unique_ptr<CublasLtLinear> blas, CublasLtLinear::Create());
  constexpr int64_t kM = 9;
  constexpr int64_t kN = 1000;
  constexpr int64_t kK = 392;  // a row is 784 bytes: row 1 starts 16-byte aligned only
  const std::vector<float> w = RandomBf16Values((kN + 1) * kK, -0.05f, 0.05f, 601);
  const std::vector<float> x = RandomBf16Values((kM + 1) * kK, -1.0f, 1.0f, 602);
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_w, Upload(w, DType::kBF16, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_x, Upload(x, DType::kBF16, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(DeviceBuffer d_y, Poisoned(kM * kN + 4, DType::kF32, stream()));
  const auto* w_rows = d_w.as<uint16_t>() + kK;  // rows 1..kN
  const auto* x_rows = d_x.as<uint16_t>() + kK;  // rows 1..kM
  float* y_rows = d_y.as<float>() + 4;           // 16-byte aligned
  QSHARD_ASSERT_OK(blas->Linear(x_rows, w_rows, y_rows, DType::kF32, kM, kN, kK, stream()));
  QSHARD_ASSERT_OK_AND_ASSIGN(std::vector<float> all,
                              Download(d_y, DType::kF32, kM * kN + 4, stream()));
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(std::isnan(all[i])) << "wrote before y, at " << i;
  const std::vector<float> got(all.begin() + 4, all.begin() + 4 + kM * kN);
  const std::vector<float> x_view(x.begin() + kK, x.end());
  const std::vector<float> w_view(w.begin() + kK, w.end());
  std::vector<float> want(kM * kN, kNaN);
  cpu::Linear(x_view.data(), kM, HostBf16Tensor(w_view, {kN, kK}), nullptr, want.data());
  ExpectClose(got, want, kM, kN, LinearTolerance(DType::kF32), "Linear on row views");
}

// Argument checks happen before any CUDA call, so these run on machines without a GPU.
TEST(CudaOpsArgsTest, RejectsBadArgumentsWithoutTouchingTheDevice) {
  int dummy = 0;
  void* p = &dummy;
  EXPECT_EQ(LaunchRmsNorm(p, DType::kF16, p, kEps, 1, 8, p, DType::kF32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LaunchRmsNorm(p, DType::kF32, p, kEps, 1, 0, p, DType::kF32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LaunchRmsNorm(p, DType::kF32, p, kEps, 2, 8, p, DType::kBF16, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // in place with different dtypes
  EXPECT_EQ(LaunchEmbedding(p, DType::kBF16, 10, 8, nullptr, 1, p, DType::kF32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);  // null ids
  EXPECT_EQ(
      LaunchEmbedding(p, DType::kBF16, 0, 8, static_cast<const int32_t*>(p), 1, p, DType::kF32, nullptr)
          .code(),
      absl::StatusCode::kInvalidArgument);  // empty vocabulary
  EXPECT_EQ(LaunchAddRmsNorm(p, DType::kF32, p, DType::kF32, p, kEps, 1, 8, p, DType::kF32, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);  // out == residual
  EXPECT_EQ(LaunchEmbedding(p, DType::kF8E4M3, 10, 8, static_cast<const int32_t*>(p), 1, p,
                            DType::kF32, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);  // fp8 table
  // Zero rows is a valid no-op.
  EXPECT_TRUE(
      LaunchRmsNorm(nullptr, DType::kF32, nullptr, kEps, 0, 8, nullptr, DType::kF32, nullptr).ok());
}

TEST(CudaOpsArgsTest, DeviceProbeNeverFails) {
  // Must not crash or throw on a machine without a driver; on one with a GPU it agrees
  // with the device count.
  EXPECT_EQ(CudaDeviceAvailable(), CudaDeviceCount() > 0);
  if (!CudaDeviceAvailable()) {
    EXPECT_FALSE(QueryDevice(0).ok());
  }
}

}  // namespace
}  // namespace qshard::cuda

namespace qshard::cuda {
namespace {

// cuBLASLt is opened with dlopen on first use (cublaslt_loader.h): the toolkit's library
// must be found wherever the CUDA runtime is, GPU or not. The status names come from the
// library itself once loaded (the loader's own fallback says NOT_INITIALIZED).
TEST(CublasLtLoaderTest, OpensTheToolkitLibraryOnFirstUse) {
  EXPECT_STREQ(cublasLtGetStatusName(CUBLAS_STATUS_SUCCESS), "CUBLAS_STATUS_SUCCESS");
  EXPECT_EQ(CublasLtLoadError(), "");
}

}  // namespace
}  // namespace qshard::cuda
