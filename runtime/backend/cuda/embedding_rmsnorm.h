// File: embedding_rmsnorm.h
// Host launchers for the row-wise CUDA ops: embedding gather, RMSNorm and RMSNorm fused
// with the residual add. Plain C++ (no device code) so .cc files compiled by the host
// compiler can call them; the kernels live in embedding_rmsnorm.cu.
//
// All pointers are device memory; shapes are [rows, cols] row-major. Activations are
// fp32 or bf16 (DType::kF32 / kBF16), norm weights fp32 (the backend uploads them as fp32
// whatever the checkpoint stores: exact, and tiny), embedding tables bf16, fp16 or fp32,
// and every reduction accumulates in fp32. The launchers only enqueue work on `stream`: a returned OK means the launch was
// accepted, and faults inside the kernel show at the next synchronizing call.
//
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchEmbedding(table, DType::kBF16, vocab, hidden, ids,
//                                                n, out, DType::kF32, stream));
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchAddRmsNorm(residual, DType::kF32, attn_out,
//                                                 DType::kBF16, norm_w, 1e-5f, n, hidden,
//                                                 normed, DType::kBF16, stream));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_EMBEDDING_RMSNORM_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_EMBEDDING_RMSNORM_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "runtime/base/dtype.h"

namespace qshard::cuda {

// out[n, hidden] = table[ids[i], :].
//   table: [vocab, hidden] in table_dtype (bf16/f16/f32); ids: int32 [n];
//   out: [n, hidden] in out_dtype (f32/bf16).
// ids live on the device, so they cannot be checked before the launch: a row whose id is
// outside [0, vocab) is filled with NaN instead of reading out of bounds, so the mistake
// shows in the logits rather than as silent garbage.
absl::Status LaunchEmbedding(const void* table, DType table_dtype, int64_t vocab, int64_t hidden,
                             const int32_t* ids, int64_t n, void* out, DType out_dtype,
                             cudaStream_t stream);

// out[n, d] = x[n, d] * rsqrt(mean(x^2) + eps) * weight[d].
//   x: [n, d] in x_dtype (f32/bf16); weight: fp32 [d]; out: [n, d] in out_dtype (f32/bf16).
// out may be x itself (in place) when the dtypes are equal.
// Optional fp8 side output (bf16 out only): codes [n, d] e4m3 (16-byte aligned) and scales
// fp32 [n], the per-token quantization of the stored bf16 rows, bit for bit what the fp8
// linear's own quantize step would make of `out` (so it can skip that launch).
absl::Status LaunchRmsNorm(const void* x, DType x_dtype, const void* weight, float eps, int64_t n,
                           int64_t d, void* out, DType out_dtype, cudaStream_t stream,
                           uint8_t* codes = nullptr, float* scales = nullptr);

// residual[n, d] += x[n, d]; then out[n, d] = RmsNorm(residual) * weight, in one pass.
//   residual: [n, d] in residual_dtype (f32/bf16), updated in place (rounded to its dtype,
//   and the norm is taken of the rounded values, which is what later layers read);
//   x: [n, d] in x_dtype; weight: fp32 [d]; out: [n, d] in out_dtype.
// out may be x itself when the dtypes are equal; it must not be residual.
// codes / scales: the optional fp8 side output, as LaunchRmsNorm's.
absl::Status LaunchAddRmsNorm(void* residual, DType residual_dtype, const void* x, DType x_dtype,
                              const void* weight, float eps, int64_t n, int64_t d, void* out,
                              DType out_dtype, cudaStream_t stream, uint8_t* codes = nullptr,
                              float* scales = nullptr);

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_EMBEDDING_RMSNORM_H_
