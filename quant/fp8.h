// File: fp8.h
// FP8 number formats: float8 e4m3fn and float8 e5m2, scalar and vector conversions.
//
//   uint8_t q = FloatToE4M3(x * inv_scale);     // round to nearest even, saturating at 448
//   float y = E4M3ToFloat(q) * scale;            // table lookup
//   QuantizeE4M3(k, n, 1.0f / k_scale, k_fp8);   // a whole KV row
//
// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits. No infinities; NaN only at S.1111.111
//   (0x7F / 0xFF); max finite 1.75 * 2^8 = 448; min normal 2^-6; min subnormal 2^-9.
// e5m2: 1 sign, 5 exponent (bias 15), 2 mantissa bits, IEEE-like: exponent 31 holds +-inf
//   (mantissa 0) and NaNs; max finite 1.75 * 2^15 = 57344; min subnormal 2^-16.
//
// Conversions from float round to nearest, ties to even. They saturate by default (like
// CUDA's __NV_SATFINITE): a finite value or infinity beyond the largest finite value becomes
// +-max, so a KV cache or weight never holds a NaN because of an outlier; NaN stays NaN.
// FloatToE5M2NoSat is the IEEE behaviour (overflow -> +-inf) for callers that want to see it.
#ifndef QSHARD_QUANT_FP8_H_
#define QSHARD_QUANT_FP8_H_

#include <array>
#include <bit>
#include <cstdint>
#include <limits>

namespace qshard {

inline constexpr float kE4M3Max = 448.f;
inline constexpr float kE5M2Max = 57344.f;

namespace fp8_internal {

// The float value of every code of a format with `kExpBits` / `kManBits` and IEEE-style
// bias, built at compile time so decoding is one load. `kIeeeSpecials`: the top exponent
// holds inf/NaN (e5m2); otherwise only the all-ones code is NaN (e4m3fn).
template <int kExpBits, int kManBits, bool kIeeeSpecials>
constexpr std::array<float, 256> MakeDecodeTable() {
  constexpr int kBias = (1 << (kExpBits - 1)) - 1;
  constexpr int kExpMax = (1 << kExpBits) - 1;
  std::array<float, 256> table{};
  for (int code = 0; code < 256; ++code) {
    const uint32_t sign = static_cast<uint32_t>(code >> 7) << 31;
    const int exp = (code >> kManBits) & kExpMax;
    const uint32_t man = static_cast<uint32_t>(code & ((1 << kManBits) - 1));
    uint32_t bits;
    if (kIeeeSpecials && exp == kExpMax) {
      bits = sign | 0x7F800000u | (man << (23 - kManBits));  // inf (man 0) or NaN
    } else if (!kIeeeSpecials && exp == kExpMax && man == (1u << kManBits) - 1) {
      bits = sign | 0x7FC00000u;  // the single NaN pattern of a "fn" format
    } else if (exp == 0) {
      // Subnormal: man * 2^(1 - bias - kManBits). Exact in float: at most 3 significant bits.
      float v = static_cast<float>(man);
      for (int i = 0; i < kBias - 1 + kManBits; ++i) v *= 0.5f;
      bits = sign | std::bit_cast<uint32_t>(v);
    } else {
      bits = sign | (static_cast<uint32_t>(exp - kBias + 127) << 23) | (man << (23 - kManBits));
    }
    table[code] = std::bit_cast<float>(bits);
  }
  return table;
}

inline constexpr std::array<float, 256> kE4M3Table = MakeDecodeTable<4, 3, false>();
inline constexpr std::array<float, 256> kE5M2Table = MakeDecodeTable<5, 2, true>();

// Rounds |x| (given as float bits without the sign, finite, not NaN) to the code of a format
// with `kManBits` mantissa bits and bias `kBias`, to nearest even. The result may exceed the
// format's largest finite code (callers clamp): a carry out of the mantissa moves to the next
// exponent, which is exactly how the binade boundary and overflow should round.
template <int kManBits, int kBias>
constexpr uint32_t RoundMagnitude(uint32_t abs_bits) {
  if (abs_bits == 0) return 0;
  const int exp = static_cast<int>(abs_bits >> 23) - 127;  // float subnormals: -127
  constexpr int kMinNormalExp = 1 - kBias;
  // Bits of the 24-bit float significand to drop: the format's mantissa width, plus the
  // distance below its smallest normal exponent (subnormal results keep fewer bits).
  const int shift = (23 - kManBits) + (exp < kMinNormalExp ? kMinNormalExp - exp : 0);
  // With shift >= 25 the value is below half the smallest subnormal: rounds to zero.
  // (This also covers every float subnormal.)
  if (shift >= 25) return 0;
  const uint32_t significand = (abs_bits & 0x7FFFFFu) | 0x800000u;
  uint32_t q = significand >> shift;
  const uint32_t rem = significand & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  if (exp < kMinNormalExp) return q;  // subnormal code; q == 2^kManBits is the min normal
  // q holds the implicit leading one at bit kManBits; adding it to (exp field - 1) << kManBits
  // gives the code, and a rounding carry (q == 2^(kManBits+1)) bumps the exponent.
  return (static_cast<uint32_t>(exp + kBias - 1) << kManBits) + q;
}

}  // namespace fp8_internal

// float8 e4m3fn, saturating: |x| beyond 448 (or infinite) -> +-448 (0x7E / 0xFE); NaN -> 0x7F
// (with the sign of x).
constexpr uint8_t FloatToE4M3(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Fu);   // NaN
  if (abs == 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Eu);  // inf saturates
  uint32_t code = fp8_internal::RoundMagnitude<3, 7>(abs);
  if (code > 0x7Eu) code = 0x7Eu;  // 0x7F is NaN, everything above is out of range
  return static_cast<uint8_t>(sign | code);
}

constexpr float E4M3ToFloat(uint8_t code) { return fp8_internal::kE4M3Table[code]; }

// float8 e5m2, saturating: |x| beyond 57344 (or infinite) -> +-57344 (0x7B / 0xFB); NaN -> 0x7E.
constexpr uint8_t FloatToE5M2(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Eu);  // quiet NaN
  if (abs == 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Bu);
  uint32_t code = fp8_internal::RoundMagnitude<2, 15>(abs);
  if (code > 0x7Bu) code = 0x7Bu;
  return static_cast<uint8_t>(sign | code);
}

// float8 e5m2 with IEEE overflow: a value that rounds past 57344 (|x| >= 61440) -> +-inf.
constexpr uint8_t FloatToE5M2NoSat(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t abs = bits & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint8_t>(sign | 0x7Eu);
  uint32_t code = abs == 0x7F800000u ? 0x7Cu : fp8_internal::RoundMagnitude<2, 15>(abs);
  if (code > 0x7Cu) code = 0x7Cu;  // every code past +inf would be a NaN: clamp to inf
  return static_cast<uint8_t>(sign | code);
}

constexpr float E5M2ToFloat(uint8_t code) { return fp8_internal::kE5M2Table[code]; }

constexpr bool IsE4M3NaN(uint8_t code) { return (code & 0x7Fu) == 0x7Fu; }
constexpr bool IsE5M2NaN(uint8_t code) { return (code & 0x7Fu) > 0x7Cu; }

// out[i] = FloatToE4M3(x[i] * inv_scale). Scales are passed inverted because the hot path
// quantizes many values with one scale and a multiply is cheaper than a divide.
void QuantizeE4M3(const float* x, int64_t n, float inv_scale, uint8_t* out);
// out[i] = E4M3ToFloat(q[i]) * scale.
void DequantizeE4M3(const uint8_t* q, int64_t n, float scale, float* out);
void QuantizeE5M2(const float* x, int64_t n, float inv_scale, uint8_t* out);
void DequantizeE5M2(const uint8_t* q, int64_t n, float scale, float* out);

// The largest |x[i]| (NaNs ignored), for computing a scale = amax / kE4M3Max.
float AbsMax(const float* x, int64_t n);

}  // namespace qshard

#endif  // QSHARD_QUANT_FP8_H_
