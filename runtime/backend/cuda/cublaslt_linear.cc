#include "runtime/backend/cuda/cublaslt_linear.h"

#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/base/status_macros.h"

namespace qshard::cuda {
namespace {

// Largest power of two (at most 256, cuBLASLt's default assumption) dividing the address.
// Row views into the middle of a buffer are less aligned than cudaMalloc's 256 bytes;
// telling the heuristic keeps it from picking an algorithm that needs more.
uint32_t AlignmentOf(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lowest_bit = a & (~a + 1);
  return (lowest_bit == 0 || lowest_bit > 256) ? 256u : static_cast<uint32_t>(lowest_bit);
}

using PreferencePtr = std::unique_ptr<std::remove_pointer_t<cublasLtMatmulPreference_t>,
                                      decltype(&cublasLtMatmulPreferenceDestroy)>;

// Candidates the autotuner times per problem.
constexpr int kAutotuneCandidates = 8;

EnvFlag& AutotuneFlag() {
  static EnvFlag flag("QSHARD_CUDA_BLAS_AUTOTUNE", /*default_on=*/false);
  return flag;
}

// The autotuner's choices, process-wide: (device, CublasLtLinear's plan key) -> algorithm.
using TunedKey =
    std::tuple<int, int64_t, int64_t, int64_t, DType, uint32_t, uint32_t, uint32_t, DType>;
struct TunedAlgos {
  std::mutex mu;
  std::map<TunedKey, cublasLtMatmulAlgo_t> algos;  // guarded by mu
};
TunedAlgos& Tuned() {
  static TunedAlgos* t = new TunedAlgos();  // never destroyed: used until exit
  return *t;
}

}  // namespace

void SetBlasAutotune(bool on) { AutotuneFlag().Set(on); }
bool BlasAutotuneEnabled() { return AutotuneFlag().Get(); }

// The descriptors and algorithm of one problem; read-only once built, so concurrent
// Linear calls may share it.
struct CublasLtLinear::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t w_layout = nullptr;  // A: w's memory as column-major [k, n]
  cublasLtMatrixLayout_t x_layout = nullptr;  // B: x's memory as column-major [k, m]
  cublasLtMatrixLayout_t y_layout = nullptr;  // C = D: y's memory as column-major [n, m]
  cublasLtMatmulAlgo_t algo{};

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    // Destruction failures are not actionable (the descriptors are host objects).
    if (y_layout != nullptr) (void)cublasLtMatrixLayoutDestroy(y_layout);
    if (x_layout != nullptr) (void)cublasLtMatrixLayoutDestroy(x_layout);
    if (w_layout != nullptr) (void)cublasLtMatrixLayoutDestroy(w_layout);
    if (op != nullptr) (void)cublasLtMatmulDescDestroy(op);
  }
};

CublasLtLinear::CublasLtLinear(cublasLtHandle_t handle, DeviceBuffer workspace)
    : handle_(handle), workspace_(std::move(workspace)) {}

CublasLtLinear::~CublasLtLinear() {
  plans_.clear();  // descriptors before the handle
  if (handle_ != nullptr) (void)cublasLtDestroy(handle_);
}

absl::StatusOr<std::unique_ptr<CublasLtLinear>> CublasLtLinear::Create(size_t workspace_bytes) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer workspace, DeviceBuffer::Allocate(workspace_bytes));
  cublasLtHandle_t handle = nullptr;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle));
  return std::unique_ptr<CublasLtLinear>(new CublasLtLinear(handle, std::move(workspace)));
}

size_t CublasLtLinear::cached_plans() const {
  std::lock_guard<std::mutex> lock(mu_);
  return plans_.size();
}

void CublasLtLinear::ClearPlans() {
  std::lock_guard<std::mutex> lock(mu_);
  plans_.clear();
}

absl::StatusOr<size_t> CublasLtLinear::FastestAlgo(const Plan& plan,
                                                   const cublasLtMatmulAlgo_t* algos, size_t count,
                                                   const void* x, const void* w, void* y,
                                                   cudaStream_t stream) {
  cudaEvent_t start = nullptr, stop = nullptr;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaEventCreate(&start));
  const cudaError_t created = cudaEventCreate(&stop);
  if (created != cudaSuccess) {
    (void)cudaEventDestroy(start);
    QSHARD_CUDA_RETURN_IF_ERROR(created);
  }
  const float alpha = 1.0f, beta = 0.0f;
  auto run = [&](const cublasLtMatmulAlgo_t& algo) {
    return cublasLtMatmul(handle_, plan.op, &alpha, w, plan.w_layout, x, plan.x_layout, &beta, y,
                          plan.y_layout, y, plan.y_layout, &algo, workspace_.get(),
                          workspace_.size(), stream);
  };
  constexpr int kRuns = 5;
  size_t best = 0;
  float best_ms = -1.0f;
  for (size_t i = 0; i < count; ++i) {
    if (run(algos[i]) != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; skip what fails
    bool ok = cudaEventRecord(start, stream) == cudaSuccess;
    for (int r = 0; ok && r < kRuns; ++r) ok = run(algos[i]) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cudaEventRecord(stop, stream) == cudaSuccess &&
         cudaEventSynchronize(stop) == cudaSuccess;
    float ms = 0.0f;
    if (ok && cudaEventElapsedTime(&ms, start, stop) == cudaSuccess &&
        (best_ms < 0.0f || ms < best_ms)) {
      best_ms = ms;
      best = i;
    }
  }
  (void)cudaEventDestroy(start);
  (void)cudaEventDestroy(stop);
  (void)cudaGetLastError();  // a failed candidate must not leave an error behind
  return best;
}

absl::StatusOr<const CublasLtLinear::Plan*> CublasLtLinear::GetPlan(const PlanKey& key,
                                                                    const void* x, const void* w,
                                                                    void* y, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = plans_.find(key); it != plans_.end()) return it->second.get();

  const auto [m, n, k, y_dtype, align_x, align_w, align_y, ab_dtype] = key;
  const cudaDataType_t y_type = y_dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  const cudaDataType_t ab_type = ab_dtype == DType::kF16 ? CUDA_R_16F : CUDA_R_16BF;
  auto plan = std::make_unique<Plan>();

  // fp32 accumulation and fp32 alpha/beta whatever the output type.
  QSHARD_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t trans_w = CUBLAS_OP_T;  // [k, n] column-major -> w as [n, k]
  const cublasOperation_t trans_x = CUBLAS_OP_N;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &trans_w, sizeof(trans_w)));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(
      plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &trans_x, sizeof(trans_x)));

  // Layouts are (rows, cols, leading dimension) of the stored, column-major memory.
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->w_layout, ab_type, k, n, k));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->x_layout, ab_type, k, m, k));
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->y_layout, y_type, n, m, n));

  cublasLtMatmulPreference_t raw_pref = nullptr;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&raw_pref));
  PreferencePtr pref(raw_pref, &cublasLtMatmulPreferenceDestroy);
  const uint64_t max_workspace = workspace_.size();
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
      pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace)));
  // A = w, B = x, C = D = y.
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_x},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_y},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_y},
  };
  for (const auto& [attribute, bytes] : alignments) {
    QSHARD_CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulPreferenceSetAttribute(pref.get(), attribute, &bytes, sizeof(bytes)));
  }

  // The heuristic's candidates, best first (one unless autotuning).
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamIsCapturing(stream, &capturing));
  const bool autotune = BlasAutotuneEnabled() && capturing == cudaStreamCaptureStatusNone;
  cublasLtMatmulHeuristicResult_t results[kAutotuneCandidates] = {};
  int returned = 0;
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulAlgoGetHeuristic(
      handle_, plan->op, plan->w_layout, plan->x_layout, plan->y_layout, plan->y_layout, pref.get(),
      autotune ? kAutotuneCandidates : 1, results, &returned));
  const cublasLtMatmulHeuristicResult_t& result = results[0];
  if (returned == 0 || result.state != CUBLAS_STATUS_SUCCESS) {
    return absl::UnimplementedError(
        absl::StrCat("cuBLASLt has no ", std::string(DTypeName(ab_dtype)), " algorithm for y[", m, ", ", n, "] = x[", m, ", ", k,
                     "] . w^T with ", std::string(DTypeName(y_dtype)), " output (alignments x ",
                     align_x, ", w ", align_w, ", y ", align_y, " bytes)"));
  }
  plan->algo = result.algo;
  if (BlasAutotuneEnabled()) {
    // The process's earlier choice for this problem, else (when the stream may be timed)
    // the fastest candidate, remembered for every CublasLtLinear of the process.
    int device = 0;
    QSHARD_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
    TunedAlgos& tuned = Tuned();
    std::lock_guard<std::mutex> tuned_lock(tuned.mu);
    const TunedKey id = std::tuple_cat(std::make_tuple(device), key);
    if (auto it = tuned.algos.find(id); it != tuned.algos.end()) {
      plan->algo = it->second;
    } else if (autotune && returned > 1) {
      std::vector<cublasLtMatmulAlgo_t> algos;
      for (int i = 0; i < returned; ++i) {
        if (results[i].state == CUBLAS_STATUS_SUCCESS) algos.push_back(results[i].algo);
      }
      QSHARD_ASSIGN_OR_RETURN(const size_t best,
                              FastestAlgo(*plan, algos.data(), algos.size(), x, w, y, stream));
      plan->algo = algos[best];
      tuned.algos.emplace(id, plan->algo);
    }
  }
  const Plan* raw = plan.get();
  plans_.emplace(key, std::move(plan));
  return raw;
}

absl::Status CublasLtLinear::Linear(const void* x, const void* w, void* y, DType y_dtype, int64_t m,
                                    int64_t n, int64_t k, cudaStream_t stream, DType ab_dtype) {
  if (m < 0 || n <= 0 || k <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("Linear: bad shape m=", m, " n=", n, " k=", k));
  }
  if (y_dtype != DType::kF32 && y_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Linear: output must be float32 or bfloat16, got ", std::string(DTypeName(y_dtype))));
  }
  if (ab_dtype != DType::kBF16 && ab_dtype != DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "Linear: inputs must be bfloat16 or float16, got ", std::string(DTypeName(ab_dtype))));
  }
  if (m == 0) return absl::OkStatus();
  if (x == nullptr || w == nullptr || y == nullptr) {
    return absl::InvalidArgumentError("Linear: null pointer");
  }
  QSHARD_ASSIGN_OR_RETURN(
      const Plan* plan,
      GetPlan(PlanKey{m, n, k, y_dtype, AlignmentOf(x), AlignmentOf(w), AlignmentOf(y), ab_dtype},
              x, w, y, stream));
  const float alpha = 1.0f;
  const float beta = 0.0f;  // C is not read, so y may hold garbage (or NaN poison)
  QSHARD_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(
      handle_, plan->op, &alpha, w, plan->w_layout, x, plan->x_layout, &beta, y, plan->y_layout, y,
      plan->y_layout, &plan->algo, workspace_.get(), workspace_.size(), stream));
  return absl::OkStatus();
}

}  // namespace qshard::cuda
