// File: fp8_linear.h
// 8-bit weight linear layers on the GPU: FP8 (e4m3fn) and INT8 weights, with the activation
// schemes of the CPU backend (runtime/backend/cpu/quant_linear.cc is the reference):
//
//   fp8  W8A8 (kFp8PerToken / kFp8Static):
//       s_x[m] = max(amax(x[m, :]), 1e-12) / 448   (kFp8Static: the checkpoint's input_scale)
//       qx[m, k] = e4m3(x[m, k] / s_x[m])          (RNE, saturating at +-448, as FloatToE4M3)
//       y[m, n] = s_x[m] * s_w[n] * sum_k e4m3(qx[m, k]) * e4m3(w[n, k])  (+ bias[n])
//   int8 W8A8 (kInt8PerToken):
//       s_x[m] = amax / 127 (1 for an all-zero row); qx = clamp(rne(x / s_x), -127, 127)
//       y[m, n] = s_x[m] * s_w[n] * (int32) sum_k qx[m, k] * w[n, k]     (+ bias[n])
//   weight-only (kNone, fp8 or int8 weights):
//       y[m, n] = s_w[n] * sum_k x[m, k] * code(w[n, k])                  (+ bias[n])
// s_w is the per-tensor scale [1] broadcast, or the per-channel scale [N, 1] / [N].
//
// Shapes: x bf16 [m, K] row-major on the device; y [m, N] bf16 or fp32 row-major; the weight
// stays in the checkpoint layout [N, K] (one copy on the device, shared by both paths).
// K must be a multiple of 16 (16-byte rows: every access is a 16-byte vector); N is free.
//
// Paths (fp8_linear.cu has the details):
//   m <= 16: our own tensor-core GEMV (mma.sync m16n8k32 e4m3 / s8, or m16n8k16 bf16 for
//            weight-only) that streams W once near memory bandwidth, split over N and K;
//   m >  16: cuBLASLt 8-bit GEMM (fp8: sm_89+, int8: any) with fp32 / int32 output into a
//            scratch buffer and a small epilogue kernel applying s_x[m] * s_w[n]; when cuBLASLt
//            has no algorithm the GEMV kernel runs over 16-row slices instead (always correct).
// FP8 W8A8 needs sm_89+ (e4m3 tensor cores): Create returns UnimplementedError below that.
//
// Scratch memory (activation codes, split-K partials and counters, the cuBLASLt output, the
// cuBLASLt handle and workspace) is one process-wide pool shared by every layer, sized by the
// largest call so far: layers must run on one stream at a time (the decode loop does), and
// growing the pool synchronizes that stream once.
//
//   QSHARD_ASSIGN_OR_RETURN(auto op, cuda::QuantLinear8::Create(w, info.cc_major,
//                                                                 info.cc_minor, stream));
//   QSHARD_RETURN_IF_ERROR(op->Run(x, m, y, DType::kBF16, stream));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_FP8_LINEAR_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_FP8_LINEAR_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "quant/linear_weights.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"

namespace qshard::cuda {

// Which kernel family a layer uses (one template instantiation each).
enum class Quant8Mode : int {
  kFp8W8A8 = 0,    // e4m3 activations x e4m3 weights, fp32 accumulation
  kInt8W8A8 = 1,   // int8 activations x int8 weights, int32 accumulation (exact)
  kFp8W8A16 = 2,   // bf16 activations x e4m3 weights (decoded to bf16, exact), fp32 accumulation
  kInt8W8A16 = 3,  // bf16 activations x int8 weights (decoded to bf16, exact), fp32 accumulation
};

// ---- Launchers (defined in fp8_linear.cu) ------------------------------------------------

// Per-token activation quantization, one thread block per row, one read of x from global
// memory (the row is staged in shared memory when it fits, else re-read from L2):
//   codes [m, k] (e4m3fn bytes for kFp8*, int8 for kInt8PerToken), scales [m] f32.
// act: kFp8PerToken, kFp8Static (uses static_scale) or kInt8PerToken. k % 16 == 0.
absl::Status LaunchQuantizeActivations(const void* x, int64_t m, int64_t k, ActQuant act,
                                       float static_scale, void* codes, float* scales,
                                       cudaStream_t stream);

// Arguments of the small-m GEMV kernel.
struct Gemv8Args {
  Quant8Mode mode = Quant8Mode::kFp8W8A8;
  const void* x = nullptr;         // W8A8: codes [m, k] (1 byte each); W8A16: bf16 [m, k]
  const float* x_scale = nullptr;  // [m] (W8A8) or null (1)
  const void* w = nullptr;         // [n, k] codes, 16-byte aligned
  const float* w_scale = nullptr;  // [n]
  const float* bias = nullptr;     // [n] or null
  void* y = nullptr;               // [m, n] in y_dtype
  DType y_dtype = DType::kF32;
  int64_t m = 0, n = 0, k = 0;  // 1 <= m <= 16, k % 16 == 0
  // Split-K scratch (only read when k_splits > 1): partials [k_splits, m, n] 32-bit,
  // counters [ceil(n / 64)] int32, zero on entry (the kernel leaves them zero again).
  void* partials = nullptr;
  int* counters = nullptr;
  int k_splits = 1;  // from Gemv8Plan
  int64_t k_per_split = 0;
};

// The grid of the GEMV kernel for a shape: k_per_split (a multiple of 512, at most 2048
// codes for W8A8 and 1024 for W8A16: the activation slice lives in shared memory) and the
// number of K splits, chosen so that about 4 blocks per SM stream W. `sms`: SM count.
struct Gemv8Plan {
  int k_splits = 1;
  int64_t k_per_split = 0;
};
Gemv8Plan PlanGemv8(Quant8Mode mode, int64_t n, int64_t k, int sms);
// The blocks per SM PlanGemv8 aims for (default 4; process-wide, for benchmark sweeps).
void SetGemv8BlocksPerSm(int blocks);
int Gemv8BlocksPerSm();

// The fp8 W8A8 GEMV's loads as a ring (each 16-byte W load refilled with the one 8 chunks
// ahead as soon as it is consumed, so 8 stay in flight per thread to the end of the slice)
// instead of batches of 8 loads then 8 products. Same arithmetic, same bits; more
// registers (fewer resident blocks). Process-wide, off by default until a GPU run has
// measured it; QSHARD_CUDA_GEMV8_RING=1 at first use turns it on.
void SetGemv8Ring(bool on);
bool Gemv8RingEnabled();

absl::Status LaunchGemv8(const Gemv8Args& args, cudaStream_t stream);

// y[m, n] = acc[m, n] * x_scale[m] * w_scale[n] + bias[n], acc fp32 or int32 (acc_is_int).
absl::Status LaunchScaleEpilogue(const void* acc, bool acc_is_int, const float* x_scale,
                                 const float* w_scale, const float* bias, void* y, DType y_dtype,
                                 int64_t m, int64_t n, cudaStream_t stream);

// ---- The layer ------------------------------------------------------------------------

// The shared scratch pool and cuBLASLt state (fp8_linear_blas.cc).
struct Quant8Scratch {
  void* codes = nullptr;     // >= m * k bytes
  float* x_scale = nullptr;  // >= m floats
  void* acc = nullptr;       // >= m * n 32-bit values (cuBLASLt output)
  void* partials = nullptr;  // >= splits * m * n 32-bit values
  int* counters = nullptr;   // >= ceil(n / 64) ints, zero between kernels
};
// Grows the pool to at least the given sizes (synchronizing `stream` before freeing a smaller
// buffer that queued kernels may still read) and returns its pointers.
absl::StatusOr<Quant8Scratch> GetQuant8Scratch(int64_t code_bytes, int64_t scale_count,
                                               int64_t acc_count, int64_t partial_count,
                                               int64_t counter_count, cudaStream_t stream);
// acc[m, n] (row-major fp32 for fp8, int32 for int8) = codes[m, k] . w[n, k]^T through
// cuBLASLt with unit scales. UnimplementedError when cuBLASLt has no algorithm for it
// (callers then use the GEMV kernel). The algorithm is chosen once per shape and cached.
absl::Status Quant8BlasGemm(bool fp8, const void* w, const void* codes, void* acc, int64_t m,
                            int64_t n, int64_t k, cudaStream_t stream);
// y[m, n] = x_scale[m] * w_scale[n] * (codes[m, k] . w[n, k]^T) for e4m3 codes and weights,
// in one cuBLASLt call with outer-vector scales (y bf16 or fp32, row-major; no bias): no
// fp32 accumulator buffer and no epilogue kernel. UnimplementedError when this cuBLASLt or
// GPU has no such algorithm (callers then take Quant8BlasGemm + LaunchScaleEpilogue).
absl::Status Quant8BlasScaledGemm(const void* w, const float* w_scale, const void* codes,
                                  const float* x_scale, void* y, DType y_dtype, int64_t m,
                                  int64_t n, int64_t k, cudaStream_t stream);

// Process-wide switch for Quant8BlasScaledGemm in fp8 W8A8 linears with m > 16 (batched
// decode, prefill) and no bias. Off by default until a GPU run has verified and measured it;
// QSHARD_CUDA_FP8_BLAS_SCALED=1 in the environment at first use turns it on. Thread-safe.
void SetFp8BlasScaled(bool on);
bool Fp8BlasScaledEnabled();

// Process-wide switch: the CUDA backend lets the kernels that produce an fp8 per-token
// linear's input (RMSNorm, residual add + RMSNorm, packed SiLU-and-mul) quantize it on the
// side, and the linear skip its own quantize launch (QuantLinear8::RunQuantized): three
// launches fewer per layer in fp8 W8A8 decode. Off by default until a GPU run has verified
// it (the op tests compare the side codes bit for bit with the quantize kernel's);
// QSHARD_CUDA_FUSED_ACT_QUANT=1 in the environment at first use turns it on. Thread-safe.
void SetFusedActQuant(bool on);
bool FusedActQuantEnabled();

class QuantLinear8 {
 public:
  // Validates dtypes and shapes (errors name the layer and the tensor) and uploads the weight,
  // the scales and the bias. cc_major / cc_minor: the device's compute capability.
  static absl::StatusOr<std::unique_ptr<QuantLinear8>> Create(const LinearWeights& w, int cc_major,
                                                              int cc_minor, cudaStream_t stream);
  ~QuantLinear8();
  QuantLinear8(const QuantLinear8&) = delete;
  QuantLinear8& operator=(const QuantLinear8&) = delete;

  // y[m, N] = x[m, K] . W^T as described above; x bf16 device [m, K], y device [m, N] in
  // y_dtype (kF32 or kBF16). Enqueued on `stream`, no host synchronization (a larger m than
  // ever before may grow the scratch buffers, which allocates).
  absl::Status Run(const void* x, int64_t m, void* y, DType y_dtype, cudaStream_t stream);

  // fp8 W8A8 with per-token activation scales only (TakesFp8PerTokenCodes): Run for an x
  // that a producer kernel already quantized (the fp8 side output of LaunchRmsNorm,
  // LaunchAddRmsNorm, LaunchSiluMulPacked): codes [m, K] e4m3 (16-byte aligned) and scales
  // fp32 [m], bit for bit what Run's own quantize step would make, so the result is Run's.
  absl::Status RunQuantized(const uint8_t* codes, const float* scales, int64_t m, void* y,
                            DType y_dtype, cudaStream_t stream);
  bool TakesFp8PerTokenCodes() const {
    return mode_ == Quant8Mode::kFp8W8A8 && act_ == ActQuant::kFp8PerToken;
  }

  int64_t in_features() const { return k_; }
  int64_t out_features() const { return n_; }
  int64_t weight_bytes() const { return n_ * k_; }
  Quant8Mode mode() const { return mode_; }
  // The kernel the last Run used (or would use for m = 1 before any Run):
  // "cuda-fp8-w8a8-gemv", "cuda-int8-w8a8-cublaslt", "cuda-fp8-w8a16-gemv", ...
  std::string kernel_name() const;

 private:
  QuantLinear8() = default;
  absl::Status RunGemv(const void* x_or_codes, const float* x_scale, int64_t m, void* y,
                       DType y_dtype, cudaStream_t stream);
  // W8A8 from activation codes and scales: cuBLASLt for m > 16 where it serves the mode,
  // else the GEMV kernel.
  absl::Status RunCodes(const uint8_t* codes, const float* x_scale, int64_t m, void* y,
                        DType y_dtype, cudaStream_t stream);

  std::string name_;
  Quant8Mode mode_ = Quant8Mode::kFp8W8A8;
  ActQuant act_ = ActQuant::kNone;
  float static_scale_ = 1.0f;
  int64_t n_ = 0, k_ = 0;
  int sms_ = 132;
  bool blas_capable_ = false;  // cuBLASLt may serve this mode on this GPU (m > 16)
  bool last_blas_ = false;     // the last Run went through cuBLASLt
  bool last_scaled_ = false;   // ... with outer-vector scales (Quant8BlasScaledGemm)

  DeviceBuffer weight_;   // [N, K] codes, the checkpoint layout
  DeviceBuffer w_scale_;  // [N] f32 (per-tensor scales broadcast)
  DeviceBuffer bias_;     // [N] f32 or empty
};

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_FP8_LINEAR_H_
