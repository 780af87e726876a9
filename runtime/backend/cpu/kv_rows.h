// File: kv_rows.h
// Conversion of one K or V row (head_dim values) between fp32 activations and the KV
// cache's storage dtype. FP8 rows hold code = fp8(value / scale) with one fp32 scale per
// layer and per K / V, so value = decode(code) * scale.
#ifndef QSHARD_RUNTIME_BACKEND_CPU_KV_ROWS_H_
#define QSHARD_RUNTIME_BACKEND_CPU_KV_ROWS_H_

#include <cstdint>

#include "runtime/base/dtype.h"

namespace qshard::cpu {

// True for the dtypes the CPU KV cache can hold.
bool IsSupportedKvDType(DType dt);
// dst (storage) <- src (fp32 [n]); scale is used by fp8 only.
void StoreKvRow(DType dt, const float* src, int64_t n, float scale, void* dst);
// dst (fp32 [n]) <- src (storage).
void LoadKvRow(DType dt, const void* src, int64_t n, float scale, float* dst);
// The largest finite value of an fp8 storage dtype (448 or 57344), 0 for others.
float Fp8MaxValue(DType dt);

}  // namespace qshard::cpu

#endif  // QSHARD_RUNTIME_BACKEND_CPU_KV_ROWS_H_
