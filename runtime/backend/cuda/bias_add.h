// File: bias_add.h
// y[m, n] += bias[n] for the Linear layers that have a bias (Qwen-style q/k/v; Llama has
// none). A separate pass rather than a GEMM epilogue: every Linear kernel stays bias-free
// and the pass costs one read + write of y, small next to streaming the weights.
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_BIAS_ADD_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_BIAS_ADD_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "runtime/base/dtype.h"

namespace qshard::cuda {

// y: [m, n] device, f32 or bf16 (updated in place, fp32 add then one rounding);
// bias: fp32 [n] device.
absl::Status LaunchAddBias(void* y, DType y_dtype, const float* bias, int64_t m, int64_t n,
                           cudaStream_t stream);

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_BIAS_ADD_H_
