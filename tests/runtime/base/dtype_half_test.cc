// Tests of runtime/base/{dtype,half,tensor}: bfloat16 / float16 conversions checked
// exhaustively against an independent double-based decoder, dtype tables and parsers, and
// Tensor views.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "runtime/base/tensor.h"

namespace qshard {
namespace {

// ---------------------------------------------------------------------------
// Independent reference decoders: the value of a code, computed with double arithmetic from
// the IEEE field definitions (no bit reinterpretation into float).
// ---------------------------------------------------------------------------
double DecodeBinary(uint16_t code, int exp_bits, int mant_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const uint32_t exp_mask = (1u << exp_bits) - 1;
  const bool negative = (code >> (exp_bits + mant_bits)) & 1u;
  const uint32_t exp = (code >> mant_bits) & exp_mask;
  const uint32_t mant = code & ((1u << mant_bits) - 1);
  double magnitude;
  if (exp == exp_mask) {
    magnitude = mant == 0 ? std::numeric_limits<double>::infinity()
                          : std::numeric_limits<double>::quiet_NaN();
  } else if (exp == 0) {
    magnitude = std::ldexp(static_cast<double>(mant), 1 - bias - mant_bits);
  } else {
    magnitude = std::ldexp(static_cast<double>(mant + (1u << mant_bits)),
                           static_cast<int>(exp) - bias - mant_bits);
  }
  return negative ? -magnitude : magnitude;
}

double DecodeBf16(uint16_t code) { return DecodeBinary(code, 8, 7); }
double DecodeF16(uint16_t code) { return DecodeBinary(code, 5, 10); }

bool IsNanCode(uint16_t code, int exp_bits, int mant_bits) {
  const uint32_t exp_mask = (1u << exp_bits) - 1;
  return ((code >> mant_bits) & exp_mask) == exp_mask && (code & ((1u << mant_bits) - 1)) != 0;
}

uint32_t FloatBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The code a correctly rounded (nearest, ties to even) conversion of `x` must give. `values`
// are the magnitudes of the positive codes 0..inf_code in increasing order, where the
// infinity code stands for 2^(emax+1) (IEEE overflow: anything at or beyond half an ulp
// above the largest finite value rounds to infinity).
uint16_t ReferenceRound(double x, const std::vector<double>& values, uint16_t sign_bit) {
  const uint16_t sign = std::signbit(x) ? sign_bit : 0;
  const double a = std::fabs(x);
  auto it = std::lower_bound(values.begin(), values.end(), a);
  if (it == values.end()) return static_cast<uint16_t>(sign | (values.size() - 1));
  uint16_t hi = static_cast<uint16_t>(it - values.begin());
  if (*it == a || hi == 0) return static_cast<uint16_t>(sign | hi);
  const uint16_t lo = hi - 1;
  const double dlo = a - values[lo];
  const double dhi = values[hi] - a;
  uint16_t pick;
  if (dlo < dhi) {
    pick = lo;
  } else if (dhi < dlo) {
    pick = hi;
  } else {
    pick = (lo & 1u) == 0 ? lo : hi;
  }
  return static_cast<uint16_t>(sign | pick);
}

// Magnitudes of positive codes 0 .. inf_code, the infinity code mapped to 2^(emax+1).
std::vector<double> PositiveValues(double (*decode)(uint16_t), uint16_t inf_code,
                                   double overflow_value) {
  std::vector<double> v;
  for (uint32_t c = 0; c < inf_code; ++c) v.push_back(decode(static_cast<uint16_t>(c)));
  v.push_back(overflow_value);
  return v;
}

// ---------------------------------------------------------------------------
// Decoding: every one of the 65536 codes.
// ---------------------------------------------------------------------------
TEST(HalfTest, Bf16ToF32AllCodes) {
  for (uint32_t c = 0; c <= 0xffff; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    const float got = Bf16ToF32(code);
    const double want = DecodeBf16(code);
    if (IsNanCode(code, 8, 7)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << "code 0x" << c;
      continue;
    }
    ASSERT_EQ(static_cast<double>(got), want) << std::hex << "code 0x" << c;
    ASSERT_EQ(std::signbit(got), (c & 0x8000u) != 0) << std::hex << "code 0x" << c;
  }
}

TEST(HalfTest, F16ToF32AllCodes) {
  int subnormals = 0;
  for (uint32_t c = 0; c <= 0xffff; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    const float got = F16ToF32(code);
    const double want = DecodeF16(code);
    if (IsNanCode(code, 5, 10)) {
      ASSERT_TRUE(std::isnan(got)) << std::hex << "code 0x" << c;
      continue;
    }
    ASSERT_EQ(static_cast<double>(got), want) << std::hex << "code 0x" << c;
    ASSERT_EQ(std::signbit(got), (c & 0x8000u) != 0) << std::hex << "code 0x" << c;
    if ((c & 0x7c00u) == 0 && (c & 0x3ffu) != 0) ++subnormals;
  }
  EXPECT_EQ(subnormals, 2 * 1023);
  // Spot values, independent of the decoder above.
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToF32(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(F16ToF32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_EQ(F16ToF32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(F16ToF32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(Bf16ToF32(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToF32(0x7f7f), 0x1.fep127f);
  EXPECT_EQ(Bf16ToF32(0x0001), std::ldexp(1.0f, -133));
}

// ---------------------------------------------------------------------------
// Encoding: every code round-trips; the midpoints between neighbouring codes round to the
// even one, and one float ulp either side of a midpoint rounds to the nearer code.
// ---------------------------------------------------------------------------
TEST(HalfTest, F32ToBf16RoundTripsEveryCode) {
  for (uint32_t c = 0; c <= 0xffff; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    if (IsNanCode(code, 8, 7)) continue;
    ASSERT_EQ(F32ToBf16(Bf16ToF32(code)), code) << std::hex << "code 0x" << c;
  }
}

TEST(HalfTest, F32ToF16RoundTripsEveryCode) {
  for (uint32_t c = 0; c <= 0xffff; ++c) {
    const uint16_t code = static_cast<uint16_t>(c);
    if (IsNanCode(code, 5, 10)) continue;
    ASSERT_EQ(F32ToF16(F16ToF32(code)), code) << std::hex << "code 0x" << c;
  }
}

TEST(HalfTest, F32ToBf16MidpointsRoundToEven) {
  for (uint32_t c = 0; c < 0x7f80; ++c) {  // every finite positive code and its successor
    for (uint32_t sign : {0u, 0x8000u}) {
      const uint16_t lo = static_cast<uint16_t>(sign | c);
      const uint16_t hi = static_cast<uint16_t>(sign | (c + 1));
      const double vlo = DecodeBf16(lo);
      const double vhi = DecodeBf16(hi);
      // The midpoint, as a value: exact in float (bf16 has 8 significant bits).
      const double mid_value =
          std::isinf(vhi) ? vlo + (vlo - DecodeBf16(lo - 1)) / 2 : (vlo + vhi) / 2;
      const float mid = static_cast<float>(mid_value);
      ASSERT_EQ(static_cast<double>(mid), mid_value) << std::hex << "code 0x" << c;
      const uint16_t even = (lo & 1u) == 0 ? lo : hi;
      ASSERT_EQ(F32ToBf16(mid), even) << std::hex << "midpoint above 0x" << lo;
      const float below = std::nextafter(mid, 0.0f);
      const float above = std::nextafter(mid, sign ? -INFINITY : INFINITY);
      ASSERT_EQ(F32ToBf16(below), lo) << std::hex << "just below midpoint above 0x" << lo;
      ASSERT_EQ(F32ToBf16(above), hi) << std::hex << "just above midpoint above 0x" << lo;
    }
  }
}

TEST(HalfTest, F32ToF16MidpointsRoundToEven) {
  for (uint32_t c = 0; c < 0x7c00; ++c) {
    for (uint32_t sign : {0u, 0x8000u}) {
      const uint16_t lo = static_cast<uint16_t>(sign | c);
      const uint16_t hi = static_cast<uint16_t>(sign | (c + 1));
      const double vlo = DecodeF16(lo);
      const double vhi = std::isinf(DecodeF16(hi)) ? (sign ? -65536.0 : 65536.0) : DecodeF16(hi);
      const double mid_value = (vlo + vhi) / 2;
      const float mid = static_cast<float>(mid_value);
      ASSERT_EQ(static_cast<double>(mid), mid_value) << std::hex << "code 0x" << c;
      const uint16_t even = (lo & 1u) == 0 ? lo : hi;
      ASSERT_EQ(F32ToF16(mid), even) << std::hex << "midpoint above 0x" << lo;
      const float below = std::nextafter(mid, 0.0f);
      const float above = std::nextafter(mid, sign ? -INFINITY : INFINITY);
      ASSERT_EQ(F32ToF16(below), lo) << std::hex << "just below midpoint above 0x" << lo;
      ASSERT_EQ(F32ToF16(above), hi) << std::hex << "just above midpoint above 0x" << lo;
    }
  }
}

// Random float bit patterns of every exponent against a nearest-even search over the
// decoded code values.
TEST(HalfTest, RandomFloatsRoundToNearestEven) {
  const std::vector<double> bf16_values = PositiveValues(DecodeBf16, 0x7f80, std::ldexp(1.0, 128));
  const std::vector<double> f16_values = PositiveValues(DecodeF16, 0x7c00, 65536.0);
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> bits_dist;
  for (int i = 0; i < 300000; ++i) {
    const float f = BitsToFloat(bits_dist(rng));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToBf16(f), ReferenceRound(f, bf16_values, 0x8000))
        << std::hexfloat << f << std::hex << " bits 0x" << FloatBits(f);
    ASSERT_EQ(F32ToF16(f), ReferenceRound(f, f16_values, 0x8000))
        << std::hexfloat << f << std::hex << " bits 0x" << FloatBits(f);
  }
  // Values near the f16 range, where overflow and subnormals happen.
  std::uniform_real_distribution<float> small(-7e-5f, 7e-5f);
  std::uniform_real_distribution<float> large(-70000.0f, 70000.0f);
  for (int i = 0; i < 100000; ++i) {
    for (float f : {small(rng), large(rng)}) {
      ASSERT_EQ(F32ToF16(f), ReferenceRound(f, f16_values, 0x8000)) << std::hexfloat << f;
      ASSERT_EQ(F32ToBf16(f), ReferenceRound(f, bf16_values, 0x8000)) << std::hexfloat << f;
    }
  }
}

TEST(HalfTest, F16OverflowAndSpecialValues) {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(F32ToF16(65504.0f), 0x7bff);
  EXPECT_EQ(F32ToF16(65519.996f), 0x7bff);  // just under the midpoint to 2^16
  EXPECT_EQ(F32ToF16(65520.0f), 0x7c00);    // the midpoint rounds to even: infinity
  EXPECT_EQ(F32ToF16(-65520.0f), 0xfc00);
  EXPECT_EQ(F32ToF16(1e6f), 0x7c00);
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::max()), 0x7c00);
  EXPECT_EQ(F32ToF16(-std::numeric_limits<float>::max()), 0xfc00);
  EXPECT_EQ(F32ToF16(inf), 0x7c00);
  EXPECT_EQ(F32ToF16(-inf), 0xfc00);
  EXPECT_EQ(F32ToF16(0.0f), 0x0000);
  EXPECT_EQ(F32ToF16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  // Subnormal results: 2^-24 is the smallest; 2^-25 is a tie with zero (even: zero).
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(F32ToF16(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(F32ToF16(-std::ldexp(3.0f, -25)), 0x8002);    // 1.5 ulps: tie, even is 2
  EXPECT_EQ(F32ToF16(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up into the normals
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(F32ToF16(-std::numeric_limits<float>::denorm_min()), 0x8000);
  EXPECT_EQ(F32ToF16(1e-30f), 0x0000);

  EXPECT_EQ(F32ToBf16(inf), 0x7f80);
  EXPECT_EQ(F32ToBf16(-inf), 0xff80);
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds past bf16 max
  EXPECT_EQ(F32ToBf16(0x1.fep127f), 0x7f7f);
  EXPECT_EQ(F32ToBf16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToBf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(F32ToBf16(BitsToFloat(0x00008000u)), 0x0000);  // tie between 0 and 0x0001
  EXPECT_EQ(F32ToBf16(BitsToFloat(0x00018000u)), 0x0002);  // tie between 1 and 2
}

TEST(HalfTest, NanStaysNan) {
  const std::vector<uint32_t> nans = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u,
                                      0x7fbfffffu, 0x7f810000u, 0x7fffffffu, 0x7f802000u};
  for (uint32_t bits : nans) {
    const float f = BitsToFloat(bits);
    ASSERT_TRUE(std::isnan(f));
    const uint16_t b = F32ToBf16(f);
    EXPECT_TRUE(IsNanCode(b, 8, 7)) << std::hex << "bits 0x" << bits << " -> 0x" << b;
    EXPECT_TRUE(std::isnan(Bf16ToF32(b)));
    EXPECT_EQ((b & 0x8000u) != 0, (bits & 0x80000000u) != 0);
    const uint16_t h = F32ToF16(f);
    EXPECT_TRUE(IsNanCode(h, 5, 10)) << std::hex << "bits 0x" << bits << " -> 0x" << h;
    EXPECT_TRUE(std::isnan(F16ToF32(h)));
    EXPECT_EQ((h & 0x8000u) != 0, (bits & 0x80000000u) != 0);
  }
}

// ---------------------------------------------------------------------------
// DType tables and parsers.
// ---------------------------------------------------------------------------
struct DTypeRow {
  DType type;
  size_t size;
  const char* name;
  const char* safetensors;
  bool floating;
};

const DTypeRow kRows[] = {
    {DType::kF32, 4, "float32", "F32", true},
    {DType::kF16, 2, "float16", "F16", true},
    {DType::kBF16, 2, "bfloat16", "BF16", true},
    {DType::kF64, 8, "float64", "F64", true},
    {DType::kF8E4M3, 1, "float8_e4m3fn", "F8_E4M3", true},
    {DType::kF8E5M2, 1, "float8_e5m2", "F8_E5M2", true},
    {DType::kI8, 1, "int8", "I8", false},
    {DType::kU8, 1, "uint8", "U8", false},
    {DType::kI16, 2, "int16", "I16", false},
    {DType::kU16, 2, "uint16", "U16", false},
    {DType::kI32, 4, "int32", "I32", false},
    {DType::kU32, 4, "uint32", "U32", false},
    {DType::kI64, 8, "int64", "I64", false},
    {DType::kU64, 8, "uint64", "U64", false},
    {DType::kBool, 1, "bool", "BOOL", false},
};

TEST(DTypeTest, SizesNamesAndSafetensorsRoundTrip) {
  for (const DTypeRow& row : kRows) {
    SCOPED_TRACE(row.name);
    EXPECT_EQ(DTypeSize(row.type), row.size);
    EXPECT_EQ(DTypeName(row.type), row.name);
    EXPECT_EQ(SafetensorsDTypeName(row.type), row.safetensors);
    EXPECT_EQ(IsFloatingPoint(row.type), row.floating);
    absl::StatusOr<DType> parsed = ParseSafetensorsDType(SafetensorsDTypeName(row.type));
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    EXPECT_EQ(*parsed, row.type);
    if (row.floating) {
      absl::StatusOr<DType> torch = ParseTorchDType(DTypeName(row.type));
      ASSERT_TRUE(torch.ok()) << torch.status();
      EXPECT_EQ(*torch, row.type);
    }
  }
}

TEST(DTypeTest, SafetensorsRejectsUnknownWithSpellings) {
  for (const char* bad : {"bf16", "FP16", "F8", "", "BF16 ", "float32"}) {
    absl::StatusOr<DType> parsed = ParseSafetensorsDType(bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string message(parsed.status().message());
    EXPECT_NE(message.find(std::string("'") + bad + "'"), std::string::npos) << message;
    EXPECT_NE(message.find("BF16"), std::string::npos) << message;
    EXPECT_NE(message.find("F8_E5M2"), std::string::npos) << message;
  }
}

TEST(DTypeTest, TorchDTypeAliases) {
  const std::vector<std::pair<std::string, DType>> cases = {
      {"bfloat16", DType::kBF16},
      {"bf16", DType::kBF16},
      {"torch.bfloat16", DType::kBF16},
      {"BFloat16", DType::kBF16},
      {"float16", DType::kF16},
      {"fp16", DType::kF16},
      {"half", DType::kF16},
      {"torch.float16", DType::kF16},
      {"float32", DType::kF32},
      {"fp32", DType::kF32},
      {"float", DType::kF32},
      {"FLOAT32", DType::kF32},
      {"float64", DType::kF64},
      {"double", DType::kF64},
      {"fp8", DType::kF8E4M3},
      {"fp8_e4m3", DType::kF8E4M3},
      {"float8_e4m3", DType::kF8E4M3},
      {"float8_e4m3fn", DType::kF8E4M3},
      {"fp8_e5m2", DType::kF8E5M2},
      {"torch.float8_e5m2", DType::kF8E5M2},
  };
  for (const auto& [text, want] : cases) {
    absl::StatusOr<DType> got = ParseTorchDType(text);
    ASSERT_TRUE(got.ok()) << text << ": " << got.status();
    EXPECT_EQ(*got, want) << text;
  }
  for (const char* bad : {"int8", "", "torch.", "bfloat", "float8", "auto"}) {
    absl::StatusOr<DType> got = ParseTorchDType(bad);
    ASSERT_FALSE(got.ok()) << bad;
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string message(got.status().message());
    EXPECT_NE(message.find(std::string("'") + bad + "'"), std::string::npos) << message;
    EXPECT_NE(message.find("bfloat16"), std::string::npos) << message;
  }
}

// ---------------------------------------------------------------------------
// Tensor.
// ---------------------------------------------------------------------------
TEST(TensorTest, ShapeHelpers) {
  EXPECT_EQ(NumElements({}), 1);
  EXPECT_EQ(NumElements({3, 0, 5}), 0);
  EXPECT_EQ(NumElements({2, 3, 4}), 24);
  EXPECT_EQ(ShapeToString({384, 1024}), "[384, 1024]");
  EXPECT_EQ(ShapeToString({}), "[]");
  EXPECT_EQ(ShapeToString({7}), "[7]");
}

TEST(TensorTest, EmptyIsZeroedAlignedAndOwned) {
  Tensor t = Tensor::Empty(DType::kBF16, {3, 5});
  EXPECT_EQ(t.dtype(), DType::kBF16);
  EXPECT_EQ(t.rank(), 2);
  EXPECT_EQ(t.dim(0), 3);
  EXPECT_EQ(t.dim(1), 5);
  EXPECT_EQ(t.dim(-1), 5);
  EXPECT_EQ(t.dim(-2), 3);
  EXPECT_EQ(t.numel(), 15);
  EXPECT_EQ(t.nbytes(), 30u);
  EXPECT_EQ(t.device(), Device::kCpu);
  ASSERT_NE(t.raw(), nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 64, 0u);
  EXPECT_TRUE(t.defined());
  EXPECT_FALSE(t.empty());
  ASSERT_NE(t.owner(), nullptr);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(t.data<uint16_t>()[i], 0) << i;

  Tensor none = Tensor::Empty(DType::kF32, {0, 8});
  EXPECT_EQ(none.numel(), 0);
  EXPECT_EQ(none.nbytes(), 0u);
  EXPECT_TRUE(none.defined());
  EXPECT_TRUE(none.empty());

  Tensor def;
  EXPECT_TRUE(def.empty());
}

TEST(TensorTest, RowsIsAViewSharingOwnership) {
  Tensor rows;
  {
    Tensor t = Tensor::Empty(DType::kF32, {6, 4});
    for (int i = 0; i < 24; ++i) t.data<float>()[i] = static_cast<float>(i);
    rows = t.Rows(2, 5);
    EXPECT_EQ(rows.shape(), (Shape{3, 4}));
    EXPECT_EQ(rows.dtype(), DType::kF32);
    EXPECT_EQ(rows.data<float>(), t.data<float>() + 8);
    EXPECT_EQ(rows.owner(), t.owner());
    EXPECT_EQ(t.owner().use_count(), 2);
    // Writes through the view land in the parent.
    rows.data<float>()[0] = -1.0f;
    EXPECT_EQ(t.data<float>()[8], -1.0f);
    Tensor tail = t.Rows(6, 6);
    EXPECT_EQ(tail.shape(), (Shape{0, 4}));
    EXPECT_EQ(tail.numel(), 0);
    Tensor all = t.Rows(0, 6);
    EXPECT_EQ(all.raw(), t.raw());
  }
  // The parent is gone; the view keeps the memory alive (ASan checks the reads).
  EXPECT_EQ(rows.data<float>()[0], -1.0f);
  EXPECT_EQ(rows.data<float>()[11], 19.0f);
  EXPECT_EQ(rows.owner().use_count(), 1);
}

TEST(TensorTest, RowsOfHigherRankAndNarrowTypes) {
  Tensor t = Tensor::Empty(DType::kBF16, {4, 3, 5});
  Tensor r = t.Rows(1, 3);
  EXPECT_EQ(r.shape(), (Shape{2, 3, 5}));
  EXPECT_EQ(static_cast<uint8_t*>(r.raw()) - static_cast<uint8_t*>(t.raw()), 1 * 3 * 5 * 2);
  Tensor v = Tensor::Empty(DType::kI64, {10});
  Tensor vr = v.Rows(7, 9);
  EXPECT_EQ(vr.shape(), (Shape{2}));
  EXPECT_EQ(vr.data<int64_t>(), v.data<int64_t>() + 7);
  // A view of a view.
  Tensor rr = r.Rows(1, 2);
  EXPECT_EQ(static_cast<uint8_t*>(rr.raw()) - static_cast<uint8_t*>(t.raw()), 2 * 3 * 5 * 2);
  EXPECT_EQ(rr.shape(), (Shape{1, 3, 5}));
}

TEST(TensorTest, ReshapeSharesMemory) {
  Tensor t = Tensor::Empty(DType::kF16, {4, 6});
  Tensor r = t.Reshape({2, 3, 4});
  EXPECT_EQ(r.raw(), t.raw());
  EXPECT_EQ(r.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(r.dtype(), DType::kF16);
  EXPECT_EQ(r.nbytes(), t.nbytes());
  EXPECT_EQ(r.owner(), t.owner());
  Tensor flat = r.Reshape({24});
  EXPECT_EQ(flat.rank(), 1);
  EXPECT_EQ(flat.raw(), t.raw());
  // Rows of a reshaped view step by the new row size.
  Tensor rows = t.Reshape({8, 3}).Rows(5, 8);
  EXPECT_EQ(static_cast<uint8_t*>(rows.raw()) - static_cast<uint8_t*>(t.raw()), 5 * 3 * 2);
}

TEST(TensorTest, NonOwningView) {
  float buf[6] = {1, 2, 3, 4, 5, 6};
  Tensor t(DType::kF32, {3, 2}, buf, nullptr, Device::kCuda);
  EXPECT_EQ(t.device(), Device::kCuda);
  EXPECT_EQ(t.owner(), nullptr);
  Tensor r = t.Rows(1, 2);
  EXPECT_EQ(r.data<float>(), buf + 2);
  EXPECT_EQ(r.device(), Device::kCuda);
  EXPECT_EQ(t.Reshape({6}).device(), Device::kCuda);
}

}  // namespace
}  // namespace qshard
