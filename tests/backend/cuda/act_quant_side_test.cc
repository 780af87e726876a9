// The fp8 side output of the producer kernels (LaunchRmsNorm, LaunchAddRmsNorm,
// LaunchSiluMulPacked with codes / scales; act_quant.cuh) against what the fp8 linear's own
// quantize kernel (LaunchQuantizeActivations, fp8 per token) makes of the same stored rows:
// the codes, the scales and the bf16 rows themselves must be equal bit for bit (one shared
// definition of the arithmetic; the quantize kernel is checked against the host encoder in
// fp8_linear_test.cc). With the side output the CUDA backend lets an fp8 W8A8 linear skip
// its quantize launch (cuda::SetFusedActQuant), so any difference would change results.
//
// Rows: 1, 3 and 17 (decode and prefill-sized); widths 1040 (not a multiple of the block's
// vector count), 4096 and 14336 (Llama-3.1-8B's hidden and intermediate sizes); random bf16
// inputs whose rows span e^-3 .. e^3 with an outlier per row. Outputs and codes are poisoned
// first (0xFF), so a skipped store shows.
//
// Without a CUDA device the kernel tests skip; the argument checks run anyway.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/backend/cuda/elementwise.h"
#include "runtime/backend/cuda/embedding_rmsnorm.h"
#include "runtime/backend/cuda/fp8_linear.h"
#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "tests/backend/cuda/cuda_test_util.h"

namespace qshard::cuda {
namespace {

using ::qshard::cuda::testing::Name;

// bf16 bits [rows, cols]: uniform [-1, 1) times e^u, u in [-3, 3) per row, one value per
// row pushed 8x out.
std::vector<uint16_t> RandomRows(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), e(-3.0f, 3.0f);
  std::vector<uint16_t> v(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = std::exp(e(rng));
    for (int64_t c = 0; c < cols; ++c) v[r * cols + c] = F32ToBf16(u(rng) * scale);
    v[r * cols + (r * 37) % cols] = F32ToBf16(8.0f * scale);
  }
  return v;
}

class ActQuantSideTest : public ::qshard::cuda::testing::CudaStreamTest {
 protected:
  // A device buffer of `bytes`, filled with `value`.
  DeviceBuffer Filled(size_t bytes, uint8_t value) {
    auto b = DeviceBuffer::Allocate(bytes);
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return DeviceBuffer();
    EXPECT_TRUE(b->Fill(value, stream()).ok());
    return std::move(b).value();
  }
  DeviceBuffer Upload(const void* p, size_t bytes) {
    auto b = DeviceBuffer::Allocate(bytes);
    EXPECT_TRUE(b.ok()) << b.status();
    if (!b.ok()) return DeviceBuffer();
    EXPECT_TRUE(b->CopyFromHost(p, bytes, stream()).ok());
    return std::move(b).value();
  }
  std::vector<uint8_t> Download(const DeviceBuffer& b, size_t bytes) {
    std::vector<uint8_t> h(bytes);
    EXPECT_TRUE(b.CopyToHost(h.data(), bytes, stream()).ok());
    return h;
  }

  // `produce(out, codes, scales)` writes bf16 rows [rows, cols] into out, with the side
  // output when codes is non-null. Runs it twice (with and without the side output), then
  // quantizes the second run's rows with the quantize kernel, and compares.
  template <typename Produce>
  void Compare(const std::string& what, int64_t rows, int64_t cols, Produce produce) {
    SCOPED_TRACE(what);
    const size_t out_bytes = static_cast<size_t>(rows * cols) * 2;
    const size_t code_bytes = static_cast<size_t>(rows * cols);
    DeviceBuffer out1 = Filled(out_bytes, 0xFF), out2 = Filled(out_bytes, 0xFF);
    DeviceBuffer codes1 = Filled(code_bytes, 0xFF), codes2 = Filled(code_bytes, 0xFF);
    DeviceBuffer scales1 = Filled(rows * 4, 0xFF), scales2 = Filled(rows * 4, 0xFF);
    QSHARD_ASSERT_OK(produce(out1.get(), codes1.as<uint8_t>(), scales1.as<float>()));
    QSHARD_ASSERT_OK(produce(out2.get(), nullptr, nullptr));
    QSHARD_ASSERT_OK(LaunchQuantizeActivations(out2.get(), rows, cols, ActQuant::kFp8PerToken, 0.0f,
                                               codes2.get(), scales2.as<float>(), stream()));
    const std::vector<uint8_t> o1 = Download(out1, out_bytes), o2 = Download(out2, out_bytes);
    const std::vector<uint8_t> c1 = Download(codes1, code_bytes), c2 = Download(codes2, code_bytes);
    const std::vector<uint8_t> s1 = Download(scales1, rows * 4), s2 = Download(scales2, rows * 4);
    EXPECT_TRUE(o1 == o2) << "the bf16 rows differ with the side output on";
    int64_t bad = 0;
    for (size_t i = 0; i < code_bytes; ++i) {
      if (c1[i] != c2[i] && bad++ < 5) {
        ADD_FAILURE() << "code [" << i / cols << ", " << i % cols << "]: side " << int(c1[i])
                      << ", quantize kernel " << int(c2[i]);
      }
    }
    EXPECT_EQ(bad, 0) << "codes differ";
    EXPECT_TRUE(s1 == s2) << "scales differ";
    float s0 = 0;
    std::memcpy(&s0, s1.data(), 4);
    EXPECT_TRUE(std::isfinite(s0) && s0 > 0) << "scale of row 0: " << s0;
  }
};

const int64_t kRows[] = {1, 3, 17};
const int64_t kCols[] = {1040, 4096, 14336};

TEST_F(ActQuantSideTest, RmsNorm) {
  uint32_t seed = 1;
  for (int64_t rows : kRows) {
    for (int64_t cols : kCols) {
      const std::vector<uint16_t> x = RandomRows(rows, cols, ++seed);
      std::vector<float> w(static_cast<size_t>(cols));
      std::mt19937 rng(seed);
      std::uniform_real_distribution<float> wd(0.5f, 1.5f);
      for (float& v : w) v = wd(rng);
      DeviceBuffer dx = Upload(x.data(), x.size() * 2), dw = Upload(w.data(), w.size() * 4);
      Compare(absl::StrCat("RmsNorm ", rows, " x ", cols), rows, cols,
              [&](void* out, uint8_t* codes, float* scales) {
                return LaunchRmsNorm(dx.get(), DType::kBF16, dw.get(), 1e-5f, rows, cols, out,
                                     DType::kBF16, stream(), codes, scales);
              });
    }
  }
}

TEST_F(ActQuantSideTest, AddRmsNorm) {
  uint32_t seed = 100;
  for (DType res_dtype : {DType::kF32, DType::kBF16}) {  // 4 and 8 elements per vector
    for (int64_t rows : kRows) {
      for (int64_t cols : kCols) {
        const std::vector<uint16_t> x = RandomRows(rows, cols, ++seed);
        const std::vector<uint16_t> r16 = RandomRows(rows, cols, ++seed);
        std::vector<float> r32(r16.size());
        for (size_t i = 0; i < r16.size(); ++i) r32[i] = Bf16ToF32(r16[i]);
        std::vector<float> w(static_cast<size_t>(cols), 1.0f);
        for (int64_t i = 0; i < cols; ++i) w[i] = 0.75f + 0.5f * static_cast<float>(i % 7) / 7;
        DeviceBuffer dx = Upload(x.data(), x.size() * 2), dw = Upload(w.data(), w.size() * 4);
        const void* res_host = res_dtype == DType::kF32 ? static_cast<const void*>(r32.data())
                                                        : static_cast<const void*>(r16.data());
        const size_t res_bytes = r16.size() * DTypeSize(res_dtype);
        // Each run adds into its own copy of the residual.
        Compare(absl::StrCat("AddRmsNorm residual ", Name(res_dtype), " ", rows, " x ", cols), rows,
                cols, [&](void* out, uint8_t* codes, float* scales) {
                  DeviceBuffer res = Upload(res_host, res_bytes);
                  const absl::Status st = LaunchAddRmsNorm(
                      res.get(), res_dtype, dx.get(), DType::kBF16, dw.get(), 1e-5f, rows, cols,
                      out, DType::kBF16, stream(), codes, scales);
                  const absl::Status sync = cudaStreamSynchronize(stream()) == cudaSuccess
                                                ? absl::OkStatus()
                                                : absl::InternalError("sync");
                  return st.ok() ? sync : st;
                });
      }
    }
  }
}

TEST_F(ActQuantSideTest, SiluMulPacked) {
  uint32_t seed = 200;
  for (int64_t rows : kRows) {
    for (int64_t cols : kCols) {
      const std::vector<uint16_t> gate_up = RandomRows(rows, 2 * cols, ++seed);
      DeviceBuffer dgu = Upload(gate_up.data(), gate_up.size() * 2);
      Compare(absl::StrCat("SiluMulPacked ", rows, " x ", cols), rows, cols,
              [&](void* out, uint8_t* codes, float* scales) {
                return LaunchSiluMulPacked(dgu.get(), out, DType::kBF16, rows, cols, stream(),
                                           codes, scales);
              });
    }
  }
}

// Argument checks return before any CUDA call: these run without a GPU too.
TEST(ActQuantSideArgs, RejectsBadSideOutputs) {
  alignas(16) static uint8_t codes[64];
  static float scales[4];
  alignas(16) static int dummy[16] = {};
  auto has = [](const absl::Status& st, const std::string& what) {
    EXPECT_FALSE(st.ok()) << what;
    EXPECT_NE(st.ToString().find(what), std::string::npos) << st;
  };
  // fp32 rows: the side output quantizes bf16 rows only.
  has(LaunchRmsNorm(dummy, DType::kF32, dummy, 1e-5f, 1, 16, dummy, DType::kF32, nullptr, codes,
                    scales),
      "fp8 side output");
  // codes without scales.
  has(LaunchAddRmsNorm(dummy, DType::kF32, dummy, DType::kBF16, dummy, 1e-5f, 1, 16, dummy + 8,
                       DType::kBF16, nullptr, codes, nullptr),
      "fp8 side output");
  // Unaligned codes.
  has(LaunchRmsNorm(dummy, DType::kBF16, dummy, 1e-5f, 1, 16, dummy, DType::kBF16, nullptr,
                    codes + 1, scales),
      "16-byte aligned");
  has(LaunchSiluMulPacked(dummy, dummy, DType::kF32, 1, 16, nullptr, codes, scales),
      "fp8 side output");
}

TEST(ActQuantSideArgs, Switch) {
  const bool saved = FusedActQuantEnabled();
  SetFusedActQuant(true);
  EXPECT_TRUE(FusedActQuantEnabled());
  SetFusedActQuant(false);
  EXPECT_FALSE(FusedActQuantEnabled());
  SetFusedActQuant(saved);
}

}  // namespace
}  // namespace qshard::cuda
