// File: rope.cuh
// The rotation of one RoPE pair, shared by the RoPE kernel (elementwise.cu) and the fused
// q|k|v split + RoPE + KV write kernel (attention.cu) so both produce the same bits (device
// code only; include from .cu files).
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_ROPE_CUH_
#define QSHARD_RUNTIME_BACKEND_CUDA_ROPE_CUH_

#include <cstdint>

namespace qshard::cuda {

// Rotates the pair (x1, x2) = (x[i], x[i + head_dim / 2]) of a head at `position` by
// angle position * inv_freq_i (HF rotate-half layout). The angle is __fmul_rn, exactly the
// CPU's fp32 product (no contraction into a later FMA); cos / sin come from the accurate
// sincosf (the CPU takes them in double from the same fp32 angle). The two outputs are
// written with explicit roundings (__fmul_rn, __fmaf_rn) so that every kernel that calls
// this function gets the same bits, whatever contraction the compiler would have chosen.
__device__ __forceinline__ void RopeRotatePair(int32_t position, float inv_freq_i, float x1,
                                               float x2, float* y1, float* y2) {
  const float angle = __fmul_rn(static_cast<float>(position), inv_freq_i);
  float s, c;
  sincosf(angle, &s, &c);
  *y1 = __fmaf_rn(x1, c, -__fmul_rn(x2, s));  // x1 cos - x2 sin
  *y2 = __fmaf_rn(x2, c, __fmul_rn(x1, s));   // x2 cos + x1 sin
}

// The (token t, head h, pair i) of flat index idx = (t * heads + h) * half + i, the
// layout of one thread per RoPE pair that both kernels walk in grid-stride loops.
struct RopePairIndex {
  int64_t t;
  int h;
  int i;
};
__device__ __forceinline__ RopePairIndex SplitRopePairIndex(int64_t idx, int heads, int half) {
  const int64_t th = idx / half;
  return {th / heads, static_cast<int>(th % heads), static_cast<int>(idx % half)};
}

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_ROPE_CUH_
