// File: ops.h
// CPU reference-and-production ops. Activations are fp32; weights may be bf16/f16/f32
// (read in place, never copied to fp32 except in the GEMM's cache-sized panels). Inner
// loops use AVX2/FMA or AVX-512 when the CPU has them (runtime dispatch, isa.h) and are
// threaded over the global ThreadPool. Linear with > 4 rows runs the packed GEMM (gemm.h).
//
// Shapes are written [rows, cols], row-major.
#ifndef QSHARD_RUNTIME_BACKEND_CPU_OPS_H_
#define QSHARD_RUNTIME_BACKEND_CPU_OPS_H_

#include <cstdint>

#include "runtime/base/tensor.h"

namespace qshard::cpu {

// Whether SIMD kernels (AVX2 + FMA, or AVX-512) are in use. SetSimdEnabled(false) forces
// the portable path (tests); true restores the default ISA (isa.h: SetIsa picks one).
bool HasAvx2();
void SetSimdEnabled(bool enabled);

// out[n, hidden] = table[ids[i], :], table [vocab, hidden] bf16/f16/f32.
void Embedding(const Tensor& table, const int32_t* ids, int64_t n, float* out);

// out[n, d] = x[n, d] * rsqrt(mean(x^2) + eps) * weight[d]; out may alias x.
void RmsNorm(const float* x, const Tensor& weight, float eps, int64_t n, int64_t d, float* out);

// residual[n, d] += x[n, d]; then out[n, d] = RmsNorm(residual) (fused residual add).
void AddRmsNorm(float* residual, const float* x, const Tensor& weight, float eps, int64_t n,
                int64_t d, float* out);

// y[m, n] = x[m, k] . w[n, k]^T (+ bias[n]); w bf16/f16/f32, bias may be null.
void Linear(const float* x, int64_t m, const Tensor& w, const Tensor* bias, float* y);

// out[n, d] = silu(gate[n, d]) * up[n, d]; out may alias gate.
void SiluMul(const float* gate, const float* up, int64_t n, int64_t d, float* out);
// The same on the output of a fused gate|up Linear: gate_up [n, 2d] (row r = gate row r,
// then up row r), out [n, d], not overlapping gate_up. Bit-identical to SiluMul.
void SiluMulPacked(const float* gate_up, int64_t n, int64_t d, float* out);

// outs[i] [n, cols[i]] = x[:, c_i : c_i + cols[i]] of x [n, sum(cols)], c_i the sum of the
// earlier cols (splits the output of a fused q|k|v Linear).
void SplitColumns(const float* x, int64_t n, const int64_t* cols, float* const* outs,
                  int64_t num_outs);

// Converts any float tensor (bf16/f16/f32) of numel elements to fp32.
void ToFloat(const Tensor& t, float* out);

// Dot product of two fp32 vectors (SIMD).
float Dot(const float* a, const float* b, int64_t n);
// y[n] += alpha * x[n] (SIMD).
void Axpy(float alpha, const float* x, float* y, int64_t n);

// Grouped-query attention helpers: the query heads that share one K/V head are contiguous
// rows q[rows, d], so one K or V row is loaded once for all of them.
// out[r] = q[r, :] . k[:] * scale, each dot summed like Dot (same rounding).
void DotRows(const float* q, int64_t rows, const float* k, int64_t d, float scale, float* out);
// acc[r, :] += p[r * p_stride] * v[:] for r < rows.
void AxpyRows(const float* p, int64_t p_stride, const float* v, int64_t rows, int64_t d,
              float* acc);

}  // namespace qshard::cpu

#endif  // QSHARD_RUNTIME_BACKEND_CPU_OPS_H_
