// File: cuda_check.h
// Turns CUDA runtime and cuBLAS(Lt) return codes into absl::Status with the failing
// expression, file:line and the library's own error string, so a failure deep inside a
// launcher reads like "cudaMalloc(&p, bytes) failed at cuda_context.cc:41: out of memory".
//
//   QSHARD_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(p, 0, bytes, stream));
//   MyKernel<<<grid, block, 0, stream>>>(...);
//   QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();   // every launch is checked
//   QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(...));
//
// Kernel launches are asynchronous: a launch check catches bad configurations (too many
// threads, too much shared memory, no kernel image for this GPU); faults inside the
// kernel surface at the next synchronizing call, which is checked the same way.
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_CUDA_CHECK_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_CUDA_CHECK_H_

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "absl/status/status.h"

namespace qshard::cuda::internal {

// A non-OK status for `err` (which must not be cudaSuccess).
absl::Status CudaErrorToStatus(cudaError_t err, const char* expr, const char* file, int line);
// A non-OK status for `status` (which must not be CUBLAS_STATUS_SUCCESS).
absl::Status CublasErrorToStatus(cublasStatus_t status, const char* expr, const char* file,
                                 int line);

}  // namespace qshard::cuda::internal

#define QSHARD_CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                      \
    const cudaError_t qshard_cuda_err_ = (expr);                                            \
    if (qshard_cuda_err_ != cudaSuccess) {                                                  \
      return ::qshard::cuda::internal::CudaErrorToStatus(qshard_cuda_err_, #expr, __FILE__, \
                                                         __LINE__);                         \
    }                                                                                       \
  } while (0)

// Checks the launch that was just issued (cudaGetLastError also clears a non-sticky
// error so it is not blamed on a later, unrelated call).
#define QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR() QSHARD_CUDA_RETURN_IF_ERROR(cudaGetLastError())

#define QSHARD_CUBLAS_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                         \
    const cublasStatus_t qshard_cublas_st_ = (expr);                                           \
    if (qshard_cublas_st_ != CUBLAS_STATUS_SUCCESS) {                                          \
      return ::qshard::cuda::internal::CublasErrorToStatus(qshard_cublas_st_, #expr, __FILE__, \
                                                           __LINE__);                          \
    }                                                                                          \
  } while (0)

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_CUDA_CHECK_H_
