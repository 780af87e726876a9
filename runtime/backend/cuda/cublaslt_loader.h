// File: cublaslt_loader.h
// cuBLASLt is loaded on first use (cublaslt_loader.cc defines the cublasLt* functions this
// backend calls and forwards them to the library opened with dlopen) instead of being
// linked. Why: a library linked at start-up has its thread-local storage carved out of
// every thread's stack, cuBLASLt's is ~94 KB, and civetweb (the HTTP server behind the
// Prometheus exposer) starts its threads with a fixed 100 KB stack, so with cuBLASLt
// linked `qshard serve` could not open its metrics port at all. A dlopen'ed library's TLS
// is allocated on demand instead. Code keeps calling the cublasLt* API as usual.
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_CUBLASLT_LOADER_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_CUBLASLT_LOADER_H_

#include <string>

namespace qshard::cuda {

// Why cuBLASLt could not be loaded (every cublasLt* call then returns
// CUBLAS_STATUS_NOT_INITIALIZED); empty when it loaded or was not needed yet.
std::string CublasLtLoadError();

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_CUBLASLT_LOADER_H_
