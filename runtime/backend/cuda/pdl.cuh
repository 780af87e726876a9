// File: pdl.cuh
// Programmatic dependent launch (compute capability 9.0+): a decode step is ~450 small
// kernels, and each linear's weights, which do not depend on the kernel before it, can
// start streaming toward L2 while that kernel finishes. The linear kernels are launched
// with LaunchPdl; their blocks may then be scheduled as soon as every block of the previous
// kernel has called PdlLaunchDependents (or exited). Before PdlWait such a kernel may only
// read immutable data (its weights); PdlWait returns once the previous kernel has completed
// and its memory writes are visible, so everything after it is ordered as usual.
//
// Kernels that come before a linear call PdlLaunchDependents early; both instructions are
// no-ops for kernels launched without the attribute and on GPUs before sm_90.
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_PDL_CUH_
#define QSHARD_RUNTIME_BACKEND_CUDA_PDL_CUH_

#include <cuda_runtime.h>

#include <utility>

#include "runtime/backend/cuda/cuda_context.h"

namespace qshard::cuda {

__device__ __forceinline__ void PdlWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void PdlLaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Pulls the 128-byte line holding `p` toward L2 (no register result, nothing to wait for).
__device__ __forceinline__ void PrefetchL2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream serialization
// allowed when ProgrammaticLaunchEnabled().
template <typename... Params, typename... Args>
cudaError_t LaunchPdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                      cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = ProgrammaticLaunchEnabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_PDL_CUH_
