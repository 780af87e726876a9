// Per-element kernels: RoPE, SiLU-and-mul (separate or packed gate|up), column split, add,
// row gather, cast, absolute maximum.
//
// All memory-bound; the goal is coalesced, wide accesses and fp32 arithmetic:
//   - SiluMul and Add move kVec elements per thread as one 16-byte access (kVec = 4 for fp32,
//     8 for bf16) when the element count and every pointer allow it, else kVec = 1, in a
//     grid-stride loop (the grid is capped; a thread keeps going until the tensor is done);
//   - RoPE: one thread per (token, head, pair i < head_dim / 2) rotating the pair
//     (x[i], x[i + half]) in place; both elements belong to that thread only, so in-place use
//     needs no barrier; the rotation itself is rope.cuh's RopeRotatePair (shared with the
//     fused q|k|v + RoPE + KV write kernel of attention.cu, so both give the same bits);
//   - SiluMulPacked: as SiluMul, kVec elements of gate and the matching up elements per
//     thread (16-byte accesses when cols and every pointer allow it);
//   - SplitColumns: a copy in units of 16 bytes (uint4) when every part's row width in bytes
//     and every pointer are multiples of 16, else of one element; one thread per unit of the
//     source, which finds its part by scanning the (<= kMaxSplitOutputs) column ends;
//   - GatherRows / Cast / AbsMax are plain grid-stride loops.
// Each thread visits exactly the elements it writes, which is what makes aliasing
// (SiluMul out == gate, in-place RoPE) race-free.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/act_quant.cuh"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/device_convert.cuh"
#include "runtime/backend/cuda/elementwise.h"
#include "runtime/backend/cuda/pdl.cuh"
#include "runtime/backend/cuda/rope.cuh"

namespace qshard::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
// Grid cap for grid-stride loops: plenty of blocks to fill any current GPU.
constexpr int64_t kMaxBlocks = 4096;

int64_t GridFor(int64_t work_items) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (work_items + kThreads - 1) / kThreads));
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------

// One thread per (token, head, pair). Heads 0..q_heads-1 are q's, the rest k's.
template <typename T>
__global__ void RopeKernel(T* q, T* k, int64_t T_tokens, int q_heads, int kv_heads, int half,
                           const int32_t* __restrict__ positions,
                           const float* __restrict__ inv_freq) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int heads = q_heads + kv_heads;
  const int64_t total = T_tokens * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [t, h, i] = SplitRopePairIndex(idx, heads, half);
    T* row = h < q_heads ? q + (t * q_heads + h) * (2 * half)
                         : k + (t * kv_heads + (h - q_heads)) * (2 * half);
    float y1, y2;
    RopeRotatePair(positions[t], inv_freq[i], ToF32(row[i]), ToF32(row[i + half]), &y1, &y2);
    row[i] = FromF32<T>(y1);
    row[i + half] = FromF32<T>(y2);
  }
}

// ---------------------------------------------------------------------------
// SiluMul, Add
// ---------------------------------------------------------------------------

// No __restrict__ on gate / up / out: out may alias either input.
template <typename T, int kVec>
__global__ void SiluMulKernel(const T* gate, const T* up, T* out, int64_t num_vecs) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < num_vecs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Pack<T, kVec> g = reinterpret_cast<const Pack<T, kVec>*>(gate)[v];
    const Pack<T, kVec> u = reinterpret_cast<const Pack<T, kVec>*>(up)[v];
    Pack<T, kVec> o;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float gf = ToF32(g.v[i]);
      // expf (accurate), as the CPU's std::exp; same expression order as cpu::SiluMul.
      o.v[i] = FromF32<T>(gf / (1.0f + expf(-gf)) * ToF32(u.v[i]));
    }
    reinterpret_cast<Pack<T, kVec>*>(out)[v] = o;
  }
}

// gate_up [rows, 2 * cols], out [rows, cols]; vcols = cols / kVec. Each row of gate_up is
// 2 * vcols packs: gate's vcols, then up's.
template <typename T, int kVec>
__global__ void SiluMulPackedKernel(const T* __restrict__ gate_up, T* __restrict__ out,
                                    int64_t rows, int64_t vcols) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int64_t total = rows * vcols;
  using P = Pack<T, kVec>;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = v / vcols;
    const int64_t c = v - r * vcols;
    const P g = reinterpret_cast<const P*>(gate_up)[r * 2 * vcols + c];
    const P u = reinterpret_cast<const P*>(gate_up)[r * 2 * vcols + vcols + c];
    P o;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float gf = ToF32(g.v[i]);
      // Exactly SiluMulKernel's expression (and so cpu::SiluMul's).
      o.v[i] = FromF32<T>(gf / (1.0f + expf(-gf)) * ToF32(u.v[i]));
    }
    reinterpret_cast<P*>(out)[v] = o;
  }
}

// SiluMulPackedKernel's arithmetic with the fp8 side output (act_quant.cuh): one block per
// row of bf16 (the row's largest |value| needs the whole row), out [rows, cols], codes
// [rows, cols] e4m3 and scales [rows].
template <int kVec>
__global__ void __launch_bounds__(1024)
    SiluMulPackedRowKernel(const bf16* __restrict__ gate_up, bf16* __restrict__ out, int cols,
                           uint8_t* __restrict__ codes, float* __restrict__ scales) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  using P = Pack<bf16, kVec>;
  const int64_t r = blockIdx.x;
  const int vcols = cols / kVec;
  const P* g_row = reinterpret_cast<const P*>(gate_up + r * 2 * cols);
  const P* u_row = g_row + vcols;
  bf16* out_row = out + r * cols;
  float amax = 0.0f;
  for (int v = threadIdx.x; v < vcols; v += blockDim.x) {
    const P g = g_row[v];
    const P u = u_row[v];
    P o;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float gf = ToF32(g.v[i]);
      // Exactly SiluMulKernel's expression (and so cpu::SiluMul's).
      o.v[i] = FromF32<bf16>(gf / (1.0f + expf(-gf)) * ToF32(u.v[i]));
      amax = fmaxf(amax, fabsf(ToF32(o.v[i])));
    }
    reinterpret_cast<P*>(out_row)[v] = o;
  }
  QuantizeStoredRow<kVec>(out_row, cols, amax, codes + r * cols, scales + r);
}

// Destinations of SplitColumnsKernel, passed by value (kernel parameter space).
struct SplitTargets {
  void* out[kMaxSplitOutputs];
  int64_t end[kMaxSplitOutputs];  // column end of part i within x, in units of U
  int n = 0;
};

// x [rows, width] in units U -> part i gets columns [end[i-1], end[i]) of every row.
template <typename U>
__global__ void SplitColumnsKernel(const U* __restrict__ x, int64_t rows, int64_t width,
                                   SplitTargets t) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int64_t total = rows * width;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / width;
    const int64_t c = idx - r * width;
    int i = 0;
    while (c >= t.end[i]) ++i;  // c < width = t.end[t.n - 1]: stops within the parts
    const int64_t begin = i == 0 ? 0 : t.end[i - 1];
    const int64_t w = t.end[i] - begin;
    static_cast<U*>(t.out[i])[r * w + (c - begin)] = x[idx];
  }
}

template <typename X, typename Y, int kVec>
__global__ void AddKernel(X* x, const Y* y, int64_t num_vecs) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < num_vecs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Pack<X, kVec> a = reinterpret_cast<const Pack<X, kVec>*>(x)[v];
    const Pack<Y, kVec> b = reinterpret_cast<const Pack<Y, kVec>*>(y)[v];
#pragma unroll
    for (int i = 0; i < kVec; ++i) a.v[i] = FromF32<X>(ToF32(a.v[i]) + ToF32(b.v[i]));
    reinterpret_cast<Pack<X, kVec>*>(x)[v] = a;
  }
}

// ---------------------------------------------------------------------------
// GatherRows, Cast, AbsMax
// ---------------------------------------------------------------------------

template <typename T>
__global__ void GatherRowsKernel(const T* __restrict__ src, int64_t cols,
                                 const int32_t* __restrict__ rows, int64_t n_rows,
                                 T* __restrict__ out) {
  const int64_t total = n_rows * cols;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / cols;
    const int64_t c = idx - r * cols;
    const int32_t s = rows[r];
    out[idx] = s >= 0 ? src[s * cols + c] : FromF32<T>(__int_as_float(0x7fc00000));
  }
}

template <typename S, typename D>
__global__ void CastKernel(const S* src, D* dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = FromF32<D>(ToF32(src[i]));
  }
}

template <typename T>
__global__ void AbsMaxKernel(const T* __restrict__ x, int64_t n, float* out) {
  float m = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float a = fabsf(ToF32(x[i]));
    // Integer compare: keeps a NaN (bits above +inf) instead of dropping it like fmaxf.
    if (__float_as_int(a) > __float_as_int(m)) m = a;
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, m, offset);
    if (__float_as_int(o) > __float_as_int(m)) m = o;
  }
  __shared__ int warp_max[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = __float_as_int(m);
  __syncthreads();
  if (threadIdx.x == 0) {
    int b = 0;
    for (int w = 0; w < kThreads / 32; ++w) b = max(b, warp_max[w]);
    // Non-negative floats order like their bit patterns as signed ints.
    atomicMax(reinterpret_cast<int*>(out), b);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

bool IsAct(DType t) { return t == DType::kF32 || t == DType::kBF16; }
bool IsFloatish(DType t) { return t == DType::kF32 || t == DType::kBF16 || t == DType::kF16; }

absl::Status BadDType(const char* op, DType t) {
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": unsupported dtype ", std::string(DTypeName(t))));
}

// f(TypeTag<float|bf16|__half>) for a dtype the caller has validated.
template <typename F>
auto DispatchFloat(DType t, F&& f) {
  switch (t) {
    case DType::kBF16:
      return f(TypeTag<bf16>{});
    case DType::kF16:
      return f(TypeTag<__half>{});
    default:
      return f(TypeTag<float>{});
  }
}

// f(TypeTag<float|bf16>) for an activation dtype the caller has validated (keeps the f16
// instantiations out of the activation-only ops).
template <typename F>
auto DispatchAct(DType t, F&& f) {
  if (t == DType::kBF16) return f(TypeTag<bf16>{});
  return f(TypeTag<float>{});
}

}  // namespace

absl::Status LaunchRope(void* q, void* k, DType dtype, int64_t T, int64_t q_heads,
                        int64_t kv_heads, int64_t head_dim, const int32_t* positions,
                        const float* inv_freq, cudaStream_t stream) {
  if (!IsAct(dtype)) return BadDType("LaunchRope", dtype);
  if (T < 0 || q_heads < 0 || kv_heads < 0 || head_dim <= 0 || head_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchRope: bad shape T=", T, " q_heads=",
                                                   q_heads, " kv_heads=", kv_heads,
                                                   " head_dim=", head_dim));
  }
  const int64_t total = T * (q_heads + kv_heads) * (head_dim / 2);
  if (total == 0) return absl::OkStatus();
  return DispatchAct(dtype, [&](auto tag) -> absl::Status {
    using E = typename decltype(tag)::type;
    (void)LaunchPdl(RopeKernel<E>, dim3(GridFor(total)), dim3(kThreads), 0, stream,
                    static_cast<E*>(q), static_cast<E*>(k), T, static_cast<int>(q_heads),
                    static_cast<int>(kv_heads), static_cast<int>(head_dim / 2), positions,
                    inv_freq);
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status LaunchSiluMul(const void* gate, const void* up, void* out, DType dtype, int64_t rows,
                           int64_t cols, cudaStream_t stream) {
  if (!IsAct(dtype)) return BadDType("LaunchSiluMul", dtype);
  if (rows < 0 || cols < 0) return absl::InvalidArgumentError("LaunchSiluMul: negative shape");
  const int64_t n = rows * cols;
  if (n == 0) return absl::OkStatus();
  return DispatchAct(dtype, [&](auto tag) -> absl::Status {
    using E = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(E);
    if (n % kVec == 0 && Aligned16(gate) && Aligned16(up) && Aligned16(out)) {
      (void)LaunchPdl(SiluMulKernel<E, kVec>, dim3(GridFor(n / kVec)), dim3(kThreads), 0, stream,
                      static_cast<const E*>(gate), static_cast<const E*>(up), static_cast<E*>(out),
                      n / kVec);
    } else {
      (void)LaunchPdl(SiluMulKernel<E, 1>, dim3(GridFor(n)), dim3(kThreads), 0, stream,
                      static_cast<const E*>(gate), static_cast<const E*>(up), static_cast<E*>(out),
                      n);
    }
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status LaunchSiluMulPacked(const void* gate_up, void* out, DType dtype, int64_t rows,
                                 int64_t cols, cudaStream_t stream, uint8_t* codes, float* scales) {
  if (!IsAct(dtype)) return BadDType("LaunchSiluMulPacked", dtype);
  if (rows < 0 || cols < 0) {
    return absl::InvalidArgumentError("LaunchSiluMulPacked: negative shape");
  }
  if (codes != nullptr || scales != nullptr) {
    if (codes == nullptr || scales == nullptr || dtype != DType::kBF16 || !Aligned16(codes) ||
        rows > INT32_MAX || cols > INT32_MAX) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LaunchSiluMulPacked: the fp8 side output needs codes (16-byte aligned) and scales "
          "together and bfloat16 rows, got ",
          std::string(DTypeName(dtype))));
    }
    if (rows * cols == 0) return absl::OkStatus();
    // One block per row, one 16-byte vector per thread up to 8192 columns.
    const bool vec = cols % 8 == 0 && Aligned16(gate_up) && Aligned16(out);
    const int64_t units = vec ? cols / 8 : cols;
    const int threads = static_cast<int>(std::clamp<int64_t>((units + 31) / 32 * 32, 32, 1024));
    if (vec) {
      (void)LaunchPdl(SiluMulPackedRowKernel<8>, dim3(static_cast<unsigned>(rows)), dim3(threads),
                      0, stream, static_cast<const bf16*>(gate_up), static_cast<bf16*>(out),
                      static_cast<int>(cols), codes, scales);
    } else {
      (void)LaunchPdl(SiluMulPackedRowKernel<1>, dim3(static_cast<unsigned>(rows)), dim3(threads),
                      0, stream, static_cast<const bf16*>(gate_up), static_cast<bf16*>(out),
                      static_cast<int>(cols), codes, scales);
    }
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  }
  if (rows * cols == 0) return absl::OkStatus();
  return DispatchAct(dtype, [&](auto tag) -> absl::Status {
    using E = typename decltype(tag)::type;
    constexpr int kVec = 16 / sizeof(E);
    // cols % kVec keeps up's half of every row (offset cols) on a 16-byte boundary too.
    if (cols % kVec == 0 && Aligned16(gate_up) && Aligned16(out)) {
      (void)LaunchPdl(SiluMulPackedKernel<E, kVec>, dim3(GridFor(rows * cols / kVec)),
                      dim3(kThreads), 0, stream, static_cast<const E*>(gate_up),
                      static_cast<E*>(out), rows, cols / kVec);
    } else {
      (void)LaunchPdl(SiluMulPackedKernel<E, 1>, dim3(GridFor(rows * cols)), dim3(kThreads), 0,
                      stream, static_cast<const E*>(gate_up), static_cast<E*>(out), rows, cols);
    }
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status LaunchSplitColumns(const void* x, DType dtype, int64_t rows,
                                absl::Span<void* const> outs, absl::Span<const int64_t> out_cols,
                                cudaStream_t stream) {
  if (!IsFloatish(dtype)) return BadDType("LaunchSplitColumns", dtype);
  if (outs.size() != out_cols.size() || outs.empty() ||
      outs.size() > static_cast<size_t>(kMaxSplitOutputs)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchSplitColumns: ", outs.size(), " outputs with ", out_cols.size(),
                     " widths (expected 1 to ", kMaxSplitOutputs, " outputs, one width each)"));
  }
  if (rows < 0) return absl::InvalidArgumentError("LaunchSplitColumns: negative rows");
  const size_t esz = DTypeSize(dtype);
  // 16-byte units when every row segment and every pointer stays 16-byte aligned.
  bool wide = Aligned16(x);
  int64_t width = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    if (out_cols[i] <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("LaunchSplitColumns: output ", i, " has ",
                                                     out_cols[i], " columns (expected > 0)"));
    }
    wide = wide && Aligned16(outs[i]) && (out_cols[i] * static_cast<int64_t>(esz)) % 16 == 0;
    width += out_cols[i];
  }
  if (rows == 0) return absl::OkStatus();
  auto launch = [&](auto tag) -> absl::Status {
    using U = typename decltype(tag)::type;
    const int64_t per_unit = static_cast<int64_t>(sizeof(U) / esz);  // elements per unit
    SplitTargets t;
    t.n = static_cast<int>(outs.size());
    int64_t end = 0;
    for (size_t i = 0; i < outs.size(); ++i) {
      end += out_cols[i] / per_unit;
      t.out[i] = outs[i];
      t.end[i] = end;
    }
    const int64_t units = width / per_unit;
    (void)LaunchPdl(SplitColumnsKernel<U>, dim3(GridFor(rows * units)), dim3(kThreads), 0, stream,
                    static_cast<const U*>(x), rows, units, t);
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  };
  if (wide) return launch(TypeTag<uint4>{});
  if (esz == 4) return launch(TypeTag<uint32_t>{});
  return launch(TypeTag<uint16_t>{});
}

absl::Status LaunchAdd(void* x, DType x_dtype, const void* y, DType y_dtype, int64_t n,
                       cudaStream_t stream) {
  if (!IsAct(x_dtype)) return BadDType("LaunchAdd", x_dtype);
  if (!IsAct(y_dtype)) return BadDType("LaunchAdd", y_dtype);
  if (n < 0) return absl::InvalidArgumentError("LaunchAdd: negative n");
  if (n == 0) return absl::OkStatus();
  return DispatchAct(x_dtype, [&](auto xtag) -> absl::Status {
    using X = typename decltype(xtag)::type;
    return DispatchAct(y_dtype, [&](auto ytag) -> absl::Status {
      using Y = typename decltype(ytag)::type;
      // 4 elements per access: 16 bytes of fp32, 8 of bf16 (every combination stays <= 16 B).
      constexpr int kVec = 4;
      if (n % kVec == 0 && Aligned16(x) && Aligned16(y)) {
        AddKernel<X, Y, kVec><<<GridFor(n / kVec), kThreads, 0, stream>>>(
            static_cast<X*>(x), static_cast<const Y*>(y), n / kVec);
      } else {
        AddKernel<X, Y, 1><<<GridFor(n), kThreads, 0, stream>>>(static_cast<X*>(x),
                                                                 static_cast<const Y*>(y), n);
      }
      QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
      return absl::OkStatus();
    });
  });
}

absl::Status LaunchGatherRows(const void* src, DType dtype, int64_t cols, const int32_t* rows,
                              int64_t n_rows, void* out, cudaStream_t stream) {
  if (!IsFloatish(dtype)) return BadDType("LaunchGatherRows", dtype);
  if (cols < 0 || n_rows < 0) return absl::InvalidArgumentError("LaunchGatherRows: negative shape");
  const int64_t total = n_rows * cols;
  if (total == 0) return absl::OkStatus();
  return DispatchFloat(dtype, [&](auto tag) -> absl::Status {
    using E = typename decltype(tag)::type;
    GatherRowsKernel<E><<<GridFor(total), kThreads, 0, stream>>>(
        static_cast<const E*>(src), cols, rows, n_rows, static_cast<E*>(out));
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status LaunchCast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                        cudaStream_t stream) {
  if (!IsFloatish(src_dtype)) return BadDType("LaunchCast", src_dtype);
  if (!IsFloatish(dst_dtype)) return BadDType("LaunchCast", dst_dtype);
  if (n < 0) return absl::InvalidArgumentError("LaunchCast: negative n");
  if (n == 0) return absl::OkStatus();
  return DispatchFloat(src_dtype, [&](auto stag) -> absl::Status {
    using S = typename decltype(stag)::type;
    return DispatchFloat(dst_dtype, [&](auto dtag) -> absl::Status {
      using D = typename decltype(dtag)::type;
      CastKernel<S, D><<<GridFor(n), kThreads, 0, stream>>>(static_cast<const S*>(src),
                                                            static_cast<D*>(dst), n);
      QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
      return absl::OkStatus();
    });
  });
}

absl::Status LaunchAbsMax(const void* x, DType dtype, int64_t n, float* out, cudaStream_t stream) {
  if (!IsAct(dtype)) return BadDType("LaunchAbsMax", dtype);
  if (n < 0) return absl::InvalidArgumentError("LaunchAbsMax: negative n");
  QSHARD_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0, sizeof(float), stream));
  if (n == 0) return absl::OkStatus();
  return DispatchAct(dtype, [&](auto tag) -> absl::Status {
    using E = typename decltype(tag)::type;
    AbsMaxKernel<E><<<GridFor(n), kThreads, 0, stream>>>(static_cast<const E*>(x), n, out);
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

}  // namespace qshard::cuda
