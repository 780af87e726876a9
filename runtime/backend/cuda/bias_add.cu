// y[m, n] += bias[n]: one thread per element, grid-stride, fp32 add.
#include <cuda_bf16.h>

#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/bias_add.h"
#include "runtime/backend/cuda/cuda_check.h"

namespace qshard::cuda {
namespace {

__device__ __forceinline__ float Load(const float* p) { return *p; }
__device__ __forceinline__ float Load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void Store(float* p, float v) { *p = v; }
__device__ __forceinline__ void Store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__global__ void AddBiasKernel(T* y, const float* __restrict__ bias, int64_t total, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Store(y + i, Load(y + i) + bias[i % n]);
  }
}

}  // namespace

absl::Status LaunchAddBias(void* y, DType y_dtype, const float* bias, int64_t m, int64_t n,
                           cudaStream_t stream) {
  if (m < 0 || n <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("AddBias: bad shape [", m, ", ", n, "]"));
  }
  const int64_t total = m * n;
  if (total == 0) return absl::OkStatus();
  if (y == nullptr || bias == nullptr) return absl::InvalidArgumentError("AddBias: null pointer");
  constexpr int kThreads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  if (y_dtype == DType::kF32) {
    AddBiasKernel<<<blocks, kThreads, 0, stream>>>(static_cast<float*>(y), bias, total, n);
  } else if (y_dtype == DType::kBF16) {
    AddBiasKernel<<<blocks, kThreads, 0, stream>>>(static_cast<__nv_bfloat16*>(y), bias, total, n);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("AddBias: output must be float32 or bfloat16, got ",
                                                   std::string(DTypeName(y_dtype))));
  }
  QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace qshard::cuda
