// 8-bit weight linears: per-token activation quantization, the small-m tensor-core GEMV, the
// scale epilogue of the cuBLASLt path, and QuantLinear8 (validation, upload, dispatch).
// Semantics and shapes: fp8_linear.h. Host-only cuBLASLt code: fp8_linear_blas.cc.
//
// ---- GEMV kernel (m <= 16) ----------------------------------------------------------------
// Decode is bound by reading W once (N * K bytes), so the kernel is built around W loads:
// every thread issues 8 independent 16-byte loads (ld.global.nc, no L1 allocation: W is
// streamed) straight from the checkpoint layout W[n, k] into tensor-core B fragments, and the
// <= 16 activation rows (zero-padded to 16) are the A operand, staged once per block in shared
// memory.
//
// Block = 8 warps; warp w of block (bx, by) owns the 8 output columns n0 = 64 bx + 8 w ..+8 and
// the K slice [by * ks, by * ks + ks). Lane = 4 g + t (g = groupID 0..7, t = 0..3); lane's
// row of W is n0 + g and its bytes within each 64-byte chunk are [16 t, 16 t + 16).
//
// mma.sync.aligned.m16n8k32.row.col (e4m3 or s8; PTX ISA "Matrix Fragments for mma.m16n8k32"):
//   A (16 x 32, row-major, 4 .b32 regs of 4 bytes; byte j of a reg is element j):
//     a0: row g,     k = 4t + 0..3        a1: row g + 8, k = 4t + 0..3
//     a2: row g,     k = 16 + 4t + 0..3   a3: row g + 8, k = 16 + 4t + 0..3
//   B (32 x 8, column-major = W rows, 2 .b32 regs):
//     b0: col g, k = 4t + 0..3            b1: col g, k = 16 + 4t + 0..3
//   C/D (16 x 8, f32 or s32): c0, c1: row g, col 2t + 0, 1; c2, c3: row g + 8, col 2t + 0, 1.
// A dot product does not care in which order k is visited, only that A and B agree. So the
// "logical" k of one mma is mapped to physical k through the loaded bytes: a thread's 16 bytes
// W[n, c + 16t .. +16) = regs (r0, r1, r2, r3) feed two mmas, (b0, b1) = (r0, r1) and
// (r2, r3); i.e. mma #0 logical k 4t+j <-> physical c + 16t + j, logical 16+4t+j <-> c+16t+4+j,
// and mma #1 the same plus 8. The mapping depends on t only (not on g), so the A fragment
// is the same 16 bytes of the activation rows g and g + 8 at physical c + 16t: one 16-byte
// shared-memory load per row gives (a0, a2) for mma #0 and mma #1. Over t = 0..3 the two mmas
// cover the 64 bytes of the chunk exactly once.
//
// Weight-only (W8A16): mma.m16n8k16.row.col.f32.bf16.bf16.f32 with
//   a0: row g, k = 2t + 0,1; a1: row g + 8, k = 2t + 0,1; a2: row g, k = 2t + 8,9; a3: row
//   g + 8, k = 2t + 8,9 (bf16x2, low half = lower k); b0: col g, k = 2t + 0,1; b1: col g,
//   k = 2t + 8,9; C as above.
// The 16 codes of one load become 8 bf16x2 regs p0..p7 (p_i = codes 2i, 2i+1; e4m3 and int8
// values are exact in bf16, the scale is applied at the end) feeding 4 mmas, mma #j taking
// (b0, b1) = (p_2j, p_2j+1): logical 2t + 0,1 <-> physical c + 16t + 4j + 0,1 and logical
// 2t + 8,9 <-> c + 16t + 4j + 2,3. The activation row's 16 bf16 at physical c + 16t (two
// 16-byte shared loads, regs q0..q7) give (a0, a2) = (q_2j, q_2j+1).
//
// Split-K: when N / 64 blocks cannot fill the GPU, K is split into gridDim.y slices; each
// block writes its fp32 (int32 for int8) partial tile to scratch, and the last block to
// finish a column tile (atomic ticket per blockIdx.x, after __threadfence) sums the slices in
// a fixed order (deterministic), applies the scales and writes y, then resets the ticket.
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "quant/compressed_tensors.h"
#include "quant/int_quant_matrix.h"
#include "runtime/backend/cuda/act_quant.cuh"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/fp8_linear.h"
#include "runtime/backend/cuda/pdl.cuh"
#include "runtime/base/status_macros.h"

namespace qshard::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kColsPerWarp = 8;
constexpr int kColsPerBlock = kGemvWarps * kColsPerWarp;  // 64
constexpr int kLoadsInFlight = 8;                         // 16-byte W loads per thread per step
constexpr int kStepBytes = kLoadsInFlight * 64;           // W bytes (= k) per warp row per step
constexpr int kSmemPad = 16;  // bytes after each staged row: rows g and g+8 land on other banks
constexpr int kMaxRows = 16;

// One block per row, one 16-byte vector per thread up to k = 8192: a decode step's row is
// latency-bound (ncu on an H100: 5.5 us at k = 4096 and 13 us at 14336 with 256 threads).
constexpr int kQuantThreads = 1024;
constexpr int64_t kQuantMaxStageBytes = 32 * 1024;  // rows up to 16384 bf16 staged in smem

// ---- activation quantization -----------------------------------------------------------
// kind: 0 fp8 per token, 1 fp8 static, 2 int8 per token. One block per row.
__global__ void __launch_bounds__(kQuantThreads)
    QuantizeActKernel(const bf16* __restrict__ x, int k, int kind, float static_scale, bool stage,
                      uint8_t* __restrict__ codes, float* __restrict__ scales) {
  extern __shared__ __align__(16) unsigned char quant_smem[];
  __shared__ float warp_max[kQuantThreads / 32];
  PdlWait();              // launched with LaunchPdl: x is ready after this (pdl.cuh)
  PdlLaunchDependents();  // the GEMV after this may start fetching its weights
  const int row = blockIdx.x;
  const uint4* src = reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row) * k);
  uint4* staged = reinterpret_cast<uint4*>(quant_smem);
  const int vecs = k / 8;  // 8 bf16 per 16-byte vector
  float amax = 0.0f;
  for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
    const uint4 u = src[v];
    if (stage) staged[v] = u;
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));  // fmaxf drops NaN, as the CPU
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, o));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  __syncthreads();  // also orders the staged row before the second pass
  amax = warp_max[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) amax = fmaxf(amax, warp_max[w]);
  float s;
  if (kind == 0) {
    s = Fp8PerTokenScale(amax);
  } else if (kind == 1) {
    s = static_scale;
  } else {
    s = amax > 0.0f ? amax / 127.0f : 1.0f;
  }
  if (threadIdx.x == 0) scales[row] = s;
  uint2* dst = reinterpret_cast<uint2*>(codes + static_cast<int64_t>(row) * k);
  for (int v = threadIdx.x; v < vecs; v += blockDim.x) {
    const uint4 u = stage ? staged[v] : src[v];
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      const float q0 = f.x / s, q1 = f.y / s;  // the CPU divides too: identical rounding
      uint32_t c0, c1;
      if (kind == 2) {
        c0 = static_cast<uint32_t>(static_cast<int>(fminf(fmaxf(rintf(q0), -127.0f), 127.0f)));
        c1 = static_cast<uint32_t>(static_cast<int>(fminf(fmaxf(rintf(q1), -127.0f), 127.0f)));
        c0 &= 0xFFu;
        c1 &= 0xFFu;
      } else {
        c0 = FloatToE4M3Device(q0);
        c1 = FloatToE4M3Device(q1);
      }
      packed[i >> 1] |= (c0 | (c1 << 8)) << ((i & 1) * 16);
    }
    dst[v] = make_uint2(packed[0], packed[1]);
  }
}

// ---- GEMV building blocks ----------------------------------------------------------------
__device__ __forceinline__ void MmaE4M3(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  // No e4m3 tensor cores before sm_89: QuantLinear8::Create rejects fp8 W8A8 there.
  (void)c, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
  __trap();
#endif
}

__device__ __forceinline__ void MmaS8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                      uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)c, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
  __trap();
#endif
}

__device__ __forceinline__ void MmaBf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)c, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
  __trap();
#endif
}

// Two codes (bytes 0 and 1 of `pair`) as a bf16x2, exactly.
// e4m3: the 7 magnitude bits placed as a float's top exponent/mantissa bits give
// 2^(E-127) (1 + M/8) (normal) or M 2^-129 (E = 0, a float subnormal); times 2^120 that is
// the e4m3 value 2^(E-7) (1 + M/8) or M 2^-9, exact (no fast-math: subnormals are kept).
__device__ __forceinline__ float E4M3ToFloatDevice(uint32_t code) {
  const float mag = __uint_as_float((code & 0x7Fu) << 20) * 0x1p120f;
  return (code & 0x80u) ? -mag : mag;
}

template <bool kFp8>
__device__ __forceinline__ uint32_t CodesToBf16x2(uint32_t pair) {
  float lo, hi;
  if constexpr (kFp8) {
    lo = E4M3ToFloatDevice(pair & 0xFFu);
    hi = E4M3ToFloatDevice((pair >> 8) & 0xFFu);
  } else {
    lo = static_cast<float>(static_cast<int8_t>(pair & 0xFFu));
    hi = static_cast<float>(static_cast<int8_t>((pair >> 8) & 0xFFu));
  }
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // lo -> low half (.x)
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ void StoreOut(void* y, bool y_bf16, int64_t idx, float v) {
  if (y_bf16) {
    static_cast<bf16*>(y)[idx] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(y)[idx] = v;
  }
}

// kMode: Quant8Mode as int. Acc: float, or int for int8 W8A8.
// kRing (opt-in, SetGemv8Ring): the W loads are a ring refilled as each is consumed
// instead of batches of kLoadsInFlight (same arithmetic in the same order: the same bits).
template <int kMode, bool kRing = false>
__global__ void __launch_bounds__(kGemvThreads)
    Gemv8Kernel(const uint8_t* __restrict__ x, const float* __restrict__ x_scale,
                const uint8_t* __restrict__ w, const float* __restrict__ w_scale,
                const float* __restrict__ bias, void* __restrict__ y, bool y_bf16, int m, int n,
                int k, int ks, uint32_t* __restrict__ partials, int* __restrict__ counters) {
  constexpr bool kW8A16 = kMode == static_cast<int>(Quant8Mode::kFp8W8A16) ||
                          kMode == static_cast<int>(Quant8Mode::kInt8W8A16);
  constexpr bool kInt = kMode == static_cast<int>(Quant8Mode::kInt8W8A8);
  constexpr int kElem = kW8A16 ? 2 : 1;  // bytes per staged activation
  using Acc = std::conditional_t<kInt, int, float>;

  extern __shared__ __align__(16) unsigned char gemv_smem[];
  __shared__ int last_block;
  const int tid = threadIdx.x;
  const int k0 = blockIdx.y * ks;
  const int klen = min(ks, k - k0);  // > 0, a multiple of 16
  const int row_bytes = ks * kElem;
  const int stride = row_bytes + kSmemPad;

  // The weights do not depend on the kernel before this one (pdl.cuh): this block's slice,
  // 64 rows x klen bytes (4 threads per row), goes toward L2 while that kernel finishes.
  {
    const int prow = blockIdx.x * kColsPerBlock + (tid >> 2);
    if (prow < n) {
      const uint8_t* base = w + static_cast<int64_t>(prow) * k + k0;
      for (int off = (tid & 3) * 128; off < klen; off += 512) PrefetchL2(base + off);
    }
  }
  PdlWait();
  PdlLaunchDependents();

  // Stage x[0:16, k0:k0+ks] (zero for rows >= m and k >= K) as 16-byte vectors.
  {
    const int vec_per_row = row_bytes / 16;
    const int valid_vec = klen * kElem / 16;
    for (int i = tid; i < kMaxRows * vec_per_row; i += kGemvThreads) {
      const int r = i / vec_per_row, v = i - r * vec_per_row;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < m && v < valid_vec) {
        val = *reinterpret_cast<const uint4*>(x + (static_cast<int64_t>(r) * k + k0) * kElem +
                                              v * 16);
      }
      *reinterpret_cast<uint4*>(gemv_smem + r * stride + v * 16) = val;
    }
  }
  __syncthreads();

  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int col0 = blockIdx.x * kColsPerBlock + warp * kColsPerWarp;  // warp's first column
  const int wrow = col0 + g;                                          // this lane's W row
  const bool row_ok = wrow < n;
  const uint8_t* wp = w + static_cast<int64_t>(row_ok ? wrow : 0) * k + k0 + 16 * t;
  const bool hi_rows = m > 8;  // rows 8..15 of A are all zero otherwise: skip their loads
  const unsigned char* xa = gemv_smem + g * stride + 16 * t * kElem;
  const unsigned char* xb = xa + 8 * stride;

  Acc acc[2][4] = {};  // two accumulator chains (even / odd load) to overlap mma latency
  // Chunk i of this lane's row slice: 16 bytes at k = 64 i + 16 t, multiplied into the
  // accumulator chain i & 1 (two chains to overlap mma latency).
  auto load = [&](int i) {
    const int off = i * 64;  // + 16 t: in wp
    return (row_ok && off + 16 * t < klen) ? LoadStreamed16(wp + off) : make_uint4(0u, 0u, 0u, 0u);
  };
  auto consume = [&](const uint4& wq, int i) {
    const int off = i * 64 * kElem;
    Acc(&c)[4] = acc[i & 1];
    if constexpr (!kW8A16) {
      const uint4 ra = *reinterpret_cast<const uint4*>(xa + off);
      const uint4 rb =
          hi_rows ? *reinterpret_cast<const uint4*>(xb + off) : make_uint4(0u, 0u, 0u, 0u);
      if constexpr (kInt) {
        MmaS8(c, ra.x, rb.x, ra.y, rb.y, wq.x, wq.y);
        MmaS8(c, ra.z, rb.z, ra.w, rb.w, wq.z, wq.w);
      } else {
        // Each mma starts from zero and its 32-product sum is added in fp32 by the CUDA
        // cores: fp8 tensor-core accumulation is not guaranteed to keep full fp32
        // precision of a long running sum (on Hopper it is reported to keep ~14 bits).
        float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        MmaE4M3(p, ra.x, rb.x, ra.y, rb.y, wq.x, wq.y);
        MmaE4M3(p, ra.z, rb.z, ra.w, rb.w, wq.z, wq.w);
#pragma unroll
        for (int q = 0; q < 4; ++q) c[q] += p[q];
      }
    } else {
      constexpr bool kFp8 = kMode == static_cast<int>(Quant8Mode::kFp8W8A16);
      const uint32_t wr[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // 8 codes (2 regs) -> 2 mmas
        const int o = off + half * 16;
        const uint4 qa = *reinterpret_cast<const uint4*>(xa + o);
        const uint4 qb =
            hi_rows ? *reinterpret_cast<const uint4*>(xb + o) : make_uint4(0u, 0u, 0u, 0u);
        const uint32_t w0 = wr[2 * half], w1 = wr[2 * half + 1];
        // mma j = 2 half + 0: codes 0..3 of w0; j = 2 half + 1: codes 0..3 of w1.
        MmaBf16(c, qa.x, qb.x, qa.y, qb.y, CodesToBf16x2<kFp8>(w0), CodesToBf16x2<kFp8>(w0 >> 16));
        MmaBf16(c, qa.z, qb.z, qa.w, qb.w, CodesToBf16x2<kFp8>(w1), CodesToBf16x2<kFp8>(w1 >> 16));
      }
    }
  };
  if (col0 < n) {
    // Chunks up to klen rounded up to kStepBytes (zeros past klen).
    const int chunks = (klen + kStepBytes - 1) / kStepBytes * kLoadsInFlight;
    uint4 wv[kLoadsInFlight];
    if constexpr (kRing) {
      // The slot of chunk i is refilled with chunk i + kLoadsInFlight as soon as it has been
      // read, so kLoadsInFlight loads stay in flight up to the end of the slice.
#pragma unroll
      for (int u = 0; u < kLoadsInFlight; ++u) wv[u] = load(u);
      for (int i0 = 0; i0 < chunks; i0 += kLoadsInFlight) {
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u) {
          const uint4 wq = wv[u];
          if (i0 + u + kLoadsInFlight < chunks) wv[u] = load(i0 + u + kLoadsInFlight);
          consume(wq, i0 + u);
        }
      }
    } else {
      // Batches: kLoadsInFlight loads, then their products.
      for (int i0 = 0; i0 < chunks; i0 += kLoadsInFlight) {
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u) wv[u] = load(i0 + u);
#pragma unroll
        for (int u = 0; u < kLoadsInFlight; ++u) consume(wv[u], i0 + u);
      }
    }
  }
  Acc sum[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) sum[i] = acc[0][i] + acc[1][i];

  // This lane's outputs: (row r_i, column c_i) for sum[i].
  const int rows[4] = {g, g, g + 8, g + 8};
  const int cols[4] = {col0 + 2 * t, col0 + 2 * t + 1, col0 + 2 * t, col0 + 2 * t + 1};

  if (gridDim.y > 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (rows[i] < m && cols[i] < n) {
        const int64_t idx = (static_cast<int64_t>(blockIdx.y) * m + rows[i]) * n + cols[i];
        if constexpr (kInt) {
          partials[idx] = static_cast<uint32_t>(sum[i]);
        } else {
          partials[idx] = __float_as_uint(sum[i]);
        }
      }
    }
    __threadfence();  // partials visible device-wide before the ticket
    __syncthreads();
    if (tid == 0) {
      const int ticket = atomicAdd(&counters[blockIdx.x], 1);
      last_block = ticket == static_cast<int>(gridDim.y) - 1;
    }
    __syncthreads();
    if (!last_block) return;
    __threadfence();                         // see the other blocks' partials
    if (tid == 0) counters[blockIdx.x] = 0;  // every slice has arrived: ready for next launch
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (rows[i] >= m || cols[i] >= n) continue;
      Acc total = Acc(0);
      for (int s = 0; s < static_cast<int>(gridDim.y); ++s) {  // fixed order: deterministic
        if (s == static_cast<int>(blockIdx.y)) {
          total += sum[i];
          continue;
        }
        const uint32_t bits =
            __ldcg(partials + (static_cast<int64_t>(s) * m + rows[i]) * n + cols[i]);
        if constexpr (kInt) {
          total += static_cast<int>(bits);
        } else {
          total += __uint_as_float(bits);
        }
      }
      sum[i] = total;
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (rows[i] >= m || cols[i] >= n) continue;
    float v = static_cast<float>(sum[i]) * (x_scale != nullptr ? x_scale[rows[i]] : 1.0f) *
              w_scale[cols[i]];
    if (bias != nullptr) v += bias[cols[i]];
    StoreOut(y, y_bf16, static_cast<int64_t>(rows[i]) * n + cols[i], v);
  }
}

__global__ void ScaleEpilogueKernel(const void* __restrict__ acc, bool acc_is_int,
                                    const float* __restrict__ x_scale,
                                    const float* __restrict__ w_scale,
                                    const float* __restrict__ bias, void* __restrict__ y,
                                    bool y_bf16, int64_t m, int64_t n) {
  const int64_t total = m * n;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n, c = i - r * n;
    const float a = acc_is_int ? static_cast<float>(static_cast<const int*>(acc)[i])
                               : static_cast<const float*>(acc)[i];
    float v = a * x_scale[r] * w_scale[c];
    if (bias != nullptr) v += bias[c];
    if (y_bf16) {
      static_cast<bf16*>(y)[i] = __float2bfloat16_rn(v);
    } else {
      static_cast<float*>(y)[i] = v;
    }
  }
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

bool IsW8A16(Quant8Mode mode) {
  return mode == Quant8Mode::kFp8W8A16 || mode == Quant8Mode::kInt8W8A16;
}

const char* ModeLabel(Quant8Mode mode) {
  switch (mode) {
    case Quant8Mode::kFp8W8A8:
      return "fp8-w8a8";
    case Quant8Mode::kInt8W8A8:
      return "int8-w8a8";
    case Quant8Mode::kFp8W8A16:
      return "fp8-w8a16";
    case Quant8Mode::kInt8W8A16:
      return "int8-w8a16";
  }
  return "?";
}

}  // namespace

// ---- launchers ----------------------------------------------------------------------------

absl::Status LaunchQuantizeActivations(const void* x, int64_t m, int64_t k, ActQuant act,
                                       float static_scale, void* codes, float* scales,
                                       cudaStream_t stream) {
  int kind;
  switch (act) {
    case ActQuant::kFp8PerToken:
      kind = 0;
      break;
    case ActQuant::kFp8Static:
      kind = 1;
      break;
    case ActQuant::kInt8PerToken:
      kind = 2;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("QuantizeActivations: unsupported activation scheme ", ActQuantName(act)));
  }
  if (m < 0 || k <= 0 || k % 16 != 0 || k > (int64_t{1} << 30) || m > 0x7FFFFFFF) {
    return absl::InvalidArgumentError(absl::StrCat("QuantizeActivations: bad shape m=", m, " k=", k,
                                                   " (k must be a multiple of 16)"));
  }
  if (kind == 1 && !(static_scale > 0.0f && std::isfinite(static_scale))) {
    return absl::InvalidArgumentError(
        absl::StrCat("QuantizeActivations: static scale must be positive, got ", static_scale));
  }
  if (m == 0) return absl::OkStatus();
  if (!Aligned16(x) || !Aligned16(codes) || scales == nullptr) {
    return absl::InvalidArgumentError(
        "QuantizeActivations: x and codes must be 16-byte aligned, scales non-null");
  }
  const bool stage = k * 2 <= kQuantMaxStageBytes;
  const int threads = static_cast<int>(std::min<int64_t>(kQuantThreads, (k / 8 + 31) / 32 * 32));
  (void)LaunchPdl(QuantizeActKernel, dim3(static_cast<unsigned>(m)), dim3(threads),
                  stage ? k * 2 : 0, stream, static_cast<const bf16*>(x), static_cast<int>(k), kind,
                  static_scale, stage, static_cast<uint8_t*>(codes), scales);
  QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

namespace {
std::atomic<int> g_gemv8_blocks_per_sm{4};
}  // namespace

namespace {
EnvFlag& Gemv8RingFlag() {
  static EnvFlag flag("QSHARD_CUDA_GEMV8_RING", /*default_on=*/false);
  return flag;
}
}  // namespace

void SetGemv8Ring(bool on) { Gemv8RingFlag().Set(on); }
bool Gemv8RingEnabled() { return Gemv8RingFlag().Get(); }

void SetGemv8BlocksPerSm(int blocks) {
  g_gemv8_blocks_per_sm.store(std::clamp(blocks, 1, 64), std::memory_order_relaxed);
}
int Gemv8BlocksPerSm() { return g_gemv8_blocks_per_sm.load(std::memory_order_relaxed); }

Gemv8Plan PlanGemv8(Quant8Mode mode, int64_t n, int64_t k, int sms) {
  const int64_t max_ks = IsW8A16(mode) ? 1024 : 2048;  // 16 x (ks * elem + 16) B = 33 KB smem
  const int64_t k_round = (k + kStepBytes - 1) / kStepBytes * kStepBytes;
  const int64_t blocks_n = (n + kColsPerBlock - 1) / kColsPerBlock;
  const int64_t s_min = (k_round + max_ks - 1) / max_ks;
  const int64_t s_max = k_round / kStepBytes;
  const int64_t target_blocks = Gemv8BlocksPerSm() * static_cast<int64_t>(std::max(sms, 1));
  const int64_t s_want = (target_blocks + blocks_n - 1) / blocks_n;
  const int64_t s = std::clamp(s_want, s_min, s_max);
  Gemv8Plan plan;
  plan.k_per_split = ((k_round + s - 1) / s + kStepBytes - 1) / kStepBytes * kStepBytes;
  plan.k_splits = static_cast<int>((k + plan.k_per_split - 1) / plan.k_per_split);
  return plan;
}

absl::Status LaunchGemv8(const Gemv8Args& a, cudaStream_t stream) {
  if (a.m < 1 || a.m > kMaxRows || a.n <= 0 || a.k <= 0 || a.k % 16 != 0 ||
      a.n * a.k > (int64_t{1} << 40) || a.k > (int64_t{1} << 30) || a.n > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("Gemv8: bad shape m=", a.m, " n=", a.n,
                                                   " k=", a.k, " (1 <= m <= 16, k % 16 == 0)"));
  }
  if (a.y_dtype != DType::kF32 && a.y_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Gemv8: output must be float32 or bfloat16, got ", std::string(DTypeName(a.y_dtype))));
  }
  const int max_ks = IsW8A16(a.mode) ? 1024 : 2048;
  if (a.k_per_split <= 0 || a.k_per_split % kStepBytes != 0 || a.k_per_split > max_ks ||
      a.k_splits != (a.k + a.k_per_split - 1) / a.k_per_split) {
    return absl::InvalidArgumentError(
        absl::StrCat("Gemv8: bad split plan ", a.k_splits, " x ", a.k_per_split, " for k=", a.k));
  }
  if (!Aligned16(a.x) || !Aligned16(a.w) || a.w_scale == nullptr || a.y == nullptr) {
    return absl::InvalidArgumentError("Gemv8: x and w must be 16-byte aligned, w_scale/y set");
  }
  if (a.k_splits > 1 && (a.partials == nullptr || a.counters == nullptr)) {
    return absl::InvalidArgumentError("Gemv8: split-K needs partials and counters");
  }
  const int elem = IsW8A16(a.mode) ? 2 : 1;
  const size_t smem = static_cast<size_t>(kMaxRows) * (a.k_per_split * elem + kSmemPad);
  const dim3 grid(static_cast<unsigned>((a.n + kColsPerBlock - 1) / kColsPerBlock),
                  static_cast<unsigned>(a.k_splits));
  const bool y_bf16 = a.y_dtype == DType::kBF16;
  const auto* x = static_cast<const uint8_t*>(a.x);
  const auto* w = static_cast<const uint8_t*>(a.w);
  auto* partials = static_cast<uint32_t*>(a.partials);
  const int m = static_cast<int>(a.m), n = static_cast<int>(a.n), k = static_cast<int>(a.k);
  const int ks = static_cast<int>(a.k_per_split);
  cudaError_t err = cudaSuccess;
  switch (a.mode) {
    case Quant8Mode::kFp8W8A8:
      err = LaunchPdl(Gemv8RingEnabled() ? Gemv8Kernel<0, true> : Gemv8Kernel<0>, grid,
                      dim3(kGemvThreads), smem, stream, x, a.x_scale, w, a.w_scale, a.bias, a.y,
                      y_bf16, m, n, k, ks, partials, a.counters);
      break;
    case Quant8Mode::kInt8W8A8:
      err = LaunchPdl(Gemv8Kernel<1>, grid, dim3(kGemvThreads), smem, stream, x, a.x_scale, w,
                      a.w_scale, a.bias, a.y, y_bf16, m, n, k, ks, partials, a.counters);
      break;
    case Quant8Mode::kFp8W8A16:
      err = LaunchPdl(Gemv8Kernel<2>, grid, dim3(kGemvThreads), smem, stream, x, a.x_scale, w,
                      a.w_scale, a.bias, a.y, y_bf16, m, n, k, ks, partials, a.counters);
      break;
    case Quant8Mode::kInt8W8A16:
      err = LaunchPdl(Gemv8Kernel<3>, grid, dim3(kGemvThreads), smem, stream, x, a.x_scale, w,
                      a.w_scale, a.bias, a.y, y_bf16, m, n, k, ks, partials, a.counters);
      break;
  }
  QSHARD_CUDA_RETURN_IF_ERROR(err);
  return absl::OkStatus();
}

absl::Status LaunchScaleEpilogue(const void* acc, bool acc_is_int, const float* x_scale,
                                 const float* w_scale, const float* bias, void* y, DType y_dtype,
                                 int64_t m, int64_t n, cudaStream_t stream) {
  if (m < 0 || n <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("ScaleEpilogue: bad shape m=", m, " n=", n));
  }
  if (y_dtype != DType::kF32 && y_dtype != DType::kBF16) {
    return absl::InvalidArgumentError("ScaleEpilogue: output must be float32 or bfloat16");
  }
  if (m == 0) return absl::OkStatus();
  const int64_t blocks = std::min<int64_t>((m * n + 255) / 256, 8192);
  ScaleEpilogueKernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      acc, acc_is_int, x_scale, w_scale, bias, y, y_dtype == DType::kBF16, m, n);
  QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

// ---- QuantLinear8 --------------------------------------------------------------------------

QuantLinear8::~QuantLinear8() = default;

absl::StatusOr<std::unique_ptr<QuantLinear8>> QuantLinear8::Create(const LinearWeights& w,
                                                                   int cc_major, int cc_minor,
                                                                   cudaStream_t stream) {
  const int64_t N = w.out_features, K = w.in_features;
  if (N <= 0 || K <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(w.name, ": bad shape out_features=", N, " in_features=", K));
  }
  if (K % 16 != 0) {
    return absl::UnimplementedError(
        absl::StrCat(w.name, ": in_features ", K,
                     " is not a multiple of 16 (the CUDA 8-bit linear reads "
                     "16-byte rows)"));
  }
  if (N > (int64_t{1} << 30) || K > (int64_t{1} << 30)) {
    return absl::UnimplementedError(absl::StrCat(w.name, ": too large for the CUDA 8-bit linear"));
  }
  const auto float_types = {DType::kF32, DType::kF16, DType::kBF16};
  auto op = std::unique_ptr<QuantLinear8>(new QuantLinear8());
  op->name_ = w.name;
  op->n_ = N;
  op->k_ = K;
  op->act_ = w.act_quant;
  std::vector<float> scale(static_cast<size_t>(N));
  if (w.format == WeightFormat::kFp8) {
    if (!w.block_size.empty()) {
      return absl::UnimplementedError(
          absl::StrCat(w.name, ".weight_scale: block-wise fp8 scales (block_size [",
                       w.block_size[0], ", ", w.block_size.size() > 1 ? w.block_size[1] : 0,
                       "]) are not supported by the CUDA fp8 linear"));
    }
    if (w.act_quant != ActQuant::kNone && w.act_quant != ActQuant::kFp8PerToken &&
        w.act_quant != ActQuant::kFp8Static) {
      return absl::UnimplementedError(absl::StrCat(
          w.name, ": fp8 weights with activation scheme ", ActQuantName(w.act_quant),
          " are not supported by the CUDA fp8 linear (none, fp8-per-token, fp8-static are)"));
    }
    QSHARD_ASSIGN_OR_RETURN(Fp8ScaleGrid grid, Fp8Scales(w));  // validates weight + scales
    for (int64_t n = 0; n < N; ++n) scale[n] = grid.at(n, 0);
    if (w.act_quant == ActQuant::kFp8Static) {
      if (w.input_scale.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat(w.name, ".input_scale: missing (the static activation scheme needs it)"));
      }
      op->static_scale_ = quant_internal::FloatAt(w.input_scale, 0);
      if (!(op->static_scale_ > 0.0f) || !std::isfinite(op->static_scale_)) {
        return absl::InvalidArgumentError(
            absl::StrCat(w.name, ".input_scale: must be positive, got ", op->static_scale_));
      }
    }
    op->mode_ = w.act_quant == ActQuant::kNone ? Quant8Mode::kFp8W8A16 : Quant8Mode::kFp8W8A8;
    if (op->mode_ == Quant8Mode::kFp8W8A8 && (cc_major * 10 + cc_minor) < 89) {
      return absl::UnimplementedError(
          absl::StrCat(w.name, ": fp8 W8A8 needs e4m3 tensor cores (sm_89+), this GPU is sm_",
                       cc_major, cc_minor, "; use the weight-only scheme or the CPU backend"));
    }
  } else if (w.format == WeightFormat::kInt8) {
    if (w.act_quant != ActQuant::kNone && w.act_quant != ActQuant::kInt8PerToken) {
      return absl::InvalidArgumentError(absl::StrCat(
          w.name, ": int8 weights support activation quantization none or int8-per-token, not ",
          ActQuantName(w.act_quant)));
    }
    QSHARD_RETURN_IF_ERROR(
        quant_internal::CheckTensor(w.name, "weight", w.weight, {DType::kI8}, {N, K}));
    const Tensor& s = w.weight_scale;
    const bool per_tensor = s.numel() == 1;
    if (!per_tensor) {
      const Shape want = s.rank() == 1 ? Shape{N} : Shape{N, 1};
      QSHARD_RETURN_IF_ERROR(
          quant_internal::CheckTensor(w.name, "weight_scale", s, float_types, want));
    } else {
      QSHARD_RETURN_IF_ERROR(
          quant_internal::CheckTensor(w.name, "weight_scale", s, float_types, s.shape()));
    }
    for (int64_t n = 0; n < N; ++n) scale[n] = quant_internal::FloatAt(s, per_tensor ? 0 : n);
    op->mode_ = w.act_quant == ActQuant::kNone ? Quant8Mode::kInt8W8A16 : Quant8Mode::kInt8W8A8;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(w.name, ": QuantLinear8 takes fp8 or int8 weights, got format ",
                     WeightFormatName(w.format)));
  }
  if (w.weight.device() != Device::kCpu) {
    return absl::InvalidArgumentError(absl::StrCat(w.name, ".weight: must be host memory"));
  }
  std::vector<float> bias;
  if (!w.bias.empty()) {
    QSHARD_RETURN_IF_ERROR(quant_internal::CheckTensor(w.name, "bias", w.bias, float_types, {N}));
    bias.resize(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) bias[n] = quant_internal::FloatAt(w.bias, n);
  }

  int device = 0;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  QSHARD_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&op->sms_, cudaDevAttrMultiProcessorCount, device));
  // cuBLASLt serves m > 16: int8 IMMA on every supported GPU, fp8 on sm_89+ (W8A8 only).
  op->blas_capable_ = op->mode_ == Quant8Mode::kInt8W8A8 ||
                      (op->mode_ == Quant8Mode::kFp8W8A8 && cc_major * 10 + cc_minor >= 89);

  QSHARD_ASSIGN_OR_RETURN(op->weight_, DeviceBuffer::Allocate(static_cast<size_t>(N * K)));
  QSHARD_RETURN_IF_ERROR(
      op->weight_.CopyFromHost(w.weight.raw(), static_cast<size_t>(N * K), stream));
  QSHARD_ASSIGN_OR_RETURN(op->w_scale_, DeviceBuffer::Allocate(sizeof(float) * N));
  QSHARD_RETURN_IF_ERROR(op->w_scale_.CopyFromHost(scale.data(), sizeof(float) * N, stream));
  if (!bias.empty()) {
    QSHARD_ASSIGN_OR_RETURN(op->bias_, DeviceBuffer::Allocate(sizeof(float) * N));
    QSHARD_RETURN_IF_ERROR(op->bias_.CopyFromHost(bias.data(), sizeof(float) * N, stream));
  }
  return op;
}

namespace {
EnvFlag& FusedActQuantFlag() {
  static EnvFlag flag("QSHARD_CUDA_FUSED_ACT_QUANT", /*default_on=*/false);
  return flag;
}
}  // namespace

void SetFusedActQuant(bool on) { FusedActQuantFlag().Set(on); }
bool FusedActQuantEnabled() { return FusedActQuantFlag().Get(); }

namespace {
EnvFlag& Fp8BlasScaledFlag() {
  static EnvFlag flag("QSHARD_CUDA_FP8_BLAS_SCALED", /*default_on=*/false);
  return flag;
}
}  // namespace

void SetFp8BlasScaled(bool on) { Fp8BlasScaledFlag().Set(on); }
bool Fp8BlasScaledEnabled() { return Fp8BlasScaledFlag().Get(); }

std::string QuantLinear8::kernel_name() const {
  return absl::StrCat("cuda-", ModeLabel(mode_),
                      last_blas_ ? (last_scaled_ ? "-cublaslt-scaled" : "-cublaslt") : "-gemv");
}

absl::Status QuantLinear8::RunGemv(const void* x_or_codes, const float* x_scale, int64_t m, void* y,
                                   DType y_dtype, cudaStream_t stream) {
  const Gemv8Plan plan = PlanGemv8(mode_, n_, k_, sms_);
  const int64_t rows = std::min<int64_t>(m, kMaxRows);
  Quant8Scratch scratch;
  if (plan.k_splits > 1) {
    QSHARD_ASSIGN_OR_RETURN(scratch,
                            GetQuant8Scratch(0, 0, 0, plan.k_splits * rows * n_,
                                             (n_ + kColsPerBlock - 1) / kColsPerBlock, stream));
  }
  const int elem = IsW8A16(mode_) ? 2 : 1;
  const int64_t y_elem = y_dtype == DType::kF32 ? 4 : 2;
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {  // m > 16 only when cuBLASLt is unavailable
    Gemv8Args a;
    a.mode = mode_;
    a.x = static_cast<const uint8_t*>(x_or_codes) + r0 * k_ * elem;
    a.x_scale = x_scale != nullptr ? x_scale + r0 : nullptr;
    a.w = weight_.get();
    a.w_scale = w_scale_.as<float>();
    a.bias = bias_.as<float>();
    a.y = static_cast<uint8_t*>(y) + r0 * n_ * y_elem;
    a.y_dtype = y_dtype;
    a.m = std::min<int64_t>(kMaxRows, m - r0);
    a.n = n_;
    a.k = k_;
    a.partials = scratch.partials;
    a.counters = scratch.counters;
    a.k_splits = plan.k_splits;
    a.k_per_split = plan.k_per_split;
    QSHARD_RETURN_IF_ERROR(LaunchGemv8(a, stream));
  }
  return absl::OkStatus();
}

absl::Status QuantLinear8::Run(const void* x, int64_t m, void* y, DType y_dtype,
                               cudaStream_t stream) {
  if (m < 0) return absl::InvalidArgumentError(absl::StrCat(name_, ": negative m ", m));
  if (y_dtype != DType::kF32 && y_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": output must be float32 or bfloat16, got ", std::string(DTypeName(y_dtype))));
  }
  if (m == 0) return absl::OkStatus();
  if (x == nullptr || y == nullptr || !Aligned16(x)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name_, ": x must be a 16-byte aligned device pointer and y non-null"));
  }
  if (IsW8A16(mode_)) {
    last_blas_ = false;
    return RunGemv(x, nullptr, m, y, y_dtype, stream);
  }
  QSHARD_ASSIGN_OR_RETURN(Quant8Scratch act, GetQuant8Scratch(m * k_, m, 0, 0, 0, stream));
  QSHARD_RETURN_IF_ERROR(
      LaunchQuantizeActivations(x, m, k_, act_, static_scale_, act.codes, act.x_scale, stream));
  return RunCodes(static_cast<const uint8_t*>(act.codes), act.x_scale, m, y, y_dtype, stream);
}

absl::Status QuantLinear8::RunQuantized(const uint8_t* codes, const float* scales, int64_t m,
                                        void* y, DType y_dtype, cudaStream_t stream) {
  if (!TakesFp8PerTokenCodes()) {
    return absl::FailedPreconditionError(absl::StrCat(
        name_, ": takes pre-quantized input only with fp8 per-token activations (mode ",
        ModeLabel(mode_), ")"));
  }
  if (m < 0) return absl::InvalidArgumentError(absl::StrCat(name_, ": negative m ", m));
  if (y_dtype != DType::kF32 && y_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": output must be float32 or bfloat16, got ", std::string(DTypeName(y_dtype))));
  }
  if (m == 0) return absl::OkStatus();
  if (codes == nullptr || scales == nullptr || y == nullptr || !Aligned16(codes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": codes must be a 16-byte aligned device pointer, scales and y non-null"));
  }
  return RunCodes(codes, scales, m, y, y_dtype, stream);
}

absl::Status QuantLinear8::RunCodes(const uint8_t* codes, const float* x_scale, int64_t m, void* y,
                                    DType y_dtype, cudaStream_t stream) {
  last_scaled_ = false;
  if (m > kMaxRows && blas_capable_) {
    const bool fp8 = mode_ == Quant8Mode::kFp8W8A8;
    if (fp8 && bias_.get() == nullptr && Fp8BlasScaledEnabled()) {
      const absl::Status st = Quant8BlasScaledGemm(weight_.get(), w_scale_.as<float>(), codes,
                                                   x_scale, y, y_dtype, m, n_, k_, stream);
      if (st.ok()) {
        last_blas_ = last_scaled_ = true;
        return absl::OkStatus();
      }
      if (!absl::IsUnimplemented(st)) return st;
      // No outer-vector-scaled algorithm: the accumulator + epilogue path below.
    }
    // Only the accumulator: growing it leaves the codes and scales buffers where they are.
    QSHARD_ASSIGN_OR_RETURN(Quant8Scratch s, GetQuant8Scratch(0, 0, m * n_, 0, 0, stream));
    const absl::Status st = Quant8BlasGemm(fp8, weight_.get(), codes, s.acc, m, n_, k_, stream);
    if (st.ok()) {
      last_blas_ = true;
      return LaunchScaleEpilogue(s.acc, !fp8, x_scale, w_scale_.as<float>(), bias_.as<float>(), y,
                                 y_dtype, m, n_, stream);
    }
    if (!absl::IsUnimplemented(st)) return st;
    // No cuBLASLt algorithm for this shape: the GEMV kernel over 16-row slices serves it.
  }
  last_blas_ = false;
  return RunGemv(codes, x_scale, m, y, y_dtype, stream);
}

}  // namespace qshard::cuda
