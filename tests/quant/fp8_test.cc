// FP8 codec: every one of the 256 codes of both formats against a value computed
// independently from the bit fields, round-to-nearest-even at every midpoint, saturation,
// subnormals, and random round trips with stated error bounds.
#include "quant/fp8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace qshard {
namespace {

struct Format {
  const char* name;
  int exp_bits;
  int man_bits;
  bool ieee_specials;  // e5m2: exponent all-ones is inf/NaN; e4m3fn: only S.1111.111 is NaN
  uint8_t (*encode)(float);
  float (*decode)(uint8_t);
  uint8_t max_code;  // largest finite positive code
  double max_value;
};

void PrintTo(const Format& f, std::ostream* os) { *os << f.name; }

uint8_t EncodeE4M3(float x) { return FloatToE4M3(x); }
float DecodeE4M3(uint8_t c) { return E4M3ToFloat(c); }
uint8_t EncodeE5M2(float x) { return FloatToE5M2(x); }
float DecodeE5M2(uint8_t c) { return E5M2ToFloat(c); }

const Format kE4M3{"e4m3fn", 4, 3, false, EncodeE4M3, DecodeE4M3, 0x7E, 448.0};
const Format kE5M2{"e5m2", 5, 2, true, EncodeE5M2, DecodeE5M2, 0x7B, 57344.0};

// Reference decode from the definition, in double. NaN for NaN codes, +-inf for e5m2 infs.
double Reference(const Format& f, int code) {
  const int bias = (1 << (f.exp_bits - 1)) - 1;
  const int exp_all_ones = (1 << f.exp_bits) - 1;
  const int sign = code >> 7;
  const int exp = (code >> f.man_bits) & exp_all_ones;
  const int man = code & ((1 << f.man_bits) - 1);
  double v;
  if (f.ieee_specials && exp == exp_all_ones) {
    v = man == 0 ? std::numeric_limits<double>::infinity()
                 : std::numeric_limits<double>::quiet_NaN();
  } else if (!f.ieee_specials && exp == exp_all_ones && man == (1 << f.man_bits) - 1) {
    v = std::numeric_limits<double>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<double>(man), 1 - bias - f.man_bits);
  } else {
    v = std::ldexp(1.0 + man / static_cast<double>(1 << f.man_bits), exp - bias);
  }
  return sign ? -v : v;
}

bool IsNaNCode(const Format& f, int code) { return std::isnan(Reference(f, code)); }

class Fp8FormatTest : public ::testing::TestWithParam<Format> {};

TEST_P(Fp8FormatTest, DecodeMatchesBitFieldsForAll256Codes) {
  const Format& f = GetParam();
  int nan_codes = 0;
  for (int c = 0; c < 256; ++c) {
    const double want = Reference(f, c);
    const float got = f.decode(static_cast<uint8_t>(c));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << f.name << " code " << c;
      ++nan_codes;
      continue;
    }
    EXPECT_EQ(static_cast<double>(got), want) << f.name << " code " << c;
    EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << f.name << " code " << c;
  }
  // e4m3fn: 0x7F and 0xFF only. e5m2: 3 NaN mantissas per sign.
  EXPECT_EQ(nan_codes, f.ieee_specials ? 6 : 2);
  EXPECT_EQ(static_cast<double>(f.decode(f.max_code)), f.max_value);
}

TEST_P(Fp8FormatTest, EncodeOfDecodeIsIdentityForEveryNonNaNCode) {
  const Format& f = GetParam();
  for (int c = 0; c < 256; ++c) {
    if (IsNaNCode(f, c)) continue;
    const float v = f.decode(static_cast<uint8_t>(c));
    if (std::isinf(v)) {
      // The saturating encoder maps +-inf to +-max; the IEEE one keeps it.
      EXPECT_EQ(f.encode(v), (c & 0x80) | f.max_code);
      EXPECT_EQ(FloatToE5M2NoSat(v), c);
      continue;
    }
    EXPECT_EQ(f.encode(v), c) << f.name << " code " << c << " value " << v;
  }
  // Zero keeps its sign.
  EXPECT_EQ(f.encode(0.0f), 0x00);
  EXPECT_EQ(f.encode(-0.0f), 0x80);
}

TEST_P(Fp8FormatTest, NaNEncodesToNaN) {
  const Format& f = GetParam();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(f.decode(f.encode(nan))));
  EXPECT_TRUE(std::isnan(f.decode(f.encode(-nan))));
  EXPECT_TRUE(std::isnan(E5M2ToFloat(FloatToE5M2NoSat(nan))));
}

// Between every two adjacent finite codes of one sign the exact midpoint must round to the
// code with the even mantissa (the even code: the mantissa's last bit is the code's last
// bit), and the nearest floats on either side of it must round down and up respectively.
TEST_P(Fp8FormatTest, MidpointsRoundToNearestEven) {
  const Format& f = GetParam();
  int checked = 0;
  for (int sign = 0; sign < 2; ++sign) {
    for (int c = 0; c < f.max_code; ++c) {
      const int lo = sign << 7 | c, hi = sign << 7 | (c + 1);
      const double a = Reference(f, lo), b = Reference(f, hi);
      // Midpoints of fp8 values need at most 5 significant bits: exact in float.
      const float mid = static_cast<float>((a + b) / 2);
      ASSERT_EQ(static_cast<double>(mid), (a + b) / 2);
      const int even = (lo & 1) == 0 ? lo : hi;
      EXPECT_EQ(f.encode(mid), even) << f.name << " midpoint of " << lo << " and " << hi;
      const float toward_lo = std::nextafter(mid, static_cast<float>(a));
      const float toward_hi = std::nextafter(mid, static_cast<float>(b));
      EXPECT_EQ(f.encode(toward_lo), lo) << f.name << " just past midpoint toward " << lo;
      EXPECT_EQ(f.encode(toward_hi), hi) << f.name << " just past midpoint toward " << hi;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 2 * f.max_code);
}

TEST_P(Fp8FormatTest, RandomRoundTripWithinHalfAnUlp) {
  const Format& f = GetParam();
  const int bias = (1 << (f.exp_bits - 1)) - 1;
  const double min_normal = std::ldexp(1.0, 1 - bias);
  const double min_subnormal = std::ldexp(1.0, 1 - bias - f.man_bits);
  // Round to nearest: relative error <= half an ulp = 2^-(man_bits + 1) for normals
  // (e4m3: 2^-4, e5m2: 2^-3); absolute error <= half the subnormal step below min normal.
  const double rel_bound = std::ldexp(1.0, -(f.man_bits + 1));
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> log_mag(std::log2(min_subnormal) - 2,
                                                 std::log2(f.max_value));
  std::bernoulli_distribution neg(0.5);
  double worst_rel = 0;
  for (int i = 0; i < 200000; ++i) {
    const float x = static_cast<float>((neg(rng) ? -1 : 1) * std::exp2(log_mag(rng)));
    const double y = f.decode(f.encode(x));
    const double err = std::fabs(y - x);
    if (std::fabs(x) >= min_normal) {
      ASSERT_LE(err, rel_bound * std::fabs(x)) << f.name << " x=" << x << " y=" << y;
      worst_rel = std::max(worst_rel, err / std::fabs(x));
    } else {
      ASSERT_LE(err, min_subnormal / 2) << f.name << " subnormal x=" << x << " y=" << y;
    }
    if (y != 0) {
      EXPECT_EQ(std::signbit(y), std::signbit(x));
    }
  }
  // The worst case is just below the midpoint above 1.0: half an ulp over (1 + half an ulp),
  // e4m3 1/17, e5m2 1/9; random data comes close to it, so the bound above is not loose.
  EXPECT_GT(worst_rel, rel_bound / (1 + rel_bound) * 0.98);
}

TEST_P(Fp8FormatTest, VectorHelpersApplyTheScale) {
  const Format& f = GetParam();
  const bool e4m3 = f.exp_bits == 4;
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 3.f);
  std::vector<float> x(1000);
  for (float& v : x) v = dist(rng);
  x[17] = 40.f;  // the amax
  const float amax = AbsMax(x.data(), static_cast<int64_t>(x.size()));
  ASSERT_EQ(amax, 40.f);
  const float scale = amax / static_cast<float>(f.max_value);
  std::vector<uint8_t> q(x.size());
  std::vector<float> y(x.size());
  if (e4m3) {
    QuantizeE4M3(x.data(), static_cast<int64_t>(x.size()), 1.f / scale, q.data());
    DequantizeE4M3(q.data(), static_cast<int64_t>(q.size()), scale, y.data());
  } else {
    QuantizeE5M2(x.data(), static_cast<int64_t>(x.size()), 1.f / scale, q.data());
    DequantizeE5M2(q.data(), static_cast<int64_t>(q.size()), scale, y.data());
  }
  EXPECT_EQ(q[17], f.max_code);  // amax maps to the largest code
  const double rel_bound = std::ldexp(1.0, -(f.man_bits + 1));
  const int bias = (1 << (f.exp_bits - 1)) - 1;
  const double half_sub_step = std::ldexp(1.0, -bias - f.man_bits) * scale;
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(q[i], f.encode(x[i] * (1.f / scale))) << i;
    EXPECT_FLOAT_EQ(y[i], f.decode(q[i]) * scale) << i;
    // Half an ulp relative (normals) or half a subnormal step (tiny values), with slack for
    // the float rounding of the two scale multiplications.
    const double bound = std::max(rel_bound * std::fabs(x[i]), half_sub_step) * 1.001;
    EXPECT_LE(std::fabs(y[i] - x[i]), bound) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(BothFormats, Fp8FormatTest, ::testing::Values(kE4M3, kE5M2),
                         [](const ::testing::TestParamInfo<Format>& info) {
                           return info.param.exp_bits == 4 ? std::string("E4M3")
                                                           : std::string("E5M2");
                         });

TEST(Fp8E4M3Test, Saturates) {
  EXPECT_EQ(FloatToE4M3(1e6f), 0x7E);
  EXPECT_EQ(FloatToE4M3(-1e6f), 0xFE);
  EXPECT_EQ(E4M3ToFloat(0x7E), 448.f);
  EXPECT_EQ(E4M3ToFloat(0xFE), -448.f);
  EXPECT_EQ(FloatToE4M3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(FloatToE4M3(-std::numeric_limits<float>::infinity()), 0xFE);
  EXPECT_EQ(FloatToE4M3(std::numeric_limits<float>::max()), 0x7E);
  // Just above the max rounds down to it; 464 (the midpoint toward the non-existent 480) too.
  EXPECT_EQ(FloatToE4M3(449.f), 0x7E);
  EXPECT_EQ(FloatToE4M3(464.f), 0x7E);
  EXPECT_EQ(FloatToE4M3(465.f), 0x7E);
  // Never produces the NaN code from a number.
  for (float x = 400.f; x < 1e5f; x *= 1.01f) EXPECT_FALSE(IsE4M3NaN(FloatToE4M3(x))) << x;
  EXPECT_EQ(kE4M3Max, 448.f);
}

TEST(Fp8E4M3Test, NaNCodesAndSpecialValues) {
  EXPECT_TRUE(std::isnan(E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(E4M3ToFloat(0xFF)));
  EXPECT_TRUE(IsE4M3NaN(0x7F));
  EXPECT_TRUE(IsE4M3NaN(0xFF));
  EXPECT_FALSE(IsE4M3NaN(0x7E));
  // S.1111.xxx other than 111 are ordinary numbers (no infinities in "fn").
  EXPECT_EQ(E4M3ToFloat(0x78), 256.f);
  EXPECT_EQ(E4M3ToFloat(0x38), 1.f);
  EXPECT_EQ(FloatToE4M3(1.f), 0x38);
  EXPECT_EQ(FloatToE4M3(-2.f), 0xC0);
}

TEST(Fp8E4M3Test, Subnormals) {
  const float min_sub = std::ldexp(1.f, -9);
  EXPECT_EQ(E4M3ToFloat(0x01), min_sub);
  EXPECT_EQ(E4M3ToFloat(0x07), 7 * min_sub);          // largest subnormal
  EXPECT_EQ(E4M3ToFloat(0x08), std::ldexp(1.f, -6));  // smallest normal
  EXPECT_EQ(FloatToE4M3(min_sub), 0x01);
  EXPECT_EQ(FloatToE4M3(-min_sub), 0x81);
  EXPECT_EQ(FloatToE4M3(min_sub / 2), 0x00);  // tie between 0 and 1: even is 0
  EXPECT_EQ(FloatToE4M3(-min_sub / 2), 0x80);
  EXPECT_EQ(FloatToE4M3(std::nextafter(min_sub / 2, 1.f)), 0x01);
  EXPECT_EQ(FloatToE4M3(1.5f * min_sub), 0x02);  // tie between 1 and 2: even is 2
  EXPECT_EQ(FloatToE4M3(2.5f * min_sub), 0x02);  // tie between 2 and 3
  EXPECT_EQ(FloatToE4M3(7.5f * min_sub), 0x08);  // tie rounds up into the first normal
  EXPECT_EQ(FloatToE4M3(min_sub / 4), 0x00);
  EXPECT_EQ(FloatToE4M3(1e-30f), 0x00);
  EXPECT_EQ(FloatToE4M3(std::numeric_limits<float>::denorm_min()), 0x00);
  EXPECT_EQ(FloatToE4M3(-std::numeric_limits<float>::denorm_min()), 0x80);
}

TEST(Fp8E5M2Test, SaturatesAndInfinities) {
  EXPECT_EQ(E5M2ToFloat(0x7B), 57344.f);
  EXPECT_EQ(FloatToE5M2(1e9f), 0x7B);
  EXPECT_EQ(E5M2ToFloat(FloatToE5M2(1e9f)), 57344.f);
  EXPECT_EQ(FloatToE5M2(-1e9f), 0xFB);
  EXPECT_EQ(FloatToE5M2(std::numeric_limits<float>::infinity()), 0x7B);
  EXPECT_EQ(FloatToE5M2(-std::numeric_limits<float>::infinity()), 0xFB);
  EXPECT_TRUE(std::isinf(E5M2ToFloat(0x7C)));
  EXPECT_TRUE(std::isinf(E5M2ToFloat(0xFC)));
  EXPECT_LT(E5M2ToFloat(0xFC), 0.f);
  EXPECT_TRUE(std::isnan(E5M2ToFloat(0x7D)));
  EXPECT_TRUE(std::isnan(E5M2ToFloat(0x7E)));
  EXPECT_TRUE(std::isnan(E5M2ToFloat(0x7F)));
  EXPECT_TRUE(IsE5M2NaN(0xFD));
  EXPECT_FALSE(IsE5M2NaN(0xFC));
  EXPECT_EQ(kE5M2Max, 57344.f);
  // IEEE (non-saturating) variant: 61440 is the midpoint between 57344 (odd mantissa) and
  // 65536 (= overflow): ties to even overflow to inf; just below stays at the max.
  EXPECT_EQ(FloatToE5M2NoSat(61440.f), 0x7C);
  EXPECT_EQ(FloatToE5M2NoSat(std::nextafter(61440.f, 0.f)), 0x7B);
  EXPECT_EQ(FloatToE5M2NoSat(-1e9f), 0xFC);
  EXPECT_EQ(FloatToE5M2NoSat(std::numeric_limits<float>::max()), 0x7C);
  EXPECT_EQ(FloatToE5M2NoSat(-std::numeric_limits<float>::infinity()), 0xFC);
  EXPECT_EQ(FloatToE5M2(61440.f), 0x7B);
}

TEST(Fp8E5M2Test, Subnormals) {
  const float min_sub = std::ldexp(1.f, -16);
  EXPECT_EQ(E5M2ToFloat(0x01), min_sub);
  EXPECT_EQ(E5M2ToFloat(0x03), 3 * min_sub);
  EXPECT_EQ(E5M2ToFloat(0x04), std::ldexp(1.f, -14));
  EXPECT_EQ(FloatToE5M2(min_sub / 2), 0x00);
  EXPECT_EQ(FloatToE5M2(1.5f * min_sub), 0x02);
  EXPECT_EQ(FloatToE5M2(3.5f * min_sub), 0x04);  // into the first normal
  EXPECT_EQ(FloatToE5M2(-3 * min_sub), 0x83);
}

// The codec is constexpr: decode tables are built at compile time.
static_assert(FloatToE4M3(448.f) == 0x7E);
static_assert(E4M3ToFloat(0x7E) == 448.f);
static_assert(FloatToE5M2(-57344.f) == 0xFB);
static_assert(E5M2ToFloat(0x3C) == 1.f);

}  // namespace
}  // namespace qshard
