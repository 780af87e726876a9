#include "runtime/backend/cuda/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <tuple>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "quant/awq_format.h"
#include "quant/compressed_tensors.h"
#include "quant/gptq_format.h"
#include "runtime/backend/cuda/attention.h"
#include "runtime/backend/cuda/bias_add.h"
#include "runtime/backend/cuda/cublaslt_linear.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/backend/cuda/elementwise.h"
#include "runtime/backend/cuda/embedding_rmsnorm.h"
#include "runtime/backend/cuda/fp8_linear.h"
#include "runtime/backend/cuda/int_weight_gemm.h"
#include "runtime/backend/cuda/sampling.h"
#include "runtime/base/half.h"
#include "runtime/base/status_macros.h"
#include "runtime/checkpoint/rope_frequencies.h"

namespace qshard {
namespace {

using cuda::DeviceBuffer;

constexpr size_t kAlign = 256;  // cudaMalloc's alignment; keeps every 16-byte path open

size_t RoundUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

// ---------------------------------------------------------------------------
// Per-step arena of device memory. Get() bumps a pointer; Reset() rewinds it. When a step
// needs more than the current chunk, new chunks are added for the rest of the step and
// Reset() replaces them all by one chunk of the total size, so the steady state is one
// allocation and no cudaMalloc / cudaFree per step.
// ---------------------------------------------------------------------------
class StepArena {
 public:
  absl::StatusOr<void*> Get(size_t bytes) {
    bytes = RoundUp(std::max<size_t>(bytes, 1), kAlign);
    if (chunks_.empty() || used_ + bytes > chunks_.back().size()) {
      const size_t last = chunks_.empty() ? 0 : chunks_.back().size();
      QSHARD_ASSIGN_OR_RETURN(DeviceBuffer b,
                              DeviceBuffer::Allocate(std::max({bytes, 2 * last, size_t{64} << 20})));
      chunks_.push_back(std::move(b));
      used_ = 0;
      ++generation_;
    }
    void* p = static_cast<char*>(chunks_.back().get()) + used_;
    used_ += bytes;
    return p;
  }
  // Call only when no queued work still uses the memory (after a synchronization).
  absl::Status Reset() {
    if (chunks_.size() > 1) {
      size_t total = 0;
      for (const auto& c : chunks_) total += c.size();
      chunks_.clear();  // cudaFree synchronizes the device
      QSHARD_ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(total));
      chunks_.push_back(std::move(b));
      ++generation_;
    }
    used_ = 0;
    return absl::OkStatus();
  }
  // Changes whenever memory handed out earlier may have moved (a CUDA graph captured
  // before then points at freed memory).
  uint64_t generation() const { return generation_; }
  size_t used() const { return used_; }

 private:
  std::vector<DeviceBuffer> chunks_;
  size_t used_ = 0;
  uint64_t generation_ = 0;
};

// Pinned host staging for the step's small index uploads (so the copies are truly
// asynchronous and capturable later by a CUDA graph).
class PinnedBuffer {
 public:
  ~PinnedBuffer() {
    if (p_ != nullptr) (void)cudaFreeHost(p_);
  }
  absl::StatusOr<void*> Ensure(size_t bytes) {
    if (bytes > size_) {
      if (p_ != nullptr) QSHARD_CUDA_RETURN_IF_ERROR(cudaFreeHost(p_));
      p_ = nullptr;
      size_ = 0;
      const size_t want = RoundUp(std::max(bytes, size_t{1} << 16), 4096);
      QSHARD_CUDA_RETURN_IF_ERROR(cudaMallocHost(&p_, want));
      size_ = want;
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t size_ = 0;
};

// ---------------------------------------------------------------------------
// Linear layers. Each kind takes x in input_dtype() (the backend casts when the
// activation differs) and writes y [m, N] in y's dtype (bf16 or fp32).
// ---------------------------------------------------------------------------
class CudaLinear : public LinearOp {
 public:
  virtual DType input_dtype() const { return DType::kBF16; }
  virtual absl::Status Run(const void* x, int64_t m, void* y, DType y_dtype,
                           cudaStream_t stream) const = 0;
  // Takes x already quantized to fp8 per token (codes [m, K], scales [m]) by the kernel that
  // produced it (CudaBackend's side codes); only fp8 W8A8 per-token linears do.
  virtual bool TakesFp8Codes() const { return false; }
  virtual absl::Status RunQuantized(const uint8_t* /*codes*/, const float* /*scales*/,
                                    int64_t /*m*/, void* /*y*/, DType /*y_dtype*/,
                                    cudaStream_t /*stream*/) const {
    return absl::UnimplementedError("this linear takes no pre-quantized input");
  }
  const float* bias() const { return bias_.as<float>(); }
  absl::Status SetBias(const Tensor& b, cudaStream_t stream) {
    if (b.empty()) return absl::OkStatus();
    if (b.numel() != out_features()) {
      return absl::InvalidArgumentError(absl::StrCat("bias has ", b.numel(),
                                                     " elements, expected ", out_features()));
    }
    std::vector<float> host = ToFloatVector(b);
    if (host.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "bias dtype ", std::string(DTypeName(b.dtype())), " (expected bf16, f16 or f32)"));
    }
    QSHARD_ASSIGN_OR_RETURN(bias_, DeviceBuffer::Allocate(host.size() * sizeof(float)));
    return bias_.CopyFromHost(host.data(), host.size() * sizeof(float), stream);
  }
  int64_t bias_bytes() const { return static_cast<int64_t>(bias_.size()); }

 private:
  DeviceBuffer bias_;  // fp32 [N] or empty
};

// Dense bf16 / fp16 weights through cuBLASLt (fp32 checkpoints are stored as bf16).
class DenseLinear : public CudaLinear {
 public:
  static absl::StatusOr<std::unique_ptr<DenseLinear>> Create(const LinearWeights& w,
                                                             cuda::CublasLtLinear* blas,
                                                             cudaStream_t stream) {
    const DType dt = w.weight.dtype();
    if (dt != DType::kBF16 && dt != DType::kF16 && dt != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(
          w.name, ".weight: dtype ", std::string(DTypeName(dt)),
          " is not a dense float format (expected bfloat16, float16 or float32)"));
    }
    if (w.weight.rank() != 2 || w.weight.dim(0) != w.out_features ||
        w.weight.dim(1) != w.in_features) {
      return absl::InvalidArgumentError(absl::StrCat(
          w.name, ".weight: shape ", ShapeToString(w.weight.shape()), ", expected [",
          w.out_features, ", ", w.in_features, "]"));
    }
    auto op = std::unique_ptr<DenseLinear>(new DenseLinear());
    op->n_ = w.out_features;
    op->k_ = w.in_features;
    op->blas_ = blas;
    op->dtype_ = dt == DType::kF16 ? DType::kF16 : DType::kBF16;
    const size_t bytes = static_cast<size_t>(op->n_ * op->k_) * 2;
    QSHARD_ASSIGN_OR_RETURN(op->w_, DeviceBuffer::Allocate(bytes));
    if (dt == DType::kF32) {
      std::vector<uint16_t> host(static_cast<size_t>(op->n_ * op->k_));
      const float* src = w.weight.data<float>();
      for (size_t i = 0; i < host.size(); ++i) host[i] = F32ToBf16(src[i]);
      QSHARD_RETURN_IF_ERROR(op->w_.CopyFromHost(host.data(), bytes, stream));
    } else {
      QSHARD_RETURN_IF_ERROR(op->w_.CopyFromHost(w.weight.raw(), bytes, stream));
    }
    QSHARD_RETURN_IF_ERROR(op->SetBias(w.bias, stream));
    return op;
  }
  int64_t in_features() const override { return k_; }
  int64_t out_features() const override { return n_; }
  std::string kernel_name() const override {
    return absl::StrCat("cublaslt-", dtype_ == DType::kF16 ? "fp16" : "bf16");
  }
  int64_t weight_bytes() const override {
    return static_cast<int64_t>(w_.size()) + bias_bytes();
  }
  DType input_dtype() const override { return dtype_; }
  absl::Status Run(const void* x, int64_t m, void* y, DType y_dtype,
                   cudaStream_t stream) const override {
    return blas_->Linear(x, w_.get(), y, y_dtype, m, n_, k_, stream, dtype_);
  }

 private:
  DenseLinear() = default;
  int64_t n_ = 0, k_ = 0;
  DType dtype_ = DType::kBF16;
  DeviceBuffer w_;  // [N, K] in dtype_
  cuda::CublasLtLinear* blas_ = nullptr;
};

// GPTQ / AWQ / pack-quantized 4- and 8-bit weights: the Marlin-style kernel.
class IntWeightLinear : public CudaLinear {
 public:
  explicit IntWeightLinear(std::unique_ptr<cuda::IntWeightGemm> gemm) : gemm_(std::move(gemm)) {}
  int64_t in_features() const override { return gemm_->in_features(); }
  int64_t out_features() const override { return gemm_->out_features(); }
  std::string kernel_name() const override { return gemm_->kernel_name(); }
  int64_t weight_bytes() const override { return gemm_->weight_bytes() + bias_bytes(); }
  absl::Status Run(const void* x, int64_t m, void* y, DType y_dtype,
                   cudaStream_t stream) const override {
    return gemm_->Run(x, m, y, y_dtype, stream);
  }

 private:
  std::unique_ptr<cuda::IntWeightGemm> gemm_;
};

// FP8 / INT8 (W8A8 or weight-only).
class Quant8Linear : public CudaLinear {
 public:
  explicit Quant8Linear(std::unique_ptr<cuda::QuantLinear8> op) : op_(std::move(op)) {}
  int64_t in_features() const override { return op_->in_features(); }
  int64_t out_features() const override { return op_->out_features(); }
  std::string kernel_name() const override { return op_->kernel_name(); }
  int64_t weight_bytes() const override { return op_->weight_bytes() + bias_bytes(); }
  absl::Status Run(const void* x, int64_t m, void* y, DType y_dtype,
                   cudaStream_t stream) const override {
    return op_->Run(x, m, y, y_dtype, stream);
  }
  bool TakesFp8Codes() const override { return op_->TakesFp8PerTokenCodes(); }
  absl::Status RunQuantized(const uint8_t* codes, const float* scales, int64_t m, void* y,
                            DType y_dtype, cudaStream_t stream) const override {
    return op_->RunQuantized(codes, scales, m, y, y_dtype, stream);
  }

 private:
  std::unique_ptr<cuda::QuantLinear8> op_;
};

bool IsFp8(DType t) { return t == DType::kF8E4M3 || t == DType::kF8E5M2; }

// ---------------------------------------------------------------------------
// The backend.
// ---------------------------------------------------------------------------
class CudaBackend : public Backend {
 public:
  static absl::StatusOr<std::unique_ptr<Backend>> Create() {
    if (!cuda::CudaDeviceAvailable()) {
      return absl::UnavailableError(
          "--device cuda: no CUDA device or driver is visible to this process");
    }
    std::unique_ptr<CudaBackend> b(new CudaBackend());
    QSHARD_ASSIGN_OR_RETURN(b->info_, cuda::QueryDevice(0));
    QSHARD_ASSIGN_OR_RETURN(b->stream_, cuda::CudaStream::Create());
    QSHARD_ASSIGN_OR_RETURN(b->blas_, cuda::CublasLtLinear::Create());
    // On unless the environment says 0 (verified on an H100: the model and fixture tests
    // with both on, and qshard_cuda_bench's decode columns).
    b->graphs_enabled_ = cuda::EnvSwitch("QSHARD_CUDA_GRAPHS", /*default_on=*/true);
    b->sampling_enabled_ = cuda::EnvSwitch("QSHARD_CUDA_SAMPLING", /*default_on=*/true);
    return std::unique_ptr<Backend>(std::move(b));
  }
  ~CudaBackend() override {
    if (mode_ == StepMode::kCapture) AbortCapture();
    (void)cudaStreamSynchronize(stream());
    DropGraphs();
  }

  void SetGraphs(bool on) {
    graphs_enabled_ = on;
    if (!on) DropGraphs();
  }
  void ResetBlasPlans() {
    DropGraphs();
    blas_->ClearPlans();
  }
  std::pair<int64_t, int64_t> graph_stats() const { return {graph_captures_, graph_replays_}; }

  Device device() const override { return Device::kCuda; }
  std::string name() const override { return info_.ToString(); }
  DType activation_dtype() const override { return DType::kBF16; }
  ::qshard::DeviceInfo device_info() const override {
    return ::qshard::DeviceInfo::Cuda(info_.cc_major * 10 + info_.cc_minor,
                                      info_.total_memory_bytes);
  }

  int64_t free_device_memory_bytes() const override {
    size_t free = 0, total = 0;
    if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
    return static_cast<int64_t>(free);
  }

  // --- memory ---------------------------------------------------------------
  absl::StatusOr<Tensor> UploadWeight(const Tensor& host) override {
    if (host.device() != Device::kCpu) {
      return absl::InvalidArgumentError("CUDA backend: weight is not in host memory");
    }
    // 1-D weights (norms) are uploaded as fp32: tiny, and exact for every source dtype.
    // Tables (the embedding) keep their dtype: 16-bit tables are large.
    Tensor src = host;
    std::vector<float> converted;
    if (host.rank() == 1 || host.dtype() == DType::kF32) {
      converted = ToFloatVector(host);
      if (converted.empty() && host.numel() > 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "CUDA backend: weight dtype ", std::string(DTypeName(host.dtype())),
            " (expected bf16, f16 or f32)"));
      }
      src = Tensor(DType::kF32, host.shape(), converted.data(), nullptr);
    } else if (host.dtype() != DType::kBF16 && host.dtype() != DType::kF16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CUDA backend: weight dtype ", std::string(DTypeName(host.dtype())),
          " (expected bf16, f16 or f32)"));
    }
    QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(src.nbytes()));
    QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(src.raw(), src.nbytes(), stream()));
    auto owner = std::make_shared<DeviceBuffer>(std::move(buf));
    return Tensor(src.dtype(), src.shape(), owner->get(), owner, Device::kCuda);
  }

  absl::StatusOr<std::unique_ptr<LinearOp>> PrepareLinear(const LinearWeights& w) override {
    std::unique_ptr<CudaLinear> op;
    switch (w.format) {
      case WeightFormat::kDense: {
        QSHARD_ASSIGN_OR_RETURN(op, DenseLinear::Create(w, blas_.get(), stream()));
        break;
      }
      case WeightFormat::kGptq:
      case WeightFormat::kAwq:
      case WeightFormat::kPacked: {
        if (w.act_quant != ActQuant::kNone) {
          return absl::UnimplementedError(absl::StrCat(
              w.name, ": integer weights with ", ActQuantName(w.act_quant),
              " activations are not supported on the GPU (expected weight-only)"));
        }
        absl::StatusOr<IntQuantMatrix> m = w.format == WeightFormat::kGptq ? UnpackGptq(w)
                                           : w.format == WeightFormat::kAwq
                                               ? UnpackAwq(w)
                                               : UnpackPackQuantized(w);
        if (!m.ok()) return m.status();
        auto gemm = cuda::IntWeightGemm::Create(*m, stream());
        if (!gemm.ok()) {
          return absl::Status(gemm.status().code(),
                              absl::StrCat(w.name, ": ", gemm.status().message()));
        }
        op = std::make_unique<IntWeightLinear>(std::move(gemm).value());
        break;
      }
      case WeightFormat::kFp8:
      case WeightFormat::kInt8: {
        auto q = cuda::QuantLinear8::Create(w, info_.cc_major, info_.cc_minor, stream());
        if (!q.ok()) {
          return absl::Status(q.status().code(), absl::StrCat(w.name, ": ", q.status().message()));
        }
        op = std::make_unique<Quant8Linear>(std::move(q).value());
        fp8_token_linears_ |= static_cast<const CudaLinear&>(*op).TakesFp8Codes();
        break;
      }
    }
    if (op == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(w.name, ": unknown weight format"));
    }
    if (w.format != WeightFormat::kDense) QSHARD_RETURN_IF_ERROR(op->SetBias(w.bias, stream()));
    QSHARD_RETURN_IF_ERROR(stream_.Synchronize());  // host tensors may be freed after return
    return std::unique_ptr<LinearOp>(std::move(op));
  }

  Tensor Allocate(int64_t rows, int64_t cols) override {
    return AllocateTyped(DType::kBF16, rows, cols);
  }
  Tensor AllocateF32(int64_t rows, int64_t cols) override {
    return AllocateTyped(DType::kF32, rows, cols);
  }

  absl::Status AllocateKvCache(const KvCacheSpec& spec) override {
    const DType dt = spec.dtype;
    if (dt != DType::kF32 && dt != DType::kBF16 && dt != DType::kF16 && !IsFp8(dt)) {
      return absl::UnimplementedError(absl::StrCat(
          "CUDA backend: KV cache dtype ", std::string(DTypeName(dt)),
          " is not supported (expected float32, bfloat16, float16, fp8_e4m3 or fp8_e5m2)"));
    }
    if (static_cast<int64_t>(k_scale_.size()) != spec.num_layers) {
      k_scale_.assign(spec.num_layers, 1.0f);
      v_scale_.assign(spec.num_layers, 1.0f);
      scales_pending_.assign(spec.num_layers, false);
    }
    k_cache_.clear();
    v_cache_.clear();
    const size_t bytes = static_cast<size_t>(spec.ElementsPerLayer()) * DTypeSize(dt);
    for (int64_t l = 0; l < spec.num_layers; ++l) {
      QSHARD_ASSIGN_OR_RETURN(DeviceBuffer k, DeviceBuffer::Allocate(bytes));
      QSHARD_ASSIGN_OR_RETURN(DeviceBuffer v, DeviceBuffer::Allocate(bytes));
      k_cache_.push_back(std::move(k));
      v_cache_.push_back(std::move(v));
    }
    spec_ = spec;
    kv_prewritten_.assign(spec.num_layers, false);
    ++resources_;  // captured graphs point at the old cache
    return absl::OkStatus();
  }
  const KvCacheSpec& kv_cache_spec() const override { return spec_; }
  void SetKvScales(int layer, float k_scale, float v_scale) override {
    k_scale_[layer] = k_scale;
    v_scale_[layer] = v_scale;
    ++resources_;  // captured graphs hold the scales as launch arguments
  }
  std::pair<float, float> GetKvScales(int layer) const override {
    return {k_scale_[layer], v_scale_[layer]};
  }
  void CalculateKvScalesAtNextStep() override { scales_pending_.assign(spec_.num_layers, true); }

  absl::Status CopyToHost(const Tensor& src, float* dst) override {
    auto p = FinishStep(src);
    if (!p.ok()) return p.status();
    QSHARD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, *p, static_cast<size_t>(src.numel()) * 4,
                                                cudaMemcpyDeviceToHost, stream()));
    QSHARD_RETURN_IF_ERROR(stream_.Synchronize());
    return TakeStatus();
  }

  // --- sampling ---------------------------------------------------------------
  bool SupportsSampling() const override { return sampling_enabled_; }
  void SetSampling(bool on) { sampling_enabled_ = on; }

  absl::Status Sample(const Tensor& logits, absl::Span<const SamplingRow> rows,
                      std::vector<SampledToken>* out) override {
    const int64_t n = static_cast<int64_t>(rows.size());
    if (logits.rank() != 2 || logits.dim(0) != n) {
      if (mode_ == StepMode::kCapture) AbortCapture();
      mode_ = StepMode::kEager;
      absl::Status pending = TakeStatus();  // the step's own error explains more
      if (!pending.ok()) return pending;
      return absl::InvalidArgumentError(absl::StrCat(
          "CUDA Sample: logits have shape ", ShapeToString(logits.shape()), ", expected [",
          n, ", vocab] (one row per sampling row)"));
    }
    QSHARD_ASSIGN_OR_RETURN(const void* p, FinishStep(logits));
    const int64_t vocab = logits.dim(1);
    // Rows, penalty history and blocked ids, flattened. A row without penalties gets no
    // history (the kernel would only count ids that cannot change its result), which keeps
    // the upload to a few hundred bytes per row in the common case.
    std::vector<cuda::DeviceSamplingRow> params(static_cast<size_t>(n));
    std::vector<int32_t> history, blocked;
    int32_t max_logprobs = 0;
    for (int64_t i = 0; i < n; ++i) {
      const SamplingRow& r = rows[i];
      cuda::DeviceSamplingRow& d = params[i];
      d.temperature = r.temperature;
      d.top_p = r.top_p;
      d.min_p = r.min_p;
      d.repetition_penalty = r.repetition_penalty;
      d.presence_penalty = r.presence_penalty;
      d.frequency_penalty = r.frequency_penalty;
      d.top_k = std::max(r.top_k, 0);
      d.seed = r.seed;
      d.step = r.step;
      const bool penalized = r.repetition_penalty != 1.0f || r.presence_penalty != 0.0f ||
                             r.frequency_penalty != 0.0f;
      d.history_offset = static_cast<int32_t>(history.size());
      if (penalized) {
        d.prompt_len = static_cast<int32_t>(r.prompt.size());
        d.output_len = static_cast<int32_t>(r.output.size());
        history.insert(history.end(), r.prompt.begin(), r.prompt.end());
        history.insert(history.end(), r.output.begin(), r.output.end());
      }
      d.blocked_offset = static_cast<int32_t>(blocked.size());
      d.blocked_len = static_cast<int32_t>(r.blocked.size());
      blocked.insert(blocked.end(), r.blocked.begin(), r.blocked.end());
      d.num_logprobs = r.num_logprobs;
      max_logprobs = std::max(max_logprobs, r.num_logprobs);
    }
    for (int64_t i = 0; i < n; ++i) {
      absl::Status v = cuda::ValidateSamplingRow(params[i], vocab,
                                                 static_cast<int64_t>(history.size()),
                                                 static_cast<int64_t>(blocked.size()));
      if (!v.ok()) {
        (void)TakeStatus();  // FinishStep returned OK: nothing is pending
        return absl::InvalidArgumentError(
            absl::StrCat("CUDA Sample: row ", i, ": ", v.message()));
      }
    }
    QSHARD_ASSIGN_OR_RETURN(const void* d_params,
                            UploadBytes(params.data(), params.size() * sizeof(params[0])));
    QSHARD_ASSIGN_OR_RETURN(const int32_t* d_history, Upload(history));
    QSHARD_ASSIGN_OR_RETURN(const int32_t* d_blocked, Upload(blocked));
    const int64_t ws_bytes = cuda::SamplingWorkspaceBytes(n, vocab);
    QSHARD_ASSIGN_OR_RETURN(void* ws, arena_.Get(static_cast<size_t>(ws_bytes)));
    // Results in one block so they come back in one copy: token ids [n], chosen logprobs
    // [n], then (only copied when asked for) top ids / logprobs [n, 20].
    constexpr int64_t kTop = cuda::kSamplingMaxLogprobs;
    QSHARD_ASSIGN_OR_RETURN(void* res, arena_.Get(static_cast<size_t>(n * (2 + 2 * kTop)) * 4));
    int32_t* d_tokens = static_cast<int32_t*>(res);
    float* d_logprob = reinterpret_cast<float*>(d_tokens + n);
    int32_t* d_top_ids = reinterpret_cast<int32_t*>(d_logprob + n);
    float* d_top_lp = reinterpret_cast<float*>(d_top_ids + n * kTop);
    QSHARD_RETURN_IF_ERROR(cuda::LaunchSample(
        static_cast<const float*>(p), n, vocab, static_cast<const cuda::DeviceSamplingRow*>(d_params),
        d_history, d_blocked, ws, ws_bytes, d_tokens, d_logprob, d_top_ids, d_top_lp, stream()));
    const int64_t words = max_logprobs > 0 ? n * (2 + 2 * kTop) : 2 * n;
    sample_host_.resize(static_cast<size_t>(words));
    QSHARD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(sample_host_.data(), res,
                                                static_cast<size_t>(words) * 4,
                                                cudaMemcpyDeviceToHost, stream()));
    QSHARD_RETURN_IF_ERROR(stream_.Synchronize());
    QSHARD_RETURN_IF_ERROR(TakeStatus());
    const int32_t* h_tokens = reinterpret_cast<const int32_t*>(sample_host_.data());
    const float* h_logprob = reinterpret_cast<const float*>(h_tokens + n);
    const int32_t* h_top_ids = reinterpret_cast<const int32_t*>(h_logprob + n);
    const float* h_top_lp = reinterpret_cast<const float*>(h_top_ids + n * kTop);
    out->assign(static_cast<size_t>(n), SampledToken{});
    for (int64_t i = 0; i < n; ++i) {
      SampledToken& t = (*out)[i];
      t.token_id = h_tokens[i];
      t.logprob = h_logprob[i];
      if (t.token_id < 0 || t.token_id >= vocab) {
        // The kernel marks rows whose parameters it refuses; ValidateSamplingRow should
        // have caught them first.
        return absl::InternalError(absl::StrCat("CUDA Sample: row ", i,
                                                " was refused by the sampling kernel (token ",
                                                t.token_id, ")"));
      }
      const int32_t top = std::min<int64_t>(rows[i].num_logprobs, vocab);
      for (int32_t j = 0; j < top; ++j) {
        t.top.emplace_back(h_top_ids[i * kTop + j], h_top_lp[i * kTop + j]);
      }
    }
    return absl::OkStatus();
  }

  // --- per step ---------------------------------------------------------------
  absl::Status BeginStep(const StepMetadata& meta) override {
    if (mode_ == StepMode::kCapture) AbortCapture();  // a step that never copied logits
    mode_ = StepMode::kEager;
    if (!status_.ok()) return TakeStatus();
    // The previous step's uploads and kernels must be done before their staging and arena
    // memory is reused.
    QSHARD_RETURN_IF_ERROR(stream_.Synchronize());
    QSHARD_RETURN_IF_ERROR(arena_.Reset());
    staged_ = 0;
    meta_ = &meta;
    std::fill(kv_prewritten_.begin(), kv_prewritten_.end(), false);
    ForgetSideCodes();  // they live in the arena just reset
    const int32_t T = meta.num_tokens(), S = meta.num_seqs();
    // Programmatic dependent launch for small steps only: on an H100 (qshard_cuda_bench,
    // Llama-3.1-8B, +graphs) it gave fp8 +10% / 4-bit +6% at batch 1 and up to +8% at batch
    // 8, but cost 8-12% at batch 32 and 64, where every kernel has enough blocks of its own.
    cuda::SetProgrammaticLaunchForThisThread(T <= kPdlMaxTokens);
    std::vector<int32_t> token_seq(T, 0);
    max_query_len_ = 0;
    for (int32_t s = 0; s < S; ++s) {
      for (int32_t t = meta.query_start[s]; t < meta.query_start[s + 1]; ++t) token_seq[t] = s;
      max_query_len_ = std::max(max_query_len_, meta.query_start[s + 1] - meta.query_start[s]);
    }
    max_context_len_ = 0;
    for (int32_t c : meta.context_lens) max_context_len_ = std::max(max_context_len_, c);
    attn_context_len_ = max_context_len_;
    block_table_width_ = meta.max_blocks_per_seq;
    const std::vector<int32_t>* tables = &meta.block_tables;
    if (graphs_enabled_ && T > 0 && max_query_len_ == 1 && meta.num_logit_rows > 0 &&
        std::find(scales_pending_.begin(), scales_pending_.end(), true) ==
            scales_pending_.end()) {
      // The block-table width is part of a graph's shape: padded to a multiple of
      // kGraphBlockBucket (with -1, never read: attention stops at each sequence's
      // length), a graph serves a growing sequence for that many blocks, not one.
      const int32_t w = static_cast<int32_t>(
          RoundUp(static_cast<size_t>(std::max(meta.max_blocks_per_seq, 1)), kGraphBlockBucket));
      if (w != meta.max_blocks_per_seq) {
        padded_tables_.assign(static_cast<size_t>(S) * w, -1);
        for (int32_t s = 0; s < S; ++s) {
          std::copy_n(meta.block_tables.begin() + static_cast<int64_t>(s) * meta.max_blocks_per_seq,
                      meta.max_blocks_per_seq, padded_tables_.begin() + static_cast<int64_t>(s) * w);
        }
        tables = &padded_tables_;
        block_table_width_ = w;
      }
      QSHARD_RETURN_IF_ERROR(PrepareGraphStep(T, S, block_table_width_, meta.num_logit_rows));
    }
    QSHARD_ASSIGN_OR_RETURN(d_positions_, Upload(meta.positions));
    QSHARD_ASSIGN_OR_RETURN(d_slots_, Upload(meta.slot_mapping));
    QSHARD_ASSIGN_OR_RETURN(d_token_seq_, Upload(token_seq));
    QSHARD_ASSIGN_OR_RETURN(d_query_start_, Upload(meta.query_start));
    QSHARD_ASSIGN_OR_RETURN(d_context_lens_, Upload(meta.context_lens));
    QSHARD_ASSIGN_OR_RETURN(d_block_tables_, Upload(*tables));
    return absl::OkStatus();
  }

  // --- ops ------------------------------------------------------------------
  void Embedding(const Tensor& table, const int32_t* ids, Tensor& out) override {
    ForgetSideCodes();
    if (!status_.ok()) return;
    auto d_ids = Upload(std::vector<int32_t>(ids, ids + out.dim(0)));
    if (!Keep(d_ids.status()) || Replaying()) return;
    Keep(cuda::LaunchEmbedding(table.raw(), table.dtype(), table.dim(0), table.dim(1), *d_ids,
                               out.dim(0), out.raw(), out.dtype(), stream()));
  }

  void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    if (!status_.ok()) return;
    const SideCodes side = PrepareSideCodes(out);
    if (!status_.ok() || Replaying()) return;
    Keep(cuda::LaunchRmsNorm(x.raw(), x.dtype(), w.raw(), eps, x.dim(0), x.dim(1), out.raw(),
                             out.dtype(), stream(), side.codes, side.scales));
  }

  void AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& w, float eps,
                  Tensor& out) override {
    if (!status_.ok()) return;
    const SideCodes side = PrepareSideCodes(out);
    if (!status_.ok() || Replaying()) return;
    Keep(cuda::LaunchAddRmsNorm(residual.raw(), residual.dtype(), x.raw(), x.dtype(), w.raw(), eps,
                                x.dim(0), x.dim(1), out.raw(), out.dtype(), stream(), side.codes,
                                side.scales));
  }

  // The fp8 side output of a producer kernel (norms, packed SiLU-and-mul) for `out`, when
  // cuda::FusedActQuantEnabled() and the model has fp8 per-token linears: codes and scales
  // from the step arena (taken in every mode, like all scratch), remembered as side_ so
  // that the Linears reading `out` next take them instead of quantizing `out` themselves.
  struct SideCodes {
    const void* src = nullptr;  // the bf16 tensor they quantize
    int64_t rows = 0, cols = 0;
    uint8_t* codes = nullptr;  // [rows, cols] e4m3
    float* scales = nullptr;   // [rows]
  };
  SideCodes PrepareSideCodes(const Tensor& out) {
    side_ = SideCodes{};
    if (!fp8_token_linears_ || !cuda::FusedActQuantEnabled() || out.dtype() != DType::kBF16 ||
        out.rank() != 2) {
      return side_;
    }
    const int64_t rows = out.dim(0), cols = out.dim(1);
    auto codes = arena_.Get(static_cast<size_t>(rows * cols));
    auto scales = arena_.Get(static_cast<size_t>(rows) * sizeof(float));
    if (!Keep(codes.status()) || !Keep(scales.status())) return side_;
    side_ = {out.raw(), rows, cols, static_cast<uint8_t*>(*codes), static_cast<float*>(*scales)};
    return side_;
  }
  // Called by every op that writes a tensor but produces no side codes: it may overwrite
  // the tensor the side codes describe.
  void ForgetSideCodes() { side_ = SideCodes{}; }

  void Linear(const Tensor& x, const LinearOp& op, Tensor& y) override {
    if (!status_.ok()) return;
    const auto& lin = static_cast<const CudaLinear&>(op);
    const int64_t m = x.dim(0);
    const void* in = x.raw();
    // x quantized on the side by the kernel that wrote it (PrepareSideCodes)? They stay
    // valid for further Linears of the same x (unfused q, k, v), unless y overwrites x.
    SideCodes side;
    if (side_.src == x.raw() && side_.rows == m && side_.cols == x.dim(1) &&
        x.dtype() == DType::kBF16 && lin.TakesFp8Codes()) {
      side = side_;
    }
    if (y.raw() == side_.src) ForgetSideCodes();
    // Scratch is taken from the arena in every mode (a replayed step must hand out the
    // same addresses as the captured one); only the launches are skipped on replay.
    const bool launch = !Replaying();
    if (x.dtype() != lin.input_dtype()) {  // e.g. bf16 activations into an fp16 lm_head
      auto tmp = arena_.Get(static_cast<size_t>(x.numel()) * DTypeSize(lin.input_dtype()));
      if (!Keep(tmp.status())) return;
      if (launch && !Keep(cuda::LaunchCast(x.raw(), x.dtype(), *tmp, lin.input_dtype(),
                                           x.numel(), stream()))) {
        return;
      }
      in = *tmp;
    }
    if (lin.input_dtype() == DType::kF16 && y.dtype() != DType::kF32) {
      // cuBLASLt has no fp16 x fp16 -> bf16 GEMM: go through fp32.
      auto tmp = arena_.Get(static_cast<size_t>(y.numel()) * sizeof(float));
      if (!Keep(tmp.status()) || !launch) return;
      if (!Keep(lin.Run(in, m, *tmp, DType::kF32, stream()))) return;
      if (!Keep(cuda::LaunchCast(*tmp, DType::kF32, y.raw(), y.dtype(), y.numel(), stream()))) {
        return;
      }
    } else if (side.codes != nullptr) {
      if (!launch ||
          !Keep(lin.RunQuantized(side.codes, side.scales, m, y.raw(), y.dtype(), stream()))) {
        return;
      }
    } else if (!launch || !Keep(lin.Run(in, m, y.raw(), y.dtype(), stream()))) {
      return;
    }
    if (lin.bias() != nullptr) {
      Keep(cuda::LaunchAddBias(y.raw(), y.dtype(), lin.bias(), m, lin.out_features(), stream()));
    }
  }

  // The RoPE inverse frequencies for (head_dim, rope) on the device; false (and the error
  // kept) when they could not be uploaded.
  bool EnsureRopeTable(int64_t head_dim, const RopeConfig& rope) {
    if (inv_freq_.get() == nullptr || rope_head_dim_ != head_dim || !(rope_ == rope)) {
      const std::vector<float> f = RopeInvFrequencies(rope, head_dim);
      auto buf = DeviceBuffer::Allocate(f.size() * sizeof(float));
      if (!Keep(buf.status())) return false;
      inv_freq_ = std::move(buf).value();
      if (!Keep(inv_freq_.CopyFromHost(f.data(), f.size() * sizeof(float), stream()))) {
        return false;
      }
      rope_head_dim_ = head_dim;
      rope_ = rope;
      ++resources_;
    }
    return true;
  }

  void Rope(Tensor& q, Tensor& k, int64_t head_dim, const RopeConfig& rope) override {
    ForgetSideCodes();
    if (!status_.ok() || !EnsureRopeTable(head_dim, rope) || Replaying()) return;
    if (q.dtype() != k.dtype()) {
      Keep(absl::InvalidArgumentError("Rope: q and k must have the same dtype"));
      return;
    }
    Keep(cuda::LaunchRope(q.raw(), k.raw(), q.dtype(), q.dim(0), q.dim(1) / head_dim,
                          k.dim(1) / head_dim, head_dim, d_positions_, inv_freq_.as<float>(),
                          stream()));
  }

  // One launch (cuda::LaunchQkvRopeKvWrite) instead of SplitColumns + Rope + the KV write
  // of the Attention that follows, when cuda::FusedRopeKvWriteEnabled() and the shapes are
  // the cache's; otherwise the base class's two ops.
  void SplitQkvRope(int layer, const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, int64_t head_dim,
                    const RopeConfig& rope) override {
    ForgetSideCodes();
    if (!status_.ok()) return;
    const DType dt = qkv.dtype();
    const bool fusable = cuda::FusedRopeKvWriteEnabled() && layer >= 0 &&
                         static_cast<size_t>(layer) < k_cache_.size() && !scales_pending_[layer] &&
                         (dt == DType::kBF16 || dt == DType::kF32) && q.dtype() == dt &&
                         k.dtype() == dt && v.dtype() == dt && head_dim == spec_.head_dim &&
                         k.dim(1) == spec_.num_kv_heads * head_dim && v.dim(1) == k.dim(1) &&
                         q.dim(1) % head_dim == 0 && qkv.dim(1) == q.dim(1) + k.dim(1) + v.dim(1) &&
                         q.dim(0) == qkv.dim(0) && k.dim(0) == qkv.dim(0) && v.dim(0) == qkv.dim(0);
    if (!fusable) {
      Backend::SplitQkvRope(layer, qkv, q, k, v, head_dim, rope);
      return;
    }
    if (!EnsureRopeTable(head_dim, rope)) return;
    kv_prewritten_[layer] = true;  // the next Attention(layer, ...) skips its KV write
    if (Replaying()) return;
    cuda::QkvRopeKvWriteArgs a;
    a.qkv = qkv.raw();
    a.q = q.raw();
    a.k = k.raw();
    a.v = v.raw();
    a.act_dtype = dt;
    a.num_tokens = qkv.dim(0);
    a.q_heads = q.dim(1) / head_dim;
    a.kv_heads = spec_.num_kv_heads;
    a.head_dim = head_dim;
    a.positions = d_positions_;
    a.inv_freq = inv_freq_.as<float>();
    a.slot_mapping = d_slots_;
    a.k_cache = k_cache_[layer].get();
    a.v_cache = v_cache_[layer].get();
    a.cache_dtype = spec_.dtype;
    a.block_size = spec_.block_size;
    a.k_scale = k_scale_[layer];
    a.v_scale = v_scale_[layer];
    Keep(cuda::LaunchQkvRopeKvWrite(a, stream()));
  }

  void Attention(int layer, const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_heads,
                 int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& out) override {
    ForgetSideCodes();
    if (!status_.ok()) return;
    const DType dt = spec_.dtype;
    // SplitQkvRope already wrote this layer's K/V of this step.
    const bool prewritten =
        layer >= 0 && static_cast<size_t>(layer) < kv_prewritten_.size() && kv_prewritten_[layer];
    if (prewritten) kv_prewritten_[layer] = false;
    if (IsFp8(dt) && scales_pending_[layer]) {
      // --calculate-kv-scales: this step's |K| / |V| maxima set the layer's scales (one
      // host round trip, on the first step only).
      if (!Keep(CalculateScales(layer, k, v))) return;
    }
    if (!Replaying() && !prewritten &&
        !Keep(cuda::LaunchKvWrite(k.raw(), v.raw(), k.dtype(), k.dim(0), num_kv_heads, head_dim,
                                  d_slots_, k_cache_[layer].get(), v_cache_[layer].get(), dt,
                                  spec_.block_size, k_scale_[layer], v_scale_[layer], stream()))) {
      return;
    }
    cuda::PagedAttentionArgs a;
    a.q = q.raw();
    a.out = out.raw();
    a.dtype = q.dtype();
    a.k_cache = k_cache_[layer].get();
    a.v_cache = v_cache_[layer].get();
    a.cache_dtype = dt;
    a.k_scale = k_scale_[layer];
    a.v_scale = v_scale_[layer];
    a.num_tokens = q.dim(0);
    a.num_seqs = meta_->num_seqs();
    a.num_heads = num_heads;
    a.num_kv_heads = num_kv_heads;
    a.head_dim = head_dim;
    a.block_size = spec_.block_size;
    a.softmax_scale = scale;
    a.positions = d_positions_;
    a.token_seq = d_token_seq_;
    a.query_start = d_query_start_;
    a.context_lens = d_context_lens_;
    a.block_tables = d_block_tables_;
    a.max_blocks_per_seq = block_table_width_;  // the uploaded table's row stride
    a.max_context_len = attn_context_len_;  // a graph bucket's bound on decode steps
    a.max_query_len = max_query_len_;
    a.workspace_bytes = cuda::PagedAttentionWorkspaceBytes(a.num_tokens, num_heads, head_dim,
                                                           attn_context_len_);
    if (a.workspace_bytes > 0) {
      auto ws = arena_.Get(static_cast<size_t>(a.workspace_bytes));
      if (!Keep(ws.status())) return;
      a.workspace = *ws;
      if (cuda::FusedSplitCombineEnabled() && !Keep(EnsureSplitTickets(a.num_seqs, num_heads))) {
        return;
      }
      a.split_counters = split_tickets_.as<int32_t>();
      a.split_counters_len = split_tickets_len_;
    }
    if (Replaying()) return;
    Keep(cuda::LaunchPagedAttention(a, stream()));
  }

  // Zeroed tickets for the in-kernel split combine of attention (cuda::PagedAttentionArgs::
  // split_counters), grown to what a step of `seqs` sequences may need, in eager steps only:
  // a capture then falls back to the separate combine, and a replay launches a graph that
  // may point at the current buffer, which must not be freed under it.
  absl::Status EnsureSplitTickets(int64_t seqs, int64_t num_heads) {
    const int64_t need = cuda::PagedAttentionSplitTickets(seqs, num_heads);
    if (need <= split_tickets_len_ || mode_ != StepMode::kEager) return absl::OkStatus();
    const int64_t len = std::max<int64_t>(need, 2 * split_tickets_len_);
    QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf,
                            DeviceBuffer::Allocate(static_cast<size_t>(len) * sizeof(int32_t)));
    QSHARD_RETURN_IF_ERROR(buf.Fill(0, stream()));
    split_tickets_ = std::move(buf);
    split_tickets_len_ = len;
    ++resources_;  // captured graphs point at the old tickets
    return absl::OkStatus();
  }

  void SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    ForgetSideCodes();
    if (!status_.ok() || Replaying()) return;
    Keep(cuda::LaunchSiluMul(gate.raw(), up.raw(), out.raw(), gate.dtype(), gate.dim(0),
                             gate.dim(1), stream()));
  }

  void SiluMulPacked(const Tensor& gate_up, Tensor& out) override {
    if (!status_.ok()) return;
    const SideCodes side = PrepareSideCodes(out);
    if (!status_.ok() || Replaying()) return;
    if (gate_up.dtype() != out.dtype() || gate_up.dim(0) != out.dim(0) ||
        gate_up.dim(1) != 2 * out.dim(1)) {
      Keep(absl::InvalidArgumentError(absl::StrCat(
          "SiluMulPacked: gate_up ", ShapeToString(gate_up.shape()), " ",
          std::string(DTypeName(gate_up.dtype())), " and out ", ShapeToString(out.shape()), " ",
          std::string(DTypeName(out.dtype())), " (expected [T, 2F] and [T, F], one dtype)")));
      return;
    }
    Keep(cuda::LaunchSiluMulPacked(gate_up.raw(), out.raw(), out.dtype(), out.dim(0), out.dim(1),
                                   stream(), side.codes, side.scales));
  }

  void SplitColumns(const Tensor& x, absl::Span<Tensor* const> outs) override {
    ForgetSideCodes();
    if (!status_.ok() || Replaying()) return;
    void* ptrs[cuda::kMaxSplitOutputs];
    int64_t cols[cuda::kMaxSplitOutputs];
    int64_t width = 0;
    bool ok = outs.size() <= static_cast<size_t>(cuda::kMaxSplitOutputs);
    for (size_t i = 0; ok && i < outs.size(); ++i) {
      ok = outs[i]->dtype() == x.dtype() && outs[i]->dim(0) == x.dim(0);
      ptrs[i] = outs[i]->raw();
      cols[i] = outs[i]->dim(1);
      width += cols[i];
    }
    if (!ok || width != x.dim(1)) {
      Keep(absl::InvalidArgumentError(absl::StrCat(
          "SplitColumns: ", outs.size(), " outputs of ", ShapeToString(x.shape()), " ",
          std::string(DTypeName(x.dtype())),
          " must share its dtype and rows and have widths summing to its columns (at most ",
          cuda::kMaxSplitOutputs, " outputs)")));
      return;
    }
    Keep(cuda::LaunchSplitColumns(x.raw(), x.dtype(), x.dim(0),
                                  absl::MakeConstSpan(ptrs, outs.size()),
                                  absl::MakeConstSpan(cols, outs.size()), stream()));
  }

  void Add(Tensor& x, const Tensor& y) override {
    ForgetSideCodes();
    if (!status_.ok() || Replaying()) return;
    Keep(cuda::LaunchAdd(x.raw(), x.dtype(), y.raw(), y.dtype(), x.numel(), stream()));
  }

  void GatherRows(const Tensor& src, const std::vector<int32_t>& rows, Tensor& out) override {
    ForgetSideCodes();
    if (!status_.ok()) return;
    if (src.dtype() != out.dtype()) {
      Keep(absl::InvalidArgumentError("GatherRows: source and output dtypes differ"));
      return;
    }
    auto d_rows = Upload(rows);
    if (!Keep(d_rows.status()) || Replaying()) return;
    Keep(cuda::LaunchGatherRows(src.raw(), src.dtype(), src.dim(1), *d_rows,
                                static_cast<int64_t>(rows.size()), out.raw(), stream()));
  }

 private:
  CudaBackend() = default;
  cudaStream_t stream() const { return stream_.get(); }

  // --- CUDA graphs for decode steps -------------------------------------------
  // A decode step launches ~10 kernels per layer (~330 for an 8B model) whose launch cost
  // is comparable to their run time at batch 1. Unless QSHARD_CUDA_GRAPHS=0, a decode step
  // of a shape seen before is captured into a graph (uploads included) the second time it
  // occurs and replayed from then on: the ops still run their host side (pinned staging of
  // ids and positions, arena allocations, which land at the same addresses because the
  // arena is rewound and allocated in the same order), only the launches are skipped.
  // Shape = (tokens, sequences, block-table width, context bucket): attention is launched
  // for a bound rounded up to kGraphContextBucket (it reads each sequence's true length
  // from the positions), so one graph serves 256 consecutive context lengths; the block
  // table is padded to kGraphBlockBucket blocks per row for the same reason. Anything
  // that moves memory a graph points at or changes a launch argument it holds (arena
  // growth, pinned staging growth, a new KV cache, KV scales or RoPE table) drops all
  // graphs.
  static constexpr int32_t kGraphContextBucket = 256;
  // Steps of at most this many tokens launch their kernels with PDL (BeginStep).
  static constexpr int32_t kPdlMaxTokens = 16;
  static constexpr size_t kGraphBlockBucket = 32;
  enum class StepMode { kEager, kCapture, kReplay };
  struct GraphKey {
    int32_t tokens, seqs, max_blocks, context_bucket, logit_rows;
    bool operator<(const GraphKey& o) const {
      return std::tie(tokens, seqs, max_blocks, context_bucket, logit_rows) <
             std::tie(o.tokens, o.seqs, o.max_blocks, o.context_bucket, o.logit_rows);
    }
  };
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    size_t arena_used = 0;  // where the captured step left the arena and the staging:
    size_t staged = 0;      // a replay must end at the same place
  };

  bool Replaying() const { return mode_ == StepMode::kReplay; }

  absl::Status PrepareGraphStep(int32_t tokens, int32_t seqs, int32_t max_blocks,
                                int32_t logit_rows) {
    attn_context_len_ = static_cast<int32_t>(
        RoundUp(static_cast<size_t>(std::max(max_context_len_, 1)), kGraphContextBucket));
    const std::tuple<uint64_t, uint64_t, uint64_t> gen{arena_.generation(), resources_,
                                                       cuda::ScratchGeneration()};
    if (gen != graph_generation_) {
      DropGraphs();
      graph_generation_ = gen;
    }
    key_ = GraphKey{tokens, seqs, max_blocks, attn_context_len_, logit_rows};
    if (graphs_.count(key_) != 0) {
      mode_ = StepMode::kReplay;
    } else if (warm_[key_]++ >= 1) {
      // Seen eagerly in this memory layout: every lazily grown buffer (kernel scratch,
      // cuBLASLt plans, staging) has its size, so nothing allocates or synchronizes now.
      QSHARD_CUDA_RETURN_IF_ERROR(
          cudaStreamBeginCapture(stream(), cudaStreamCaptureModeRelaxed));
      mode_ = StepMode::kCapture;
    }
    return absl::OkStatus();
  }

  absl::Status EndCapture() {
    cudaGraph_t graph = nullptr;
    mode_ = StepMode::kEager;
    QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamEndCapture(stream(), &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t err = cudaGraphInstantiate(&exec, graph, 0);
    (void)cudaGraphDestroy(graph);
    QSHARD_CUDA_RETURN_IF_ERROR(err);
    graphs_[key_] = Graph{exec, arena_.used(), staged_};
    ++graph_captures_;
    mode_ = StepMode::kReplay;  // the captured work has not run yet: launch it now
    return absl::OkStatus();
  }

  void AbortCapture() {
    cudaGraph_t graph = nullptr;
    (void)cudaStreamEndCapture(stream(), &graph);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    mode_ = StepMode::kEager;
  }

  void DropGraphs() {
    for (auto& [key, g] : graphs_) (void)cudaGraphExecDestroy(g.exec);
    graphs_.clear();
    warm_.clear();
  }

  // Ends the launches of a step whose result is `src` (logits): closes a capture or
  // launches the replayed graph, and returns src as fp32 in device memory. The copy or
  // sampling that reads it stays outside any graph (its host destination may move).
  absl::StatusOr<const void*> FinishStep(const Tensor& src) {
    if (!status_.ok()) {
      if (mode_ == StepMode::kCapture) AbortCapture();
      mode_ = StepMode::kEager;
      return TakeStatus();
    }
    const void* p = src.raw();
    if (src.dtype() != DType::kF32) {
      auto tmp = arena_.Get(static_cast<size_t>(src.numel()) * sizeof(float));
      if (!tmp.ok()) return tmp.status();
      if (mode_ != StepMode::kReplay) {
        QSHARD_RETURN_IF_ERROR(
            cuda::LaunchCast(src.raw(), src.dtype(), *tmp, DType::kF32, src.numel(), stream()));
      }
      p = *tmp;
    }
    if (mode_ == StepMode::kCapture) QSHARD_RETURN_IF_ERROR(EndCapture());
    if (mode_ == StepMode::kReplay) {
      const Graph& g = graphs_.at(key_);
      if (g.arena_used != arena_.used() || g.staged != staged_) {
        // The ops of this step did not allocate what the captured step did: its launches
        // were skipped, so there is nothing correct to return. (Not expected: the shape
        // key covers everything the model allocates by.)
        mode_ = StepMode::kEager;
        DropGraphs();
        return absl::InternalError(
            "CUDA graph replay: the step's allocations differ from the captured step's; "
            "graphs dropped (run with QSHARD_CUDA_GRAPHS=0 and report this)");
      }
      QSHARD_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(g.exec, stream()));
      ++graph_replays_;
    }
    mode_ = StepMode::kEager;
    return p;
  }

  // Records the first error of the step; returns whether s is OK.
  bool Keep(const absl::Status& s) {
    if (!s.ok() && status_.ok()) status_ = s;
    return s.ok();
  }
  absl::Status TakeStatus() {
    absl::Status s = std::move(status_);
    status_ = absl::OkStatus();
    return s;
  }

  Tensor AllocateTyped(DType dt, int64_t rows, int64_t cols) {
    auto p = arena_.Get(static_cast<size_t>(rows * cols) * DTypeSize(dt));
    if (!Keep(p.status())) {
      // Keep shapes valid for the (skipped) ops that follow; the step reports the error.
      return Tensor(dt, {rows, cols}, nullptr, nullptr, Device::kCuda);
    }
    return Tensor(dt, {rows, cols}, *p, nullptr, Device::kCuda);
  }

  // Copies host ints into the arena through the pinned staging buffer. Within a step
  // each upload gets its own staging slice, so earlier copies still in flight are safe.
  absl::StatusOr<const int32_t*> Upload(const std::vector<int32_t>& v) {
    QSHARD_ASSIGN_OR_RETURN(const void* dev, UploadBytes(v.data(), v.size() * sizeof(int32_t)));
    return static_cast<const int32_t*>(dev);
  }
  absl::StatusOr<const void*> UploadBytes(const void* data, size_t size) {
    const size_t bytes = std::max<size_t>(size, 4);
    const size_t need = staged_ + RoundUp(bytes, 64);
    if (need > staging_capacity_) {
      // Growing replaces the pinned buffer: wait for copies that read the old one.
      QSHARD_RETURN_IF_ERROR(stream_.Synchronize());
      QSHARD_ASSIGN_OR_RETURN(staging_, staging_buf_.Ensure(std::max(need * 2, size_t{1} << 16)));
      staging_capacity_ = std::max(need * 2, size_t{1} << 16);
      staged_ = 0;
      ++resources_;  // captured graphs copy from the old pinned buffer
    }
    char* host = static_cast<char*>(staging_) + staged_;
    staged_ += RoundUp(bytes, 64);
    if (size > 0) std::memcpy(host, data, size);
    QSHARD_ASSIGN_OR_RETURN(void* dev, arena_.Get(bytes));
    if (!Replaying()) {  // a replayed graph copies from the same pinned slice
      QSHARD_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream()));
    }
    return static_cast<const void*>(dev);
  }

  absl::Status CalculateScales(int layer, const Tensor& k, const Tensor& v) {
    QSHARD_ASSIGN_OR_RETURN(void* d, arena_.Get(2 * sizeof(float)));
    float* amax = static_cast<float*>(d);
    QSHARD_RETURN_IF_ERROR(cuda::LaunchAbsMax(k.raw(), k.dtype(), k.numel(), amax, stream()));
    QSHARD_RETURN_IF_ERROR(cuda::LaunchAbsMax(v.raw(), v.dtype(), v.numel(), amax + 1, stream()));
    float host[2] = {0, 0};
    QSHARD_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(host, amax, sizeof(host), cudaMemcpyDeviceToHost, stream()));
    QSHARD_RETURN_IF_ERROR(stream_.Synchronize());
    const float fp8_max = spec_.dtype == DType::kF8E4M3 ? 448.0f : 57344.0f;
    if (host[0] > 0) k_scale_[layer] = host[0] / fp8_max;
    if (host[1] > 0) v_scale_[layer] = host[1] / fp8_max;
    scales_pending_[layer] = false;
    ++resources_;  // captured graphs hold the scales as launch arguments
    return absl::OkStatus();
  }

  cuda::DeviceInfo info_;
  cuda::CudaStream stream_;
  std::unique_ptr<cuda::CublasLtLinear> blas_;
  absl::Status status_;  // first error of the current step

  StepArena arena_;
  PinnedBuffer staging_buf_;
  void* staging_ = nullptr;
  size_t staging_capacity_ = 0;
  size_t staged_ = 0;

  // The step's layout (device copies, valid until the next BeginStep).
  const StepMetadata* meta_ = nullptr;
  const int32_t* d_positions_ = nullptr;
  const int32_t* d_slots_ = nullptr;
  const int32_t* d_token_seq_ = nullptr;
  const int32_t* d_query_start_ = nullptr;
  const int32_t* d_context_lens_ = nullptr;
  const int32_t* d_block_tables_ = nullptr;
  int32_t max_context_len_ = 0;
  int32_t max_query_len_ = 0;
  int32_t block_table_width_ = 0;      // row stride of d_block_tables_ (>= max_blocks_per_seq)
  std::vector<int32_t> padded_tables_;  // [S, block_table_width_] for graph steps

  KvCacheSpec spec_;
  std::vector<DeviceBuffer> k_cache_, v_cache_;  // per layer [blocks, kv_heads, block_size, D]
  std::vector<float> k_scale_, v_scale_;
  std::vector<bool> scales_pending_;
  // Some prepared linear is fp8 W8A8 per token (the producers' side codes can serve it).
  bool fp8_token_linears_ = false;
  SideCodes side_;              // the last producer's side codes (PrepareSideCodes)
  DeviceBuffer split_tickets_;  // int32 [split_tickets_len_], zero between launches
  int64_t split_tickets_len_ = 0;
  // Per layer: SplitQkvRope wrote this step's K/V into the cache (Attention skips it).
  std::vector<bool> kv_prewritten_;

  // CUDA graphs (see PrepareGraphStep).
  bool graphs_enabled_ = false;
  StepMode mode_ = StepMode::kEager;
  GraphKey key_{};
  std::map<GraphKey, Graph> graphs_;
  std::map<GraphKey, int> warm_;  // eager runs per shape in the current memory layout
  // (arena, resources_, kernel scratch) generations the graphs were captured in.
  std::tuple<uint64_t, uint64_t, uint64_t> graph_generation_{~uint64_t{0}, 0, 0};
  uint64_t resources_ = 0;  // bumped when staging, KV cache, KV scales or RoPE table change
  int32_t attn_context_len_ = 0;  // attention's context bound this step
  int64_t graph_captures_ = 0, graph_replays_ = 0;

  // Sampling on the device (Sample): on unless QSHARD_CUDA_SAMPLING=0 (Create).
  bool sampling_enabled_ = false;
  std::vector<uint32_t> sample_host_;  // results of the last Sample, before unpacking

  DeviceBuffer inv_freq_;  // fp32 [D/2]
  int64_t rope_head_dim_ = 0;
  RopeConfig rope_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend() { return CudaBackend::Create(); }

absl::Status SetCudaGraphs(Backend& backend, bool on) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) return absl::InvalidArgumentError("SetCudaGraphs: not a CUDA backend");
  cuda->SetGraphs(on);
  return absl::OkStatus();
}

absl::Status SetCudaSampling(Backend& backend, bool on) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) return absl::InvalidArgumentError("SetCudaSampling: not a CUDA backend");
  cuda->SetSampling(on);
  return absl::OkStatus();
}

absl::Status ResetCudaBlasPlans(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  if (cuda == nullptr) return absl::InvalidArgumentError("ResetCudaBlasPlans: not a CUDA backend");
  cuda->ResetBlasPlans();
  return absl::OkStatus();
}

std::pair<int64_t, int64_t> CudaGraphStats(const Backend& backend) {
  const auto* cuda = dynamic_cast<const CudaBackend*>(&backend);
  return cuda == nullptr ? std::pair<int64_t, int64_t>{0, 0} : cuda->graph_stats();
}

}  // namespace qshard
