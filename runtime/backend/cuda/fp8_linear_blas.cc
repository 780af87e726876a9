// Host half of the 8-bit linears (fp8_linear.h): the process-wide scratch pool and the
// cuBLASLt 8-bit GEMM used for m > 16.
//
// cuBLASLt is column-major; as in cublaslt_linear.h, the row-major acc[m, n] = codes[m, k] .
// w[n, k]^T is computed as the column-major acc^T[n, m] = w[n, k] . codes^T[k, m] with
// A = w (memory = column-major [k, n], TRANSA = T), B = codes (column-major [k, m],
// TRANSB = N), C = D = acc (column-major [n, m], leading dimension n). "TN" is also the only
// operand layout cuBLASLt accepts for fp8 and the one int8 IMMA kernels want.
//   fp8:  A, B CUDA_R_8F_E4M3, C = D CUDA_R_32F, CUBLAS_COMPUTE_32F, unit alpha (the per-token
//         x per-channel scales are applied by LaunchScaleEpilogue; the tensor-wide scale
//         pointers of cuBLASLt cannot express them on Hopper), fast accumulation left off.
//   int8: A, B CUDA_R_8I, C = D CUDA_R_32I, CUBLAS_COMPUTE_32I, int32 alpha = 1, beta = 0
//         (exact integer sums, like the GEMV kernel).
//   fp8 scaled (Quant8BlasScaledGemm): as fp8, but the per-channel (A = w, one fp32 per
//         output feature) and per-token (B = codes, one fp32 per row of x) scales are given
//         to cuBLASLt as "outer vector" scales (CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F,
//         cuBLAS 12.9+ on Hopper: D[i, j] = scaleA[i] * scaleB[j] * (A . B)[i, j]) and D
//         is y itself (bf16 or fp32): no fp32 accumulator round trip, no epilogue kernel.
// The algorithm is chosen by cublasLtMatmulAlgoGetHeuristic once per (kind, m, n, k,
// alignments) and cached with its descriptors; a shape with no algorithm is cached as such
// and reported as UnimplementedError, so the caller falls back to the GEMV kernel at once.
//
// The pool (and the handle) are created on first use and never destroyed: freeing device
// memory from a static destructor can run after the CUDA runtime has shut down.
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/backend/cuda/fp8_linear.h"
#include "runtime/base/status_macros.h"

namespace qshard::cuda {
namespace {

constexpr size_t kWorkspaceBytes = size_t{32} << 20;

uint32_t AlignmentOf(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lowest_bit = a & (~a + 1);
  return (lowest_bit == 0 || lowest_bit > 256) ? 256u : static_cast<uint32_t>(lowest_bit);
}

using PreferencePtr = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                                      decltype(&cublasLtMatmulPreferenceDestroy)>;

struct Plan {
  bool ok = false;  // false: cuBLASLt has no algorithm for this problem
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t w_layout = nullptr;
  cublasLtMatrixLayout_t x_layout = nullptr;
  cublasLtMatrixLayout_t acc_layout = nullptr;
  cublasLtMatmulAlgo_t algo{};
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (acc_layout != nullptr) (void)cublasLtMatrixLayoutDestroy(acc_layout);
    if (x_layout != nullptr) (void)cublasLtMatrixLayoutDestroy(x_layout);
    if (w_layout != nullptr) (void)cublasLtMatrixLayoutDestroy(w_layout);
    if (op != nullptr) (void)cublasLtMatmulDescDestroy(op);
  }
};

enum class GemmKind : int { kInt8 = 0, kFp8 = 1, kFp8ScaledBf16 = 2, kFp8ScaledF32 = 3 };

// (kind, m, n, k, alignment of w, codes, acc or y)
using PlanKey = std::tuple<GemmKind, int64_t, int64_t, int64_t, uint32_t, uint32_t, uint32_t>;

struct Pool {
  std::mutex mu;
  DeviceBuffer codes, x_scale, acc, partials, counters;
  cublasLtHandle_t handle = nullptr;
  DeviceBuffer workspace;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
};

Pool& GetPool() {
  static Pool* pool = new Pool();  // leaked on purpose (see the file comment)
  return *pool;
}

// Grows `buf` to `bytes` (no-op when it is large enough). The old buffer may still be read
// by kernels queued on `stream`, hence the synchronization before it is freed.
absl::Status Grow(DeviceBuffer& buf, size_t bytes, bool zero, cudaStream_t stream) {
  if (bytes <= buf.size()) return absl::OkStatus();
  QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  BumpScratchGeneration();  // captured graphs point at the old buffer
  buf = DeviceBuffer();
  QSHARD_ASSIGN_OR_RETURN(buf, DeviceBuffer::Allocate(bytes));
  if (zero) QSHARD_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(buf.get(), 0, bytes, stream));
  return absl::OkStatus();
}

// Scaled kinds: the scale pointers are per call (set on plan->op before each matmul); the
// heuristic is asked with the first call's.
absl::StatusOr<Plan*> GetPlan(Pool& pool, const PlanKey& key, const float* w_scale = nullptr,
                              const float* x_scale = nullptr) {
  if (auto it = pool.plans.find(key); it != pool.plans.end()) return it->second.get();
  const auto [kind, m, n, k, align_w, align_x, align_acc] = key;
  const bool fp8 = kind != GemmKind::kInt8;
  const bool scaled = kind == GemmKind::kFp8ScaledBf16 || kind == GemmKind::kFp8ScaledF32;
  auto plan = std::make_unique<Plan>();
  const cudaDataType_t in_type = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_8I;
  const cudaDataType_t acc_type = kind == GemmKind::kFp8ScaledBf16 ? CUDA_R_16BF
                                  : fp8                            ? CUDA_R_32F
                                                                   : CUDA_R_32I;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(
      &plan->op, fp8 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32I, fp8 ? CUDA_R_32F : CUDA_R_32I));
  const cublasOperation_t trans_w = CUBLAS_OP_T;
  const cublasOperation_t trans_x = CUBLAS_OP_N;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_w, sizeof(trans_w)));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_x, sizeof(trans_x)));
  if (scaled) {
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    for (const auto attr : {CUBLASLT_MATMUL_DESC_A_SCALE_MODE, CUBLASLT_MATMUL_DESC_B_SCALE_MODE}) {
      // INVALID_VALUE / NOT_SUPPORTED here: a cuBLASLt without outer-vector scales.
      const cublasStatus_t st = cublasLtMatmulDescSetAttribute(plan->op, attr, &mode, sizeof(mode));
      if (st != CUBLAS_STATUS_SUCCESS) {
        Plan* raw = plan.get();  // ok stays false: cached as "no algorithm"
        pool.plans.emplace(key, std::move(plan));
        return raw;
      }
    }
    QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        plan->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale, sizeof(w_scale)));
    QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
        plan->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale, sizeof(x_scale)));
  }
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->w_layout, in_type, k, n, k));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->x_layout, in_type, k, m, k));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->acc_layout, acc_type, n, m, n));

  cublasLtMatmulPreference_t raw_pref = nullptr;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&raw_pref));
  PreferencePtr pref(raw_pref, &cublasLtMatmulPreferenceDestroy);
  const uint64_t max_workspace = pool.workspace.size();
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace)));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_acc},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_acc},
  };
  for (const auto& [attribute, bytes] : alignments) {
    QSHARD_CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulPreferenceSetAttribute(pref.get(), attribute, &bytes, sizeof(bytes)));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
      pool.handle, plan->op, plan->w_layout, plan->x_layout, plan->acc_layout, plan->acc_layout,
      pref.get(), 1, &result, &returned);
  // NOT_SUPPORTED (or no result) means "no algorithm", which is a fallback, not an error.
  plan->ok = st == CUBLAS_STATUS_SUCCESS && returned > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) {
    QSHARD_CUBLAS_RETURN_IF_ERROR(st);
  }
  if (plan->ok) plan->algo = result.algo;
  Plan* raw = plan.get();
  pool.plans.emplace(key, std::move(plan));
  return raw;
}

// The handle and workspace, created on first use. pool.mu held.
absl::Status EnsureHandle(Pool& pool) {
  if (pool.handle != nullptr) return absl::OkStatus();
  QSHARD_ASSIGN_OR_RETURN(pool.workspace, DeviceBuffer::Allocate(kWorkspaceBytes));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&pool.handle));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Quant8Scratch> GetQuant8Scratch(int64_t code_bytes, int64_t scale_count,
                                               int64_t acc_count, int64_t partial_count,
                                               int64_t counter_count, cudaStream_t stream) {
  if (code_bytes < 0 || scale_count < 0 || acc_count < 0 || partial_count < 0 ||
      counter_count < 0) {
    return absl::InvalidArgumentError("GetQuant8Scratch: negative size");
  }
  Pool& pool = GetPool();
  std::lock_guard<std::mutex> lock(pool.mu);
  QSHARD_RETURN_IF_ERROR(Grow(pool.codes, static_cast<size_t>(code_bytes), false, stream));
  QSHARD_RETURN_IF_ERROR(Grow(pool.x_scale, sizeof(float) * scale_count, false, stream));
  QSHARD_RETURN_IF_ERROR(Grow(pool.acc, sizeof(float) * acc_count, false, stream));
  QSHARD_RETURN_IF_ERROR(Grow(pool.partials, sizeof(float) * partial_count, false, stream));
  QSHARD_RETURN_IF_ERROR(Grow(pool.counters, sizeof(int) * counter_count, true, stream));
  Quant8Scratch s;
  s.codes = pool.codes.get();
  s.x_scale = pool.x_scale.as<float>();
  s.acc = pool.acc.get();
  s.partials = pool.partials.get();
  s.counters = pool.counters.as<int>();
  return s;
}

absl::Status Quant8BlasGemm(bool fp8, const void* w, const void* codes, void* acc, int64_t m,
                            int64_t n, int64_t k, cudaStream_t stream) {
  if (m <= 0 || n <= 0 || k <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Quant8BlasGemm: bad shape m=", m, " n=", n, " k=", k));
  }
  Pool& pool = GetPool();
  std::lock_guard<std::mutex> lock(pool.mu);
  QSHARD_RETURN_IF_ERROR(EnsureHandle(pool));
  QSHARD_ASSIGN_OR_RETURN(
      const Plan* plan,
      GetPlan(pool, PlanKey{fp8 ? GemmKind::kFp8 : GemmKind::kInt8, m, n, k, AlignmentOf(w),
                            AlignmentOf(codes), AlignmentOf(acc)}));
  if (!plan->ok) {
    return absl::UnimplementedError(absl::StrCat("cuBLASLt has no ", fp8 ? "fp8" : "int8",
                                                 " algorithm for [", m, ", ", k, "] x [", n, ", ",
                                                 k, "]^T"));
  }
  const float alpha_f = 1.0f, beta_f = 0.0f;
  const int32_t alpha_i = 1, beta_i = 0;
  const void* alpha = fp8 ? static_cast<const void*>(&alpha_f) : &alpha_i;
  const void* beta = fp8 ? static_cast<const void*>(&beta_f) : &beta_i;
  QSHARD_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmul(pool.handle, plan->op, alpha, w, plan->w_layout, codes, plan->x_layout, beta,
                     acc, plan->acc_layout, acc, plan->acc_layout, &plan->algo,
                     pool.workspace.get(), pool.workspace.size(), stream));
  return absl::OkStatus();
}

absl::Status Quant8BlasScaledGemm(const void* w, const float* w_scale, const void* codes,
                                  const float* x_scale, void* y, DType y_dtype, int64_t m,
                                  int64_t n, int64_t k, cudaStream_t stream) {
  if (m <= 0 || n <= 0 || k <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Quant8BlasScaledGemm: bad shape m=", m, " n=", n, " k=", k));
  }
  if (y_dtype != DType::kBF16 && y_dtype != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("Quant8BlasScaledGemm: output must be bfloat16 or float32, got ",
                     std::string(DTypeName(y_dtype))));
  }
  if (w_scale == nullptr || x_scale == nullptr) {
    return absl::InvalidArgumentError("Quant8BlasScaledGemm: both scale vectors are needed");
  }
  Pool& pool = GetPool();
  std::lock_guard<std::mutex> lock(pool.mu);
  QSHARD_RETURN_IF_ERROR(EnsureHandle(pool));
  const GemmKind kind =
      y_dtype == DType::kBF16 ? GemmKind::kFp8ScaledBf16 : GemmKind::kFp8ScaledF32;
  QSHARD_ASSIGN_OR_RETURN(
      Plan * plan,
      GetPlan(pool, PlanKey{kind, m, n, k, AlignmentOf(w), AlignmentOf(codes), AlignmentOf(y)},
              w_scale, x_scale));
  if (!plan->ok) {
    return absl::UnimplementedError(
        absl::StrCat("cuBLASLt has no fp8 algorithm with outer-vector scales for [", m, ", ", k,
                     "] x [", n, ", ", k, "]^T"));
  }
  // This call's scale vectors (the plan is shared by every linear of this shape).
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      plan->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w_scale, sizeof(w_scale)));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      plan->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale, sizeof(x_scale)));
  const float alpha = 1.0f, beta = 0.0f;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(pool.handle, plan->op, &alpha, w, plan->w_layout,
                                               codes, plan->x_layout, &beta, y, plan->acc_layout, y,
                                               plan->acc_layout, &plan->algo, pool.workspace.get(),
                                               pool.workspace.size(), stream));
  return absl::OkStatus();
}

}  // namespace qshard::cuda
