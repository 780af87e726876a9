// Row-wise kernels: embedding gather, RMSNorm, residual add + RMSNorm.
//
// All three are memory-bound (a few flops per element), so the design goal is to move
// each byte once, in wide coalesced accesses:
//   - one thread block per row; each thread handles whole 16-byte vectors (kVec elements)
//     strided by the block size, so a warp reads 512 contiguous bytes per step;
//   - kVec = 16 / sizeof(widest element type) so no access exceeds 16 bytes; the launcher
//     falls back to kVec = 1 when d is not a multiple of kVec or a pointer is not aligned
//     (a row view in the middle of a buffer), instead of failing;
//   - the sum of squares is reduced with warp shuffles, then across warps through shared
//     memory (BlockSum), in fp32;
//   - the second pass re-reads the row (it is still in L1/L2: a 4096-wide fp32 row is 16 KB)
//     rather than holding it in registers, which keeps one kernel for every width.
// Each thread visits the same elements in both passes, which is what makes in-place use
// (out == x) and the residual round trip race-free without extra barriers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/act_quant.cuh"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/device_convert.cuh"
#include "runtime/backend/cuda/embedding_rmsnorm.h"
#include "runtime/backend/cuda/pdl.cuh"
#include "runtime/base/status_macros.h"

namespace qshard::cuda {
namespace {

using bf16 = __nv_bfloat16;

// Most threads per block: 16 warps. Enough vectors in flight per row for wide rows, and
// small enough that several rows' blocks share an SM.
constexpr int kMaxThreads = 512;

template <int kVec, typename T>
__device__ __forceinline__ void LoadF32(const T* p, float (&f)[kVec]) {
  const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(p);
#pragma unroll
  for (int i = 0; i < kVec; ++i) f[i] = ToF32(pack.v[i]);
}

template <int kVec, typename T>
__device__ __forceinline__ void StoreF32(T* p, const float (&f)[kVec]) {
  Pack<T, kVec> pack;
#pragma unroll
  for (int i = 0; i < kVec; ++i) pack.v[i] = FromF32<T>(f[i]);
  *reinterpret_cast<Pack<T, kVec>*>(p) = pack;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of `v` over the block; every thread gets the total. blockDim.x must be a multiple
// of 32 (the launchers round up). Called once per kernel, so the shared slots are not
// reused and need no trailing barrier.
__device__ __forceinline__ float BlockSum(float v) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = WarpSum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x >> 5;
    float s = lane < num_warps ? warp_sums[lane] : 0.0f;
    s = WarpSum(s);
    if (lane == 0) total = s;
  }
  __syncthreads();
  return total;
}

// grid: [n]; out[row, :] = table[ids[row], :] (NaN when the id is out of range).
template <typename TableT, typename OutT, int kVec>
__global__ void EmbeddingKernel(const TableT* __restrict__ table, int64_t vocab, int hidden,
                                const int32_t* __restrict__ ids, OutT* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int32_t id = ids[row];
  OutT* out_row = out + row * hidden;
  const int num_vecs = hidden / kVec;
  if (id < 0 || id >= vocab) {
    float nan[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) nan[i] = __int_as_float(0x7fc00000);
    for (int v = threadIdx.x; v < num_vecs; v += blockDim.x)
      StoreF32<kVec>(out_row + v * kVec, nan);
    return;
  }
  const TableT* src = table + static_cast<int64_t>(id) * hidden;
  for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    float f[kVec];
    LoadF32<kVec>(src + v * kVec, f);
    StoreF32<kVec>(out_row + v * kVec, f);
  }
}

// grid: [n]; out[row, :] = x[row, :] * rsqrt(mean(x[row, :]^2) + eps) * weight.
// x and out are not __restrict__: they may be the same buffer.
// codes / scales (bf16 out only; null: none): the fp8 side output (QuantizeStoredRow), row
// `row` at codes + row * d and scales[row].
template <typename InT, typename OutT, int kVec>
__global__ void RmsNormKernel(const InT* x, const float* __restrict__ weight, float eps, int d,
                              OutT* out, uint8_t* __restrict__ codes, float* __restrict__ scales) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * d;
  const InT* x_row = x + offset;
  OutT* out_row = out + offset;
  const int num_vecs = d / kVec;

  float sum_sq = 0.0f;
  for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    float f[kVec];
    LoadF32<kVec>(x_row + v * kVec, f);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum_sq += f[i] * f[i];
  }
  const float inv_rms = rsqrtf(BlockSum(sum_sq) / static_cast<float>(d) + eps);

  float amax = 0.0f;
  for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    float f[kVec];
    float w[kVec];
    LoadF32<kVec>(x_row + v * kVec, f);
    LoadF32<kVec>(weight + v * kVec, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      f[i] = f[i] * inv_rms * w[i];
      amax = fmaxf(amax, fabsf(ToF32(FromF32<OutT>(f[i]))));  // the value as stored
    }
    StoreF32<kVec>(out_row + v * kVec, f);
  }
  if constexpr (std::is_same_v<OutT, __nv_bfloat16>) {
    if (codes != nullptr)
      QuantizeStoredRow<kVec>(out_row, d, amax, codes + offset, scales + blockIdx.x);
  }
}

// grid: [n]; residual[row, :] += x[row, :]; out[row, :] = RmsNorm(residual[row, :]) * weight.
// codes / scales: as RmsNormKernel's.
template <typename ResT, typename InT, typename OutT, int kVec>
__global__ void AddRmsNormKernel(ResT* residual, const InT* x, const float* __restrict__ weight,
                                 float eps, int d, OutT* out, uint8_t* __restrict__ codes,
                                 float* __restrict__ scales) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * d;
  ResT* res_row = residual + offset;
  const InT* x_row = x + offset;
  OutT* out_row = out + offset;
  const int num_vecs = d / kVec;

  float sum_sq = 0.0f;
  for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    float r[kVec];
    float f[kVec];
    LoadF32<kVec>(res_row + v * kVec, r);
    LoadF32<kVec>(x_row + v * kVec, f);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      // Round to the residual's dtype first: the norm must see what later layers read.
      r[i] = ToF32(FromF32<ResT>(r[i] + f[i]));
      sum_sq += r[i] * r[i];
    }
    StoreF32<kVec>(res_row + v * kVec, r);
  }
  const float inv_rms = rsqrtf(BlockSum(sum_sq) / static_cast<float>(d) + eps);

  float amax = 0.0f;
  for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
    float r[kVec];
    float w[kVec];
    LoadF32<kVec>(res_row + v * kVec, r);  // this thread's own writes from the first pass
    LoadF32<kVec>(weight + v * kVec, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      r[i] = r[i] * inv_rms * w[i];
      amax = fmaxf(amax, fabsf(ToF32(FromF32<OutT>(r[i]))));  // the value as stored
    }
    StoreF32<kVec>(out_row + v * kVec, r);
  }
  if constexpr (std::is_same_v<OutT, __nv_bfloat16>) {
    if (codes != nullptr)
      QuantizeStoredRow<kVec>(out_row, d, amax, codes + offset, scales + blockIdx.x);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<float>) or f(TypeTag<bf16>) for an activation dtype.
template <typename F>
absl::Status DispatchActivation(DType dtype, const char* what, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(TypeTag<float>{});
    case DType::kBF16:
      return f(TypeTag<bf16>{});
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          std::string(what), " must be float32 or bfloat16, got ", std::string(DTypeName(dtype))));
  }
}

bool IsAligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Threads for a row of `num_vecs` vectors: one vector per thread up to kMaxThreads
// (then each thread loops), rounded up to whole warps as BlockSum requires.
int ThreadsFor(int64_t num_vecs) {
  const int64_t warps = (num_vecs + 31) / 32;
  return static_cast<int>(std::clamp<int64_t>(warps * 32, 32, kMaxThreads));
}

absl::Status CheckRows(const char* op, int64_t n, int64_t d) {
  // grid.x holds the row count (at most 2^31 - 1); columns are indexed with int.
  if (n < 0 || n > std::numeric_limits<int32_t>::max() || d <= 0 ||
      d > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(op), ": bad shape [", n, ", ", d, "]"));
  }
  return absl::OkStatus();
}

// The fp8 side output: both pointers or neither, bf16 rows only, codes 16-byte aligned.
absl::Status CheckSideCodes(const char* op, DType out_dtype, const uint8_t* codes,
                            const float* scales) {
  if (codes == nullptr && scales == nullptr) return absl::OkStatus();
  if (codes == nullptr || scales == nullptr || out_dtype != DType::kBF16 ||
      reinterpret_cast<uintptr_t>(codes) % 16 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(std::string(op),
                     ": the fp8 side output needs codes (16-byte aligned) and scales "
                     "together, and a bfloat16 output, got ",
                     std::string(DTypeName(out_dtype))));
  }
  return absl::OkStatus();
}

absl::Status CheckPointers(const char* op, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(std::string(op), ": null pointer"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchEmbedding(const void* table, DType table_dtype, int64_t vocab, int64_t hidden,
                             const int32_t* ids, int64_t n, void* out, DType out_dtype,
                             cudaStream_t stream) {
  QSHARD_RETURN_IF_ERROR(CheckRows("Embedding", n, hidden));
  if (vocab <= 0) return absl::InvalidArgumentError(absl::StrCat("Embedding: vocab ", vocab));
  auto with_table = [&](auto table_tag) -> absl::Status {
    using TableT = typename decltype(table_tag)::type;
    return DispatchActivation(out_dtype, "Embedding output", [&](auto out_tag) -> absl::Status {
      using OutT = typename decltype(out_tag)::type;
      if (n == 0) return absl::OkStatus();
      QSHARD_RETURN_IF_ERROR(CheckPointers("Embedding", {table, ids, out}));
      constexpr int kVec = 16 / std::max(sizeof(TableT), sizeof(OutT));
      const auto* t = static_cast<const TableT*>(table);
      auto* o = static_cast<OutT*>(out);
      if (hidden % kVec == 0 && IsAligned(table, kVec * sizeof(TableT)) &&
          IsAligned(out, kVec * sizeof(OutT))) {
        EmbeddingKernel<TableT, OutT, kVec>
            <<<static_cast<unsigned>(n), ThreadsFor(hidden / kVec), 0, stream>>>(
                t, vocab, static_cast<int>(hidden), ids, o);
      } else {
        EmbeddingKernel<TableT, OutT, 1>
            <<<static_cast<unsigned>(n), ThreadsFor(hidden), 0, stream>>>(
                t, vocab, static_cast<int>(hidden), ids, o);
      }
      QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
      return absl::OkStatus();
    });
  };
  switch (table_dtype) {
    case DType::kBF16:
      return with_table(TypeTag<bf16>{});
    case DType::kF16:
      return with_table(TypeTag<__half>{});
    case DType::kF32:
      return with_table(TypeTag<float>{});
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("Embedding table must be bfloat16, float16 or float32, got ",
                       std::string(DTypeName(table_dtype))));
  }
}

absl::Status LaunchRmsNorm(const void* x, DType x_dtype, const void* weight, float eps, int64_t n,
                           int64_t d, void* out, DType out_dtype, cudaStream_t stream,
                           uint8_t* codes, float* scales) {
  QSHARD_RETURN_IF_ERROR(CheckRows("RmsNorm", n, d));
  QSHARD_RETURN_IF_ERROR(CheckSideCodes("RmsNorm", out_dtype, codes, scales));
  if (x == out && x_dtype != out_dtype) {
    return absl::InvalidArgumentError("RmsNorm: in place needs equal input and output dtypes");
  }
  return DispatchActivation(x_dtype, "RmsNorm input", [&](auto in_tag) -> absl::Status {
    return DispatchActivation(out_dtype, "RmsNorm output", [&](auto out_tag) -> absl::Status {
      using InT = typename decltype(in_tag)::type;
      using OutT = typename decltype(out_tag)::type;
      if (n == 0) return absl::OkStatus();
      QSHARD_RETURN_IF_ERROR(CheckPointers("RmsNorm", {x, weight, out}));
      constexpr int kVec = 16 / std::max(sizeof(InT), sizeof(OutT));
      const auto* xi = static_cast<const InT*>(x);
      const auto* w = static_cast<const float*>(weight);
      auto* o = static_cast<OutT*>(out);
      if (d % kVec == 0 && IsAligned(x, kVec * sizeof(InT)) &&
          IsAligned(weight, kVec * sizeof(float)) && IsAligned(out, kVec * sizeof(OutT))) {
        (void)LaunchPdl(RmsNormKernel<InT, OutT, kVec>, dim3(static_cast<unsigned>(n)),
                        dim3(ThreadsFor(d / kVec)), 0, stream, xi, w, eps, static_cast<int>(d), o,
                        codes, scales);
      } else {
        (void)LaunchPdl(RmsNormKernel<InT, OutT, 1>, dim3(static_cast<unsigned>(n)),
                        dim3(ThreadsFor(d)), 0, stream, xi, w, eps, static_cast<int>(d), o, codes,
                        scales);
      }
      QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
      return absl::OkStatus();
    });
  });
}

absl::Status LaunchAddRmsNorm(void* residual, DType residual_dtype, const void* x, DType x_dtype,
                              const void* weight, float eps, int64_t n, int64_t d, void* out,
                              DType out_dtype, cudaStream_t stream, uint8_t* codes, float* scales) {
  QSHARD_RETURN_IF_ERROR(CheckRows("AddRmsNorm", n, d));
  QSHARD_RETURN_IF_ERROR(CheckSideCodes("AddRmsNorm", out_dtype, codes, scales));
  if (out == residual && n > 0) {
    return absl::InvalidArgumentError("AddRmsNorm: out must not be the residual buffer");
  }
  if (x == out && x_dtype != out_dtype) {
    return absl::InvalidArgumentError("AddRmsNorm: out == x needs equal dtypes");
  }
  return DispatchActivation(residual_dtype, "AddRmsNorm residual", [&](auto res_tag) {
    return DispatchActivation(x_dtype, "AddRmsNorm input", [&](auto in_tag) {
      return DispatchActivation(out_dtype, "AddRmsNorm output", [&](auto out_tag) -> absl::Status {
        using ResT = typename decltype(res_tag)::type;
        using InT = typename decltype(in_tag)::type;
        using OutT = typename decltype(out_tag)::type;
        if (n == 0) return absl::OkStatus();
        QSHARD_RETURN_IF_ERROR(CheckPointers("AddRmsNorm", {residual, x, weight, out}));
        constexpr int kVec = 16 / std::max({sizeof(ResT), sizeof(InT), sizeof(OutT)});
        auto* r = static_cast<ResT*>(residual);
        const auto* xi = static_cast<const InT*>(x);
        const auto* w = static_cast<const float*>(weight);
        auto* o = static_cast<OutT*>(out);
        if (d % kVec == 0 && IsAligned(residual, kVec * sizeof(ResT)) &&
            IsAligned(x, kVec * sizeof(InT)) && IsAligned(weight, kVec * sizeof(float)) &&
            IsAligned(out, kVec * sizeof(OutT))) {
          (void)LaunchPdl(AddRmsNormKernel<ResT, InT, OutT, kVec>, dim3(static_cast<unsigned>(n)),
                          dim3(ThreadsFor(d / kVec)), 0, stream, r, xi, w, eps, static_cast<int>(d),
                          o, codes, scales);
        } else {
          (void)LaunchPdl(AddRmsNormKernel<ResT, InT, OutT, 1>, dim3(static_cast<unsigned>(n)),
                          dim3(ThreadsFor(d)), 0, stream, r, xi, w, eps, static_cast<int>(d), o,
                          codes, scales);
        }
        QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
        return absl::OkStatus();
      });
    });
  });
}

}  // namespace qshard::cuda
