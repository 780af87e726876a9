// File: dense_linalg.h
// Small dense linear-algebra kernels for the offline quantizers (GPTQ, AWQ): a row-major
// GEMM with accumulation in float and double (AVX2/FMA when the CPU has it, plain loops
// otherwise), a blocked in-place Cholesky and triangular inverse in double, and the
// parallel-for helpers they share.
//
//   GemmAcc(M, N, Kd, -1.0f, a, lda, b, ldb, c, ldc);   // C[M, N] -= A[M, Kd] * B[Kd, N]
//   if (!CholeskyLower(h.data(), k)) { ... not positive definite ... }
//
// Threading: the Parallel* helpers use ThreadPool::Global(). Calls nested inside one of them
// run serially on the calling thread (the pool runs one ParallelFor at a time), but the
// quantizers must not be called from inside a caller's own ParallelFor on the global pool.
#ifndef QSHARD_QUANT_DENSE_LINALG_H_
#define QSHARD_QUANT_DENSE_LINALG_H_

#include <cstdint>
#include <functional>

namespace qshard::quant_internal {

// C[M, N] += alpha * A[M, Kd] * B[Kd, N]; every matrix row-major with its leading dimension.
// Single-threaded: callers split M or N across threads.
void GemmAcc(int64_t M, int64_t N, int64_t Kd, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float* C, int64_t ldc);
void GemmAcc(int64_t M, int64_t N, int64_t Kd, double alpha, const double* A, int64_t lda,
             const double* B, int64_t ldb, double* C, int64_t ldc);

// In-place lower Cholesky factor of the symmetric positive definite a [n, n] (row-major; only
// the lower triangle is read). On success a holds L (upper triangle zeroed, a = L L^T on
// entry). Returns false when a pivot is not positive (or NaN): a is then partly overwritten.
// Threaded.
bool CholeskyLower(double* a, int64_t n);

// In-place inverse of the lower-triangular l [n, n] with a non-zero diagonal (the upper
// triangle must be zero and stays zero). Threaded.
void InvertLowerTriangular(double* l, int64_t n);

// fn(t) for every t in [0, n), spread over the global pool with tile t on part t % parts so
// that tiles of growing cost (triangles) balance. Serial when nested in another Parallel*.
void ParallelTiles(int64_t n, const std::function<void(int64_t)>& fn);
// fn(begin, end) over contiguous chunks of [0, n) of at least min_chunk items.
void ParallelRange(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qshard::quant_internal

#endif  // QSHARD_QUANT_DENSE_LINALG_H_
