// File: device_convert.cuh
// fp32 <-> storage conversions and the 16-byte vector type shared by the element-wise kernels (device code only; include
// from .cu files). Every kernel computes in fp32 and rounds once, to nearest even, on store
// — the same rounding as the CPU's F32ToBf16 / F32ToF16, so GPU and CPU agree bit for bit
// wherever they do the same fp32 arithmetic.
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_DEVICE_CONVERT_CUH_
#define QSHARD_RUNTIME_BACKEND_CUDA_DEVICE_CONVERT_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qshard::cuda {

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToF32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromF32(float v);
template <>
__device__ __forceinline__ float FromF32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromF32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromF32<__half>(float v) {
  return __float2half_rn(v);
}

// kVec consecutive elements moved as one aligned access of kVec * sizeof(T) <= 16 bytes.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_DEVICE_CONVERT_CUH_
