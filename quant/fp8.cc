#include "quant/fp8.h"

#include <cmath>

namespace qshard {

// Plain loops: the scalar conversions are branch-light inline integer code, and the
// dequantize loops are a table load and a multiply, which the compiler keeps tight. The
// attention and GEMM kernels that need more fuse the conversion into their own SIMD code.

void QuantizeE4M3(const float* x, int64_t n, float inv_scale, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = FloatToE4M3(x[i] * inv_scale);
}

void DequantizeE4M3(const uint8_t* q, int64_t n, float scale, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = E4M3ToFloat(q[i]) * scale;
}

void QuantizeE5M2(const float* x, int64_t n, float inv_scale, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = FloatToE5M2(x[i] * inv_scale);
}

void DequantizeE5M2(const uint8_t* q, int64_t n, float scale, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = E5M2ToFloat(q[i]) * scale;
}

float AbsMax(const float* x, int64_t n) {
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a > m) m = a;  // false for NaN, so NaNs are skipped
  }
  return m;
}

}  // namespace qshard
