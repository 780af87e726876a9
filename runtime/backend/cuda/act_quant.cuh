// File: act_quant.cuh
// Per-token fp8 (e4m3) activation quantization arithmetic shared by the kernels that
// quantize activations: the fp8 linear's own quantize kernel (fp8_linear.cu) and the
// kernels that can produce a quantized copy of their output on the side (RMSNorm,
// SiLU-and-mul). One definition, so every producer gives the same bits as the CPU
// (quant/fp8.h) and as each other. Device code only; include from .cu files.
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_ACT_QUANT_CUH_
#define QSHARD_RUNTIME_BACKEND_CUDA_ACT_QUANT_CUH_

#include <cuda_bf16.h>

#include <cstdint>

#include "runtime/backend/cuda/device_convert.cuh"

namespace qshard::cuda {

// Bit-exact e4m3 encoding with round to nearest even and saturation to +-448 (the device
// twin of quant/fp8.h FloatToE4M3).
__device__ __forceinline__ uint32_t FloatToE4M3Device(float x) {
  const uint32_t bits = __float_as_uint(x);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return sign | 0x7Fu;   // NaN
  if (mag == 0x7F800000u) return sign | 0x7Eu;  // inf saturates
  if (mag == 0) return sign;
  const int e = static_cast<int>(mag >> 23) - 127;
  constexpr int kMinNormalExp = -6;  // 1 - bias 7
  const int shift = 20 + (e < kMinNormalExp ? kMinNormalExp - e : 0);
  if (shift >= 25) return sign;  // below half the smallest subnormal (float subnormals too)
  const uint32_t sig = (mag & 0x7FFFFFu) | 0x800000u;
  uint32_t q = sig >> shift;
  const uint32_t rem = sig & ((1u << shift) - 1u);
  const uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  // Subnormal: q is the code (q == 8 is the smallest normal); normal: q holds the implicit
  // one at bit 3, so (exponent field - 1) << 3 plus q is the code and a rounding carry
  // moves to the next binade.
  uint32_t code = e < kMinNormalExp ? q : (static_cast<uint32_t>(e + 7 - 1) << 3) + q;
  if (code > 0x7Eu) code = 0x7Eu;
  return sign | code;
}

// The per-token scale for a row whose largest |value| is amax: codes = value / scale.
// IEEE division (no fast-math), as the CPU.
__device__ __forceinline__ float Fp8PerTokenScale(float amax) {
  return fmaxf(amax, 1e-12f) / 448.0f;
}

// Largest `v` over the block (NaN dropped, as fmaxf does); every thread gets it.
// blockDim.x a multiple of 32. Uses its own shared slots; call it at most once per kernel.
__device__ __forceinline__ float BlockMax(float v) {
  __shared__ float warp_max[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x >> 5;
    float m = lane < num_warps ? warp_max[lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    if (lane == 0) total = m;
  }
  __syncthreads();
  return total;
}

// The fp8 side output of a row-wise kernel (one block per row) that has just stored the
// bf16 row `row` [d]: codes[d] (e4m3) and *scale, per-token, with exactly the fp8 linear's
// quantize kernel's arithmetic, so the linear can skip that kernel. amax: this thread's
// largest |stored value|; thread t must have stored vectors t, t + blockDim.x, ... of kVec
// elements (it re-reads only its own writes, so no barrier is needed before this).
template <int kVec>
__device__ __forceinline__ void QuantizeStoredRow(const __nv_bfloat16* row, int d, float amax,
                                                  uint8_t* codes, float* scale) {
  const float s = Fp8PerTokenScale(BlockMax(amax));
  if (threadIdx.x == 0) *scale = s;
  const int num_vecs = d / kVec;
  for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    const Pack<__nv_bfloat16, kVec> x =
        *reinterpret_cast<const Pack<__nv_bfloat16, kVec>*>(row + v * kVec);
    Pack<uint8_t, kVec> c;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      c.v[i] = static_cast<uint8_t>(FloatToE4M3Device(__bfloat162float(x.v[i]) / s));
    }
    *reinterpret_cast<Pack<uint8_t, kVec>*>(codes + v * kVec) = c;
  }
}

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_ACT_QUANT_CUH_
