// File: elementwise.h
// Host launchers for the small per-element CUDA ops of a decoder layer: rotary position
// embedding (RoPE), SiLU-and-multiply (also on a fused gate|up output), the column split of
// a fused q|k|v output, residual add, row gather, dtype cast and the absolute maximum (for
// fp8 KV scales). Plain C++ (no device code), so .cc files built by
// the host compiler can call them; the kernels live in elementwise.cu.
//
// All pointers are device memory, shapes row-major. Activations are fp32 or bf16
// (DType::kF32 / kBF16; Cast and GatherRows also take f16); arithmetic is fp32 and bf16
// results are rounded to nearest even, like the CPU's F32ToBf16. The launchers only
// enqueue work on `stream` (no allocation, no host synchronization): OK means the launch
// was accepted; faults inside a kernel show at the next synchronizing call.
//
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchRope(q, k, DType::kBF16, T, 32, 8, 128, positions,
//                                           inv_freq, stream));
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchSiluMul(gate, up, gate, DType::kBF16, T, 14336, stream));
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchSplitColumns(qkv, DType::kBF16, T, {q, k, v},
//                                                   {4096, 1024, 1024}, stream));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_ELEMENTWISE_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_ELEMENTWISE_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "runtime/base/dtype.h"

namespace qshard::cuda {

// Rotates q [T, q_heads * head_dim] and k [T, kv_heads * head_dim] in place (HF
// rotate-half: element i pairs with i + head_dim / 2). For token t and pair i the angle is
// float(positions[t]) * inv_freq[i], formed in fp32 exactly as the CPU does, then cos/sin
// are taken with the accurate sincosf (not __sinf: angles reach 1e5 rad at long context).
//   positions: int32 [T]; inv_freq: fp32 [head_dim / 2] (RopeInvFrequencies, uploaded:
//   every RoPE variant - default, linear, llama3 - is just a different table).
// head_dim must be even; dtype f32 or bf16.
absl::Status LaunchRope(void* q, void* k, DType dtype, int64_t T, int64_t q_heads,
                        int64_t kv_heads, int64_t head_dim, const int32_t* positions,
                        const float* inv_freq, cudaStream_t stream);

// out[r, c] = silu(gate[r, c]) * up[r, c] = gate / (1 + exp(-gate)) * up, all [rows, cols]
// in `dtype` (f32/bf16). out may alias gate (or up): each element is read before it is written
// by the same thread.
absl::Status LaunchSiluMul(const void* gate, const void* up, void* out, DType dtype, int64_t rows,
                           int64_t cols, cudaStream_t stream);

// The output of a fused gate|up Linear: gate_up [rows, 2 * cols] (gate in columns
// [0, cols), up in [cols, 2 * cols) of each row) -> out [rows, cols] = silu(gate) * up,
// LaunchSiluMul's arithmetic. dtype f32/bf16 for both; out must not overlap gate_up.
// Optional fp8 side output (bf16 only): codes [rows, cols] e4m3 (16-byte aligned) and scales
// fp32 [rows], the per-token quantization of the stored rows, bit for bit what the fp8
// linear's own quantize step would make of `out` (one block per row then).
absl::Status LaunchSiluMulPacked(const void* gate_up, void* out, DType dtype, int64_t rows,
                                 int64_t cols, cudaStream_t stream, uint8_t* codes = nullptr,
                                 float* scales = nullptr);

// Most outputs LaunchSplitColumns takes in one launch.
inline constexpr int kMaxSplitOutputs = 8;

// The output of a fused q|k|v Linear split into its parts: x [rows, sum(out_cols)] ->
// outs[i] [rows, out_cols[i]] = x[:, c_i : c_i + out_cols[i]] (c_i the sum of the earlier
// widths), one launch for all parts. dtype f32/bf16/f16 (a plain copy); outs must not
// overlap x or each other. At most kMaxSplitOutputs outputs, each at least one column.
absl::Status LaunchSplitColumns(const void* x, DType dtype, int64_t rows,
                                absl::Span<void* const> outs, absl::Span<const int64_t> out_cols,
                                cudaStream_t stream);

// x[i] += y[i] for i < n; x and y are f32 or bf16 independently (the sum is formed in fp32
// and rounded once to x's dtype).
absl::Status LaunchAdd(void* x, DType x_dtype, const void* y, DType y_dtype, int64_t n,
                       cudaStream_t stream);

// out[i, :] = src[rows[i], :] for i < n_rows; src / out [*, cols] in dtype (f32/bf16/f16).
// rows live on the device and cannot be checked before the launch: a negative row index fills
// the output row with NaN (it cannot be checked against the source's row count, which this
// launcher is not told, so callers must pass valid indices).
absl::Status LaunchGatherRows(const void* src, DType dtype, int64_t cols, const int32_t* rows,
                              int64_t n_rows, void* out, cudaStream_t stream);

// dst[i] = convert(src[i]) for i < n; both dtypes in {f32, bf16, f16}; narrowing rounds to
// nearest even. src and dst must not overlap unless they are the same dtype and pointer.
absl::Status LaunchCast(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n,
                        cudaStream_t stream);

// *out = max_i |x[i]| (0 for n == 0), x f32 or bf16. `out` is one device float; it is
// overwritten (a memset on `stream`, then an atomicMax of the per-block maxima, which is
// exact and order-independent for non-negative floats compared as integers). A NaN input
// yields NaN (its bit pattern is above +inf's).
absl::Status LaunchAbsMax(const void* x, DType dtype, int64_t n, float* out, cudaStream_t stream);

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_ELEMENTWISE_H_
