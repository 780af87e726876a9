// FP8 / 16-bit KV rows: round trips over random data with stated error bounds.
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/backend/cpu/kv_rows.h"

namespace qshard::cpu {
namespace {

// Relative round-trip bound for normal values: half a unit in the last place of the
// mantissa (e4m3: 3 bits -> 2^-4, e5m2: 2 bits -> 2^-3, bf16: 7 bits -> 2^-8,
// f16: 10 bits -> 2^-11), plus half the smallest subnormal step (times scale) for tiny ones.
struct Case {
  DType dt;
  double rel;
  double abs_at_scale_1;  // half the smallest subnormal of the format
  size_t bytes;
};

TEST(KvRowsTest, RoundTripWithinFormatPrecision) {
  const Case cases[] = {{DType::kF8E4M3, 1.0 / 16, std::ldexp(1.0, -10), 1},
                        {DType::kF8E5M2, 1.0 / 8, std::ldexp(1.0, -17), 1},
                        {DType::kBF16, 1.0 / 256, 0, 2},
                        {DType::kF16, 1.0 / 2048, std::ldexp(1.0, -25), 2},
                        {DType::kF32, 0, 0, 4}};
  std::mt19937 rng(7);
  for (const Case& c : cases) {
    for (float scale : {1.0f, 0.05f, 3.0f}) {
      std::normal_distribution<float> dist(0.0f, 4.0f * scale);
      std::vector<float> x(1000), y(1000, NAN);
      for (float& v : x) v = dist(rng);
      std::vector<uint8_t> store(x.size() * c.bytes);
      // 16-bit and fp32 formats ignore the scale.
      StoreKvRow(c.dt, x.data(), x.size(), scale, store.data());
      LoadKvRow(c.dt, store.data(), x.size(), scale, y.data());
      const double s = IsSupportedKvDType(c.dt) && Fp8MaxValue(c.dt) > 0 ? scale : 1.0;
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_TRUE(std::isfinite(y[i])) << DTypeName(c.dt) << " i=" << i;
        const double err = std::fabs(static_cast<double>(y[i]) - x[i]);
        EXPECT_LE(err, c.rel * std::fabs(x[i]) + c.abs_at_scale_1 * s + 1e-30)
            << DTypeName(c.dt) << " scale " << scale << " x=" << x[i] << " y=" << y[i];
      }
    }
  }
}

TEST(KvRowsTest, Fp8SaturatesInsteadOfOverflowing) {
  // Values past max x scale clamp to the format's largest finite value.
  const float scale = 0.5f;
  std::vector<float> x = {1e6f, -1e6f, 448.0f * scale, 57344.0f};
  std::vector<uint8_t> q(x.size());
  std::vector<float> y(x.size());
  StoreKvRow(DType::kF8E4M3, x.data(), x.size(), scale, q.data());
  LoadKvRow(DType::kF8E4M3, q.data(), x.size(), scale, y.data());
  EXPECT_EQ(y[0], 448.0f * scale);
  EXPECT_EQ(y[1], -448.0f * scale);
  EXPECT_EQ(y[2], 448.0f * scale);
  StoreKvRow(DType::kF8E5M2, x.data(), x.size(), 1.0f, q.data());
  LoadKvRow(DType::kF8E5M2, q.data(), x.size(), 1.0f, y.data());
  EXPECT_EQ(y[0], 57344.0f);
  EXPECT_EQ(y[1], -57344.0f);
  EXPECT_EQ(y[3], 57344.0f);
  EXPECT_EQ(Fp8MaxValue(DType::kF8E4M3), 448.0f);
  EXPECT_EQ(Fp8MaxValue(DType::kF8E5M2), 57344.0f);
  EXPECT_EQ(Fp8MaxValue(DType::kBF16), 0.0f);
}

}  // namespace
}  // namespace qshard::cpu
