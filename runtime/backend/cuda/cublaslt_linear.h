// File: cublaslt_linear.h
// Dense BF16 / FP16 linear layer through cuBLASLt: y[m, n] = x[m, k] . w[n, k]^T, with w in the
// Hugging Face layout (row-major [out_features, in_features]), x bf16 row-major, y bf16
// or fp32 row-major, fp32 accumulation (CUBLAS_COMPUTE_32F).
//
// cuBLASLt is column-major. A row-major [r, c] matrix is the same memory as a column-major
// [c, r] one, so the row-major product y = x . w^T is computed as the column-major
//   y^T[n, m] = w[n, k] . x^T[k, m]
// where w's memory is column-major [k, n] (so A = w with TRANSA = T) and x's memory is
// column-major [k, m] (B = x, TRANSB = N); D = y^T, column-major [n, m], leading dim n.
//
// The algorithm is picked by cublasLtMatmulAlgoGetHeuristic once per problem (shape,
// output dtype, pointer alignments) and cached with its descriptors, so a decode step
// pays only for cublasLtMatmul itself.
//
//   QSHARD_ASSIGN_OR_RETURN(auto blas, cuda::CublasLtLinear::Create());
//   QSHARD_RETURN_IF_ERROR(blas->Linear(x, w, y, DType::kF32, m, n, k, stream));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_CUBLASLT_LINEAR_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_CUBLASLT_LINEAR_H_

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"

namespace qshard::cuda {

class CublasLtLinear {
 public:
  // 32 MiB: what NVIDIA recommends for Hopper, enough for every split-K / stream-K
  // algorithm the heuristic may pick.
  static constexpr size_t kDefaultWorkspaceBytes = size_t{32} << 20;

  // Creates the handle and the workspace on the current device.
  static absl::StatusOr<std::unique_ptr<CublasLtLinear>> Create(
      size_t workspace_bytes = kDefaultWorkspaceBytes);
  ~CublasLtLinear();
  CublasLtLinear(const CublasLtLinear&) = delete;
  CublasLtLinear& operator=(const CublasLtLinear&) = delete;

  // y[m, n] = x[m, k] . w[n, k]^T, enqueued on `stream`.
  //   x, w: [m, k], [n, k] in ab_dtype (kBF16, or kF16 for fp16 checkpoints); y: [m, n] in
  //   y_dtype (kF32 or kBF16); all device, row-major and dense. y must not overlap x or w.
  // The workspace is shared by all calls, so calls on different streams must not run
  // concurrently: use one CublasLtLinear per stream.
  absl::Status Linear(const void* x, const void* w, void* y, DType y_dtype, int64_t m, int64_t n,
                      int64_t k, cudaStream_t stream, DType ab_dtype = DType::kBF16);

  // Number of problems whose algorithm has been chosen so far (for tests and stats).
  size_t cached_plans() const;
  // Forgets every plan, so the next call of each problem chooses again (benchmarks that
  // compare the heuristic's choice with BlasAutotuneEnabled()'s). Not during a capture.
  void ClearPlans();

 private:
  // (m, n, k, y dtype, alignment of x, w, y in bytes, x/w dtype): the heuristic's answer
  // depends on all.
  using PlanKey =
      std::tuple<int64_t, int64_t, int64_t, DType, uint32_t, uint32_t, uint32_t, DType>;
  struct Plan;

  CublasLtLinear(cublasLtHandle_t handle, DeviceBuffer workspace);
  // The plan of `key`, built on first use. x, w, y, stream: the first call's operands, on
  // which the candidates are timed when autotuning.
  absl::StatusOr<const Plan*> GetPlan(const PlanKey& key, const void* x, const void* w, void* y,
                                      cudaStream_t stream);
  // Times each candidate algorithm on the operands (a few runs each) and returns the index
  // of the fastest; the operands' contents are not changed but y's.
  absl::StatusOr<size_t> FastestAlgo(const Plan& plan, const cublasLtMatmulAlgo_t* algos,
                                     size_t count, const void* x, const void* w, void* y,
                                     cudaStream_t stream);

  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer workspace_;
  mutable std::mutex mu_;
  std::map<PlanKey, std::unique_ptr<Plan>> plans_;  // guarded by mu_
};

// Process-wide switch: with it on, a problem's first call times up to 8 of the heuristic's
// candidate algorithms on its real operands (one host synchronization, once per problem;
// never while the stream is being captured into a graph) and keeps the fastest, instead of
// the heuristic's first choice. The choice is shared by every CublasLtLinear of the process
// (so two backends give the same bits), but it may differ between processes, as timing
// does, and with it the rounding of the sums: like cuDNN's benchmark mode. Off by default
// until a GPU run has measured it; QSHARD_CUDA_BLAS_AUTOTUNE=1 at first use turns it on.
void SetBlasAutotune(bool on);
bool BlasAutotuneEnabled();

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_CUBLASLT_LINEAR_H_
