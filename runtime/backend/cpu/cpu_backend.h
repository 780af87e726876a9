// File: cpu_backend.h
// The Backend implementation for the host CPU: fp32 activations, weights read in place
// (mmap'd bf16/f16/f32), paged K/V cache in host memory, threaded SIMD ops.
#ifndef QSHARD_RUNTIME_BACKEND_CPU_CPU_BACKEND_H_
#define QSHARD_RUNTIME_BACKEND_CPU_CPU_BACKEND_H_

#include <memory>

#include "runtime/backend/backend.h"

namespace qshard {

std::unique_ptr<Backend> CreateCpuBackend();

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BACKEND_CPU_CPU_BACKEND_H_
