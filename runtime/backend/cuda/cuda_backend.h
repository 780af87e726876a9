// File: cuda_backend.h
// The CUDA implementation of the Backend interface (runtime/backend/backend.h): one GPU,
// one stream, tensor parallel size 1.
//
// Precision: activations between ops are bf16 (what the tensor cores read), the residual
// stream and the logits fp32 (Backend::AllocateF32), norm weights fp32, every reduction
// and matrix product accumulates in fp32. Linear layers run the kernel the checkpoint's
// format calls for: cuBLASLt for dense bf16/fp16, our own Marlin-style kernel for
// GPTQ/AWQ/pack-quantized integer weights, the FP8/INT8 W8A8 kernels for fp8/int8.
//
// Memory: weights and the KV cache are allocated once; the tensors of a forward step come
// from a per-step arena that BeginStep rewinds (no cudaMalloc in the steady state). The
// step's index arrays (positions, slots, block tables, token ids) are staged in pinned
// host memory and uploaded with one copy each.
//
// Errors: the op methods of Backend return nothing, so the first failure inside a step
// (a rejected launch, an unsupported dtype) is kept and returned by the next CopyToHost or
// BeginStep; later ops of the failed step are skipped.
//
//   QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> gpu, CreateCudaBackend());
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_CUDA_BACKEND_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_CUDA_BACKEND_H_

#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/statusor.h"
#include "runtime/backend/backend.h"

namespace qshard {

// The first visible GPU (CUDA_VISIBLE_DEVICES selects another). Fails with a clear
// message when there is no driver or device.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend();

// Decode steps captured into CUDA graphs and replayed (see cuda_backend.cc). On by
// default; QSHARD_CUDA_GRAPHS=0 in the environment turns it off at creation. Fails when
// `backend` is not a CUDA backend.
absl::Status SetCudaGraphs(Backend& backend, bool on);
// Sampling on the GPU (Backend::Sample; the engine then never copies logits to the host).
// On by default; QSHARD_CUDA_SAMPLING=0 in the environment turns it off at creation.
// Fails when `backend` is not a CUDA backend.
absl::Status SetCudaSampling(Backend& backend, bool on);
// (graphs captured, graph replays) so far; (0, 0) for other backends.
std::pair<int64_t, int64_t> CudaGraphStats(const Backend& backend);

// Forgets the backend's cuBLASLt plans (and drops its CUDA graphs, which hold them), so the
// next call of each dense problem chooses its algorithm again: for benchmarks comparing
// the heuristic's choice with cuda::SetBlasAutotune's.
absl::Status ResetCudaBlasPlans(Backend& backend);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_CUDA_BACKEND_H_
