// File: pdl.cuh
// Programmatic dependent launch (compute capability 9.0+). A decode step is ~450 small
// kernels; with LaunchPdl a kernel's blocks may be scheduled as soon as every block of the
// kernel before it has called PdlLaunchDependents (or exited), instead of after that kernel
// has drained, which hides most of each launch's ramp-up. Such a kernel must call PdlWait
// before it reads anything the kernel before it may write: PdlWait returns once that kernel
// has completed and its memory writes are visible. The linear kernels (fp8/int8 GEMV, the
// 4-bit/8-bit kernel) first pull their weights, which no kernel writes, toward L2.
//
// Launched this way: RMSNorm (+ residual add), RoPE, KV write, paged attention and its
// split combine, SiLU-and-mul, activation quantization, the linears. Every one calls
// PdlWait then PdlLaunchDependents first; both instructions are no-ops for kernels
// launched without the attribute and on GPUs before sm_90. cuBLASLt's kernels and the
// embedding are launched normally (they then wait for full completion, as usual).
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

// 16 bytes of read-only data that is streamed (weights: each byte used by one warp once):
// ld.global.nc without L1 allocation, so it does not evict what the block reuses.
__device__ __forceinline__ uint4 LoadStreamed16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
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
