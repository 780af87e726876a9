#include "runtime/backend/cpu/kv_rows.h"

#include <algorithm>
#include <cassert>

#include "quant/fp8.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/base/half.h"
#include "runtime/base/tensor.h"

namespace qshard::cpu {

bool IsSupportedKvDType(DType dt) {
  return dt == DType::kF32 || dt == DType::kBF16 || dt == DType::kF16 || dt == DType::kF8E4M3 ||
         dt == DType::kF8E5M2;
}

float Fp8MaxValue(DType dt) {
  if (dt == DType::kF8E4M3) return kE4M3Max;
  if (dt == DType::kF8E5M2) return kE5M2Max;
  return 0.0f;
}

void StoreKvRow(DType dt, const float* src, int64_t n, float scale, void* dst) {
  switch (dt) {
    case DType::kF32:
      std::copy(src, src + n, static_cast<float*>(dst));
      return;
    case DType::kBF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = F32ToBf16(src[i]);
      return;
    }
    case DType::kF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = F32ToF16(src[i]);
      return;
    }
    case DType::kF8E4M3:
      // Saturating: values past 448 x scale clamp instead of turning into NaN.
      QuantizeE4M3(src, n, 1.0f / scale, static_cast<uint8_t*>(dst));
      return;
    case DType::kF8E5M2:
      QuantizeE5M2(src, n, 1.0f / scale, static_cast<uint8_t*>(dst));
      return;
    default:
      assert(false && "unsupported KV cache dtype on the CPU backend");
  }
}

void LoadKvRow(DType dt, const void* src, int64_t n, float scale, float* dst) {
  switch (dt) {
    case DType::kF8E4M3:
      DequantizeE4M3(static_cast<const uint8_t*>(src), n, scale, dst);
      return;
    case DType::kF8E5M2:
      DequantizeE5M2(static_cast<const uint8_t*>(src), n, scale, dst);
      return;
    default:
      ToFloat(Tensor(dt, {n}, const_cast<void*>(src), nullptr), dst);
  }
}

}  // namespace qshard::cpu
