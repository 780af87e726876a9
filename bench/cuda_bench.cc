// qshard_cuda_bench: the CUDA backend on a model shape with random weights (no download),
// printed as a table next to baselines measured in the same run on the same card:
//   - the memory roofline: a device-to-device copy (bytes read + written per second), and
//     the batch-1 decode rate it allows = bandwidth / bytes read per token (every weight
//     of the decoder linears and the lm_head);
//   - the dense bf16 tensor-core rate: cuBLASLt on an 8192^3 GEMM.
// Per weight format it times (medians, after a warm-up):
//   - all decoder linears of every layer at M = 1 and 16 rows (the set the anchors
//     time: 32 layers x q, k, v, o, gate, up, down for Llama-3.1-8B, here as the model runs
//     them: q|k|v and gate|up fused, see ModelLoadOptions::fuse_projections), as ms and the
//     weight bytes streamed per second (--unfused-baseline: also separate, see below);
//   - decode steps at each batch size (one token per sequence per step, context
//     --context tokens; the logits of every sequence come back to the host each step, as
//     the engine needs them for sampling);
//   - one prefill of --prefill tokens, with the CUDA-core and the tensor-core prefill
//     attention kernels, and the latter with the opt-in kernels on (below);
//   - the same decode steps with the tokens sampled on the GPU (greedy; only the ids come
//     back, as the engine does by default), then also replayed from CUDA graphs, and that
//     again with every opt-in kernel on ("+fused", OptIns below: q|k|v split + RoPE + KV
//     write in one launch, attention's split combine inside the attention kernel, fp8
//     activations quantized by the kernels that produce them, cuBLASLt algorithms chosen by
//     timing, the 4-bit factored-scale GEMM and decode GEMV, fp8 cuBLASLt with outer-vector
//     scales, the fp8 GEMV's ring of loads; QSHARD_CUDA_FUSED_ROPE_KV / _COMBINE /
//     _ACT_QUANT, QSHARD_CUDA_BLAS_AUTOTUNE, QSHARD_CUDA_INT_FACTORED / _INT_GEMV,
//     QSHARD_CUDA_FP8_BLAS_SCALED, QSHARD_CUDA_GEMV8_RING) (--no-graphs skips these
//     passes; a failure there is reported in the row and does not fail the run);
//   - all decoder linears with the format's opt-in linear kernel against its default at a
//     few M ("opt-in linear kernel" column: dense formats cuBLASLt autotuned at M = 1, 16,
//     64; 4-bit the factored-scale GEMM at M = 1, 16, 64 and the decode GEMV at M = 1, 16;
//     fp8 W8A8 the GEMV's ring of loads at M = 1, 16 and outer-vector-scaled
//     cuBLASLt at M = 64, 512);
//   - --sweep-splits: all decoder linears at M = 1 and 16 (and 64 for the integer kernel;
//     4-bit also with the factored-scale GEMM and the decode GEMV) for several K-split targets
//     (blocks per SM) of the quantized kernels, and "+graphs +fused" decode at the first
//     batch size for several attention split lengths (cuda::SetAttentionMinSplitLen),
//     printed under the format's row.
//
//   qshard_cuda_bench [--shape llama-3.1-8b] [--formats bf16,fp8,gptq-4bit,awq-4bit]
//                     [--batches 1,8,32,64] [--context 256] [--steps 16] [--prefill 2048]
//                     [--no-graphs] [--layers N] [--sweep-splits] [--unfused-baseline]
//
// --unfused-baseline adds a row per format for the same random weights loaded with separate
// q/k/v and gate/up Linears (ModelLoadOptions::fuse_projections = false; a second model,
// built after the fused one is freed), measured in the same run: linears at M = 1 and 16 and
// decode at the first batch size (host logits and, unless --no-graphs, gpu-sample and
// +graphs), then a line with the speedups of fusion (fused over unfused, > 1: fused faster).
//
// --profile M1,M2 instead runs each format's decoder linears of layer 0 once per M inside an
// NVTX range named "linears" and exits, for a profiler to look at those kernels alone (as the
// model runs them: q|k|v, o, gate|up, down; with --unfused-baseline also the separate
// q, k, v, o, gate, up, down in a range "linears-unfused"):
//   ncu --nvtx --nvtx-include "linears/" qshard_cuda_bench --formats fp8 --layers 1 --profile 1
// (scripts/device-check.sh does this when ncu is there).
//
// --profile-step B instead runs, per format, one eager decode step of B sequences at
// --context tokens inside an NVTX range "step" (every kernel of the step, launched one by
// one) and exits: scripts/device-check.sh sums ncu's per-kernel durations of it by kernel,
// to show where a decode step's time goes besides the linears.
#include <cuda_runtime_api.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "kv/memory_planner.h"
#include "kv/model_shapes.h"
#include "runtime/backend/cuda/attention.h"
#include "runtime/backend/cuda/cublaslt_linear.h"
#include "runtime/backend/cuda/cuda_backend.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/backend/cuda/fp8_linear.h"
#include "runtime/backend/cuda/int_weight_gemm.h"
#include "runtime/base/half.h"
#include "runtime/base/status_macros.h"
#include "runtime/model/llama_model.h"

namespace qshard {
namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a) {
  return std::chrono::duration<double>(Clock::now() - a).count();
}
double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

#define BENCH_CUDA(expr)                                                          \
  do {                                                                            \
    const cudaError_t e_ = (expr);                                                \
    if (e_ != cudaSuccess) {                                                      \
      return absl::InternalError(absl::StrCat(#expr, ": ", cudaGetErrorString(e_))); \
    }                                                                             \
  } while (0)

// Device-to-device copy rate (bytes read + written per second), 1 GiB each way, median of
// 20 copies timed with events.
absl::StatusOr<double> CopyBandwidth() {
  const size_t bytes = size_t{1} << 30;
  QSHARD_ASSIGN_OR_RETURN(cuda::DeviceBuffer a, cuda::DeviceBuffer::Allocate(bytes));
  QSHARD_ASSIGN_OR_RETURN(cuda::DeviceBuffer b, cuda::DeviceBuffer::Allocate(bytes));
  BENCH_CUDA(cudaMemset(a.get(), 0x3c, bytes));
  cudaEvent_t e0, e1;
  BENCH_CUDA(cudaEventCreate(&e0));
  BENCH_CUDA(cudaEventCreate(&e1));
  std::vector<double> times;
  for (int i = 0; i < 23; ++i) {
    BENCH_CUDA(cudaEventRecord(e0));
    BENCH_CUDA(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice));
    BENCH_CUDA(cudaEventRecord(e1));
    BENCH_CUDA(cudaEventSynchronize(e1));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 3) times.push_back(ms * 1e-3);
  }
  (void)cudaEventDestroy(e0);
  (void)cudaEventDestroy(e1);
  return 2.0 * bytes / Median(times);
}

// Random bf16 values in [-1, 1) uploaded to `dst` (never benchmark on zeros).
absl::Status FillRandomBf16(void* dst, size_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint16_t> h(count);
  for (auto& v : h) v = F32ToBf16(u(rng));
  BENCH_CUDA(cudaMemcpy(dst, h.data(), count * 2, cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

// Dense bf16 tensor-core rate: cuBLASLt y[n, n] = x[n, n] . w[n, n]^T, n = 8192.
absl::StatusOr<double> Bf16GemmTflops() {
  const int64_t n = 8192;
  QSHARD_ASSIGN_OR_RETURN(auto blas, cuda::CublasLtLinear::Create());
  QSHARD_ASSIGN_OR_RETURN(cuda::DeviceBuffer x, cuda::DeviceBuffer::Allocate(n * n * 2));
  QSHARD_ASSIGN_OR_RETURN(cuda::DeviceBuffer w, cuda::DeviceBuffer::Allocate(n * n * 2));
  QSHARD_ASSIGN_OR_RETURN(cuda::DeviceBuffer y, cuda::DeviceBuffer::Allocate(n * n * 2));
  QSHARD_RETURN_IF_ERROR(FillRandomBf16(x.get(), n * n, 1));
  QSHARD_RETURN_IF_ERROR(FillRandomBf16(w.get(), n * n, 2));
  std::vector<double> times;
  for (int i = 0; i < 13; ++i) {
    BENCH_CUDA(cudaDeviceSynchronize());
    auto t0 = Clock::now();
    QSHARD_RETURN_IF_ERROR(blas->Linear(x.get(), w.get(), y.get(), DType::kBF16, n, n, n, nullptr));
    BENCH_CUDA(cudaDeviceSynchronize());
    if (i >= 3) times.push_back(Seconds(t0));
  }
  return 2.0 * n * n * n / Median(times) / 1e12;
}

// The opt-in kernels' process-wide switches (off by default until a GPU run has verified
// them): captured once, then either all on or back as captured. Autotuning rebuilds the
// cuBLASLt plans when it changes.
struct OptIns {
  bool rope_kv, combine, act_quant, autotune, factored, int_gemv, blas_scaled, gemv8_ring;
  static OptIns Current() {
    return {cuda::FusedRopeKvWriteEnabled(),      cuda::FusedSplitCombineEnabled(),
            cuda::FusedActQuantEnabled(),         cuda::BlasAutotuneEnabled(),
            cuda::IntGemmFactoredScalesEnabled(), cuda::IntGemv4Enabled(),
            cuda::Fp8BlasScaledEnabled(),         cuda::Gemv8RingEnabled()};
  }
  static OptIns AllOn() { return {true, true, true, true, true, true, true, true}; }
  absl::Status Apply(Backend& backend) const {
    cuda::SetFusedRopeKvWrite(rope_kv);
    cuda::SetFusedSplitCombine(combine);
    cuda::SetFusedActQuant(act_quant);
    cuda::SetIntGemmFactoredScales(factored);
    cuda::SetIntGemv4(int_gemv);
    cuda::SetFp8BlasScaled(blas_scaled);
    cuda::SetGemv8Ring(gemv8_ring);
    if (cuda::BlasAutotuneEnabled() != autotune) {
      cuda::SetBlasAutotune(autotune);
      QSHARD_RETURN_IF_ERROR(ResetCudaBlasPlans(backend));
    }
    return absl::OkStatus();
  }
};

struct FormatResult {
  std::string format, kernel;
  double linear_bytes = 0;  // decoder linears + lm_head, bytes read per decode step
  std::map<int64_t, double> linear_ms;  // M -> all decoder linears, ms
  std::map<int64_t, double> decode_tps;  // batch -> tokens/s
  // batch -> tokens/s sampling on the GPU, eager [0], replayed from CUDA graphs [1], and
  // from graphs with the opt-in fused kernels on [2] (0: failed, see fast_error).
  std::map<int64_t, double> fast_tps[3];
  double linear_ms_no_pdl = 0;  // all decoder linears at M = 1 with QSHARD_CUDA_PDL=0
  // All decoder linears with the format's opt-in linear kernels (cuBLASLt
  // autotuned for dense formats, the factored-scale GEMM and the decode GEMV for 4-bit,
  // outer-vector-scaled cuBLASLt for fp8 W8A8 at M > 16; empty: none) against the default,
  // at a few M.
  struct AltTiming {
    std::string kernel;
    int64_t m;
    double base_ms, alt_ms;
  };
  std::vector<AltTiming> alt;
  struct SweepPoint {
    int blocks_per_sm;
    const char* path;  // "" (default), "factored" or "gemv" (4-bit)
    int64_t m;
    double ms;
  };
  std::vector<SweepPoint> sweep;  // --sweep-splits: all decoder linears per K-split target
  struct AttnSweepPoint {
    int64_t min_split_len, batch;
    double tps;  // +graphs +fused decode (0: failed)
  };
  std::vector<AttnSweepPoint> attn_sweep;  // --sweep-splits: attention split length
  std::string fast_error;
  double prefill_tps = 0;
  double prefill_tc_tps = 0;  // with the tensor-core prefill attention (0: failed)
  double prefill_opt_in_tps = 0;  // ... and the opt-in kernels (OptIns::AllOn; 0: failed)
  std::string error;
};

// The widest input and output of layer `layer`'s decoder linears, or of every layer's with
// layer < 0 (fused ones are up to 2I wide).
std::pair<int64_t, int64_t> WidestLinear(const LlamaModel& model, int layer) {
  int64_t widest_in = 1, widest_out = 1;
  const int first = layer < 0 ? 0 : layer;
  const int last = layer < 0 ? static_cast<int>(model.config().num_layers) - 1 : layer;
  for (int l = first; l <= last; ++l) {
    for (const LinearOp* op : model.DecoderLinears(l)) {
      widest_in = std::max(widest_in, op->in_features());
      widest_out = std::max(widest_out, op->out_features());
    }
  }
  return {widest_in, widest_out};
}

// All decoder linears of every layer at M rows, median ms of 10 passes.
absl::StatusOr<double> TimeLinears(LlamaModel& model, int64_t m) {
  Backend& b = model.backend();
  StepMetadata empty;
  QSHARD_RETURN_IF_ERROR(b.BeginStep(empty));  // rewinds the step arena
  const ModelConfig& c = model.config();
  const auto [widest_in, widest_out] = WidestLinear(model, -1);
  Tensor x = b.Allocate(m, widest_in);
  Tensor y = b.Allocate(m, widest_out);
  QSHARD_RETURN_IF_ERROR(FillRandomBf16(x.raw(), m * widest_in, 7));
  std::vector<double> times;
  for (int rep = 0; rep < 12; ++rep) {
    BENCH_CUDA(cudaDeviceSynchronize());
    auto t0 = Clock::now();
    for (int64_t l = 0; l < c.num_layers; ++l) {
      for (const LinearOp* op : model.DecoderLinears(static_cast<int>(l))) {
        Tensor xin(x.dtype(), {m, op->in_features()}, x.raw(), nullptr, Device::kCuda);
        Tensor yout(y.dtype(), {m, op->out_features()}, y.raw(), nullptr, Device::kCuda);
        b.Linear(xin, *op, yout);
      }
    }
    BENCH_CUDA(cudaDeviceSynchronize());
    if (rep >= 2) times.push_back(Seconds(t0));
  }
  // Surfaces any error the ops kept.
  std::vector<float> one(1);
  QSHARD_RETURN_IF_ERROR(b.CopyToHost(Tensor(y.dtype(), {1, 1}, y.raw(), nullptr, Device::kCuda),
                                      one.data()));
  return Median(times) * 1e3;
}

// Layer 0's decoder linears once at each M, inside the NVTX range `range` (--profile).
absl::Status ProfileLinears(const ModelConfig& shape, const std::string& format,
                            const std::vector<int64_t>& ms, const ModelLoadOptions& load,
                            const char* range) {
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateCudaBackend());
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model,
                          LlamaModel::CreateDummy(shape, format, backend.get(), 1234, load));
  Backend& b = *backend;
  const auto [widest_in, widest_out] = WidestLinear(*model, 0);
  for (int pass = 0; pass < 2; ++pass) {  // pass 0 warms up (cuBLASLt plans, scratch)
    for (int64_t m : ms) {
      StepMetadata empty;
      QSHARD_RETURN_IF_ERROR(b.BeginStep(empty));
      Tensor x = b.Allocate(m, widest_in);
      Tensor y = b.Allocate(m, widest_out);
      QSHARD_RETURN_IF_ERROR(FillRandomBf16(x.raw(), m * widest_in, 7));
      BENCH_CUDA(cudaDeviceSynchronize());
      if (pass == 1) nvtxRangePushA(range);
      for (const LinearOp* op : model->DecoderLinears(0)) {
        std::printf("M=%lld %s%s [%lld x %lld] %s\n", static_cast<long long>(m), format.c_str(),
                    load.fuse_projections ? "" : " (unfused)",
                    static_cast<long long>(op->out_features()),
                    static_cast<long long>(op->in_features()), op->kernel_name().c_str());
        Tensor xin(x.dtype(), {m, op->in_features()}, x.raw(), nullptr, Device::kCuda);
        Tensor yout(y.dtype(), {m, op->out_features()}, y.raw(), nullptr, Device::kCuda);
        b.Linear(xin, *op, yout);
      }
      BENCH_CUDA(cudaDeviceSynchronize());
      if (pass == 1) nvtxRangePop();
      std::vector<float> one(1);
      QSHARD_RETURN_IF_ERROR(
          b.CopyToHost(Tensor(y.dtype(), {1, 1}, y.raw(), nullptr, Device::kCuda), one.data()));
    }
  }
  return absl::OkStatus();
}

constexpr int64_t kBenchBlockSize = 16;

// Token id i of the synthetic prompts and decode inputs (never the special ids 0..2).
int32_t BenchToken(int64_t i, int64_t vocab) {
  return static_cast<int32_t>(3 + (i * 7919) % (vocab - 3));
}

// A bf16 KV cache for max_batch sequences of up to seq_tokens tokens each (sequence s owns
// blocks [s * blocks_per_seq, (s + 1) * blocks_per_seq)), or one prompt of `prefill`
// tokens. Returns blocks_per_seq.
absl::StatusOr<int64_t> AllocateBenchCache(LlamaModel& model, int64_t max_batch, int64_t seq_tokens,
                                           int64_t prefill) {
  const ModelConfig& shape = model.config();
  const int64_t blocks_per_seq = (seq_tokens + kBenchBlockSize - 1) / kBenchBlockSize;
  KvCacheSpec spec = KvCacheSpecFor(shape, DType::kBF16, kBenchBlockSize);
  spec.num_blocks =
      std::max(max_batch * blocks_per_seq, (prefill + kBenchBlockSize - 1) / kBenchBlockSize);
  QSHARD_RETURN_IF_ERROR(model.AllocateKvCache(spec));
  return blocks_per_seq;
}

// Prefills `context` synthetic tokens for each of B sequences (a few per step: bounded
// activation memory) and returns their block tables.
absl::StatusOr<std::vector<std::vector<int32_t>>> FillContexts(LlamaModel& model, int64_t B,
                                                               int64_t context,
                                                               int64_t blocks_per_seq) {
  const int64_t vocab = model.config().vocab_size;
  std::vector<std::vector<int32_t>> tables(B), prompts(B);
  for (int64_t s = 0; s < B; ++s) {
    for (int64_t blk = 0; blk < blocks_per_seq; ++blk) {
      tables[s].push_back(static_cast<int32_t>(s * blocks_per_seq + blk));
    }
    for (int64_t i = 0; i < context; ++i) prompts[s].push_back(BenchToken(s * 131 + i, vocab));
  }
  std::vector<float> logits;
  for (int64_t s0 = 0; s0 < B; s0 += 8) {
    std::vector<SequenceChunk> part;
    for (int64_t s = s0; s < std::min(B, s0 + 8); ++s) {
      part.push_back({prompts[s], 0, tables[s], LogitsMode::kLast});
    }
    QSHARD_RETURN_IF_ERROR(model.Forward(part, &logits));
  }
  return tables;
}

// --profile-step: one eager decode step of `batch` sequences at `context` tokens (after a
// warm-up step), every kernel launched on its own (no graph), inside the NVTX range "step",
// with the process's kernel settings (QSHARD_CUDA_* switches), logits to the host.
absl::Status ProfileStep(const ModelConfig& shape, const std::string& format, int64_t batch,
                         int64_t context) {
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateCudaBackend());
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model,
                          LlamaModel::CreateDummy(shape, format, backend.get(), 1234));
  QSHARD_RETURN_IF_ERROR(SetCudaGraphs(*backend, false));
  QSHARD_ASSIGN_OR_RETURN(const int64_t blocks_per_seq,
                          AllocateBenchCache(*model, batch, context + 2, 0));
  QSHARD_ASSIGN_OR_RETURN(const std::vector<std::vector<int32_t>> tables,
                          FillContexts(*model, batch, context, blocks_per_seq));
  std::vector<int32_t> next(batch);
  std::vector<SequenceChunk> chunks(batch);
  std::vector<float> logits;
  for (int step = 0; step < 2; ++step) {
    for (int64_t s = 0; s < batch; ++s) {
      next[s] = BenchToken(step * 17 + s, shape.vocab_size);
      chunks[s] = {absl::Span<const int32_t>(&next[s], 1), static_cast<int32_t>(context + step),
                   tables[s], LogitsMode::kLast};
    }
    BENCH_CUDA(cudaDeviceSynchronize());
    if (step == 1) nvtxRangePushA("step");
    const absl::Status st = model->Forward(chunks, &logits);
    BENCH_CUDA(cudaDeviceSynchronize());
    if (step == 1) nvtxRangePop();
    QSHARD_RETURN_IF_ERROR(st);
  }
  std::printf("%s: one decode step, batch %lld, context %lld, %s\n", format.c_str(),
              static_cast<long long>(batch), static_cast<long long>(context),
              model->DecoderLinears(0).front()->kernel_name().c_str());
  return absl::OkStatus();
}

// One format's measurements with the projections fused or not as `load` says; prefill 0
// skips the prefill (the unfused baseline).
absl::Status RunFormat(const ModelConfig& shape, const std::string& format,
                       const ModelLoadOptions& load, const std::vector<int64_t>& batches,
                       int64_t context, int64_t steps, int64_t prefill, bool with_graphs,
                       bool sweep, FormatResult& r) {
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend, CreateCudaBackend());
  auto t0 = Clock::now();
  QSHARD_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model,
                          LlamaModel::CreateDummy(shape, format, backend.get(), 1234, load));
  std::fprintf(stderr, "  %s%s: random weights built and uploaded in %.1f s\n", format.c_str(),
               load.fuse_projections ? "" : " (unfused)", Seconds(t0));
  r.kernel = model->weight_summary().linear_kernel;
  for (int64_t l = 0; l < shape.num_layers; ++l) {
    for (const LinearOp* op : model->DecoderLinears(static_cast<int>(l))) {
      r.linear_bytes += static_cast<double>(op->weight_bytes());
    }
  }
  r.linear_bytes += 2.0 * shape.vocab_size * shape.hidden_size;  // bf16 lm_head

  for (int64_t m : {1, 16}) {
    QSHARD_ASSIGN_OR_RETURN(r.linear_ms[m], TimeLinears(*model, m));
  }
  if (sweep) {  // the K-split target of the quantized linear kernels, at M = 1, 16 (and 64)
    const bool int_kernel = r.kernel.rfind("cuda-marlin", 0) == 0;
    const bool int4 = r.kernel.rfind("cuda-marlin-w4", 0) == 0;
    const bool gemv8 = r.kernel.find("gemv") != std::string::npos;
    if (int_kernel || gemv8) {
      const int saved = int_kernel ? cuda::IntGemmBlocksPerSm() : cuda::Gemv8BlocksPerSm();
      const bool saved_factored = cuda::IntGemmFactoredScalesEnabled();
      const bool saved_gemv = cuda::IntGemv4Enabled();
      for (const char* path : {"", "factored", "gemv"}) {
        if (*path != '\0' && !int4) break;
        cuda::SetIntGemmFactoredScales(std::string(path) == "factored");
        cuda::SetIntGemv4(std::string(path) == "gemv");
        for (int bps : {1, 2, 3, 4, 6, 8, 12}) {
          if (int_kernel) cuda::SetIntGemmBlocksPerSm(bps);
          if (gemv8) cuda::SetGemv8BlocksPerSm(bps);
          for (int64_t m : {1, 16, 64}) {
            // The GEMVs serve M <= 16; the 64-row GEMM tile M 17..64.
            if (m > 16 && (!int_kernel || std::string(path) == "gemv")) continue;
            QSHARD_ASSIGN_OR_RETURN(const double ms, TimeLinears(*model, m));
            r.sweep.push_back({bps, path, m, ms});
          }
        }
      }
      cuda::SetIntGemmFactoredScales(saved_factored);
      cuda::SetIntGemv4(saved_gemv);
      if (int_kernel) cuda::SetIntGemmBlocksPerSm(saved);
      if (gemv8) cuda::SetGemv8BlocksPerSm(saved);
    }
  }
  {  // the same without programmatic dependent launch, for the ratio
    const bool pdl = cuda::ProgrammaticLaunchEnabled();
    cuda::SetProgrammaticLaunch(false);
    absl::StatusOr<double> ms = TimeLinears(*model, 1);
    cuda::SetProgrammaticLaunch(pdl);
    QSHARD_RETURN_IF_ERROR(ms.status());
    r.linear_ms_no_pdl = *ms;
  }
  // The same linears with the format's opt-in kernel (`set(true)`) and without, at each M
  // of `ms`; `reset` runs after every switch (cuBLASLt plans follow the autotune switch).
  auto time_alt = [&](const char* label, std::initializer_list<int64_t> ms, auto set, auto get,
                      auto reset) -> absl::Status {
    const bool saved = get();
    absl::Status st;
    for (int64_t m : ms) {
      FormatResult::AltTiming t{label, m, 0, 0};
      for (const bool on : {false, true}) {
        set(on);
        st.Update(reset());
        absl::StatusOr<double> ms_or = TimeLinears(*model, m);
        st.Update(ms_or.status());
        if (!st.ok()) break;
        (on ? t.alt_ms : t.base_ms) = *ms_or;
      }
      if (!st.ok()) break;
      r.alt.push_back(t);
    }
    set(saved);
    st.Update(reset());
    return st;
  };
  auto no_reset = [] { return absl::OkStatus(); };
  if (r.kernel.find("cublaslt") != std::string::npos) {
    // cuBLASLt's algorithms chosen by timing (cuda::SetBlasAutotune) instead of by its
    // heuristic; the plans are rebuilt with each switch.
    QSHARD_RETURN_IF_ERROR(time_alt("blas-autotune", {1, 16, 64}, cuda::SetBlasAutotune,
                                    cuda::BlasAutotuneEnabled,
                                    [&] { return ResetCudaBlasPlans(*backend); }));
  } else if (r.kernel.rfind("cuda-marlin-w4", 0) == 0) {
    // The factored-scale path (4-bit checkpoints with integer zero points: all dummy ones).
    QSHARD_RETURN_IF_ERROR(time_alt("factored", {1, 16, 64}, cuda::SetIntGemmFactoredScales,
                                    cuda::IntGemmFactoredScalesEnabled, no_reset));
    // The decode GEMV (M <= 16), which takes precedence over the factored GEMM.
    QSHARD_RETURN_IF_ERROR(
        time_alt("gemv", {1, 16}, cuda::SetIntGemv4, cuda::IntGemv4Enabled, no_reset));
  } else if (r.kernel.find("fp8-w8a8") != std::string::npos) {
    // The GEMV with its loads as a ring (M <= 16).
    QSHARD_RETURN_IF_ERROR(
        time_alt("gemv-ring", {1, 16}, cuda::SetGemv8Ring, cuda::Gemv8RingEnabled, no_reset));
    // cuBLASLt with outer-vector scales instead of fp32 accumulators + epilogue (M > 16).
    QSHARD_RETURN_IF_ERROR(time_alt("blas-scaled", {64, 512}, cuda::SetFp8BlasScaled,
                                    cuda::Fp8BlasScaledEnabled, no_reset));
  }

  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  QSHARD_ASSIGN_OR_RETURN(const int64_t blocks_per_seq,
                          AllocateBenchCache(*model, max_batch, context + steps, prefill));
  auto token = [&](int64_t i) { return BenchToken(i, shape.vocab_size); };
  std::vector<float> logits;
  for (int64_t B : batches) {
    QSHARD_ASSIGN_OR_RETURN(const std::vector<std::vector<int32_t>> tables,
                            FillContexts(*model, B, context, blocks_per_seq));
    std::vector<SequenceChunk> chunks(B);
    std::vector<int32_t> next(B);
    std::vector<SamplingRow> rows(B);  // greedy, like the engine's temperature-0 requests
    for (SamplingRow& row : rows) row.temperature = 0.0f;
    std::vector<SampledToken> sampled;
    // The same decode steps four ways: logits to the host (pass 0), sampled on the GPU
    // (1), sampled on the GPU with the step replayed from a CUDA graph (2), all three with
    // the process's settings, and (3) pass 2 with the opt-in fused kernels on (q|k|v split
    // + RoPE + KV write in one launch; attention's split combine inside the attention
    // kernel; fp8 activations quantized by the norm / SiLU kernels that produce them;
    // cuBLASLt algorithms chosen by timing; the 4-bit factored-scale path).
    // Each pass rewrites the same cache positions, which is fine for timing.
    const OptIns opt_ins = OptIns::Current();
    // tokens/s of `steps` decode steps (the first two not timed) as pass `pass` runs them.
    auto time_steps = [&](int pass) -> absl::StatusOr<double> {
      QSHARD_RETURN_IF_ERROR(SetCudaGraphs(*backend, false));  // drops the graphs
      QSHARD_RETURN_IF_ERROR(SetCudaGraphs(*backend, pass >= 2));
      // (Autotuning in pass 3 covers the dense linears and the lm_head of every format.)
      QSHARD_RETURN_IF_ERROR((pass == 3 ? OptIns::AllOn() : opt_ins).Apply(*backend));
      std::vector<double> times;
      for (int64_t step = 0; step < steps; ++step) {
        for (int64_t s = 0; s < B; ++s) {
          next[s] = token(step * 17 + s);
          chunks[s] = {absl::Span<const int32_t>(&next[s], 1),
                       static_cast<int32_t>(context + step), tables[s], LogitsMode::kLast};
        }
        auto ts = Clock::now();
        if (pass == 0) {
          // Ends with the logits on the host.
          QSHARD_RETURN_IF_ERROR(model->Forward(chunks, &logits));
        } else {
          QSHARD_ASSIGN_OR_RETURN(Tensor dev, model->ForwardLogits(chunks));
          QSHARD_RETURN_IF_ERROR(backend->Sample(dev, rows, &sampled));
        }
        if (step >= 2) times.push_back(Seconds(ts));
      }
      return B / Median(times);
    };
    for (int pass = 0; pass < 4; ++pass) {
      if (pass > 0 && !with_graphs) break;
      const absl::StatusOr<double> tps = time_steps(pass);
      if (pass == 0) {
        QSHARD_RETURN_IF_ERROR(tps.status());
        r.decode_tps[B] = *tps;
      } else if (tps.ok()) {
        r.fast_tps[pass - 1][B] = *tps;
      } else {
        r.fast_tps[pass - 1][B] = 0;
        if (r.fast_error.empty()) r.fast_error = tps.status().ToString();
      }
    }
    if (sweep && with_graphs && B == batches.front()) {
      // The attention split length at this batch, steps as pass 3 (graphs, fused kernels).
      const int64_t saved = cuda::AttentionMinSplitLen();
      for (int64_t len : {32, 64, 128, 256}) {
        QSHARD_RETURN_IF_ERROR(SetCudaGraphs(*backend, false));  // plans follow the knob
        QSHARD_RETURN_IF_ERROR(cuda::SetAttentionMinSplitLen(len));
        const absl::StatusOr<double> tps = time_steps(3);
        r.attn_sweep.push_back({len, B, tps.ok() ? *tps : 0.0});
        if (!tps.ok() && r.fast_error.empty()) r.fast_error = tps.status().ToString();
      }
      QSHARD_RETURN_IF_ERROR(SetCudaGraphs(*backend, false));
      QSHARD_RETURN_IF_ERROR(cuda::SetAttentionMinSplitLen(saved));
    }
    QSHARD_RETURN_IF_ERROR(SetCudaGraphs(*backend, false));
    QSHARD_RETURN_IF_ERROR(opt_ins.Apply(*backend));
  }

  if (prefill > 0) {
    std::vector<int32_t> ids(prefill);
    for (int64_t i = 0; i < prefill; ++i) ids[i] = token(i);
    std::vector<int32_t> table((prefill + kBenchBlockSize - 1) / kBenchBlockSize);
    std::iota(table.begin(), table.end(), 0);
    SequenceChunk c{ids, 0, table, LogitsMode::kLast};
    // With the CUDA-core attention kernel, then with the tensor-core one (the default;
    // QSHARD_CUDA_TC_ATTENTION=0 turns it off), then that with the opt-in kernels on; the
    // process-wide settings are restored after.
    const bool tc_before = cuda::TensorCorePrefillAttentionEnabled();
    const OptIns opt_ins = OptIns::Current();
    for (int pass = 0; pass < 3; ++pass) {
      cuda::SetTensorCorePrefillAttention(pass > 0);
      absl::Status st = (pass == 2 ? OptIns::AllOn() : opt_ins).Apply(*backend);
      std::vector<double> times;
      for (int rep = 0; rep < 4 && st.ok(); ++rep) {
        auto ts = Clock::now();
        st = model->Forward({&c, 1}, &logits);
        if (rep >= 1) times.push_back(Seconds(ts));
      }
      if (pass == 0) {
        cuda::SetTensorCorePrefillAttention(tc_before);
        QSHARD_RETURN_IF_ERROR(st);
        r.prefill_tps = prefill / Median(times);
      } else if (st.ok()) {
        (pass == 1 ? r.prefill_tc_tps : r.prefill_opt_in_tps) = prefill / Median(times);
      } else if (r.fast_error.empty()) {
        r.fast_error = absl::StrCat(
            pass == 1 ? "tensor-core prefill attention: " : "prefill with the opt-in kernels: ",
            st.ToString());
      }
    }
    cuda::SetTensorCorePrefillAttention(tc_before);
    QSHARD_RETURN_IF_ERROR(opt_ins.Apply(*backend));
  }
  return absl::OkStatus();
}

std::vector<int64_t> ParseInts(const std::string& s) {
  std::vector<int64_t> v;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int64_t x = 0;
    if (absl::SimpleAtoi(p, &x) && x > 0) v.push_back(x);
  }
  return v;
}

int Main(int argc, char** argv) {
  std::string shape_name = "llama-3.1-8b";
  std::string formats = "bf16,fp8,gptq-4bit,awq-4bit";
  std::vector<int64_t> batches = {1, 8, 32, 64};
  int64_t context = 256, steps = 16, prefill = 2048;
  bool graphs = true, unfused_baseline = false, sweep = false;
  int64_t layers = 0;               // 0: the shape's
  std::vector<int64_t> profile_ms;  // --profile
  int64_t profile_step_batch = 0;   // --profile-step B
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--shape") shape_name = next();
    else if (a == "--formats") formats = next();
    else if (a == "--batches") batches = ParseInts(next());
    else if (a == "--context") context = ParseInts(next()).at(0);
    else if (a == "--steps") steps = std::max<int64_t>(3, ParseInts(next()).at(0));
    else if (a == "--prefill") prefill = ParseInts(next()).at(0);
    else if (a == "--no-graphs") graphs = false;
    else if (a == "--sweep-splits") sweep = true;
    else if (a == "--layers") layers = ParseInts(next()).at(0);
    else if (a == "--profile") profile_ms = ParseInts(next());
    else if (a == "--profile-step")
      profile_step_batch = ParseInts(next()).at(0);
    else if (a == "--unfused-baseline")
      unfused_baseline = true;
    else {
      std::fprintf(stderr,
                   "usage: qshard_cuda_bench [--shape NAME] [--formats a,b] [--batches 1,8] "
                   "[--context N] [--steps N] [--prefill N] [--no-graphs] [--layers N] "
                   "[--sweep-splits] [--profile M1,M2] [--profile-step B] "
                   "[--unfused-baseline]\n");
      return 2;
    }
  }
  if (batches.empty()) batches = {1};
  auto shape = ModelShapeByName(shape_name);
  if (!shape.ok()) {
    std::fprintf(stderr, "%s\n", std::string(shape.status().message()).c_str());
    return 2;
  }
  if (layers > 0) shape->num_layers = layers;
  if (profile_step_batch > 0) {
    int rc = 0;
    for (absl::string_view f : absl::StrSplit(formats, ',', absl::SkipEmpty())) {
      const absl::Status st = ProfileStep(*shape, std::string(f), profile_step_batch, context);
      if (!st.ok()) {
        std::fprintf(stderr, "%s: %s\n", std::string(f).c_str(), st.ToString().c_str());
        rc = 1;
      }
    }
    return rc;
  }
  if (!profile_ms.empty()) {
    int rc = 0;
    ModelLoadOptions unfused;
    unfused.fuse_projections = false;
    for (absl::string_view f : absl::StrSplit(formats, ',', absl::SkipEmpty())) {
      absl::Status st =
          ProfileLinears(*shape, std::string(f), profile_ms, ModelLoadOptions(), "linears");
      if (st.ok() && unfused_baseline) {
        st = ProfileLinears(*shape, std::string(f), profile_ms, unfused, "linears-unfused");
      }
      if (!st.ok()) {
        std::fprintf(stderr, "%s: %s\n", std::string(f).c_str(), st.ToString().c_str());
        rc = 1;
      }
    }
    return rc;
  }
  auto info = cuda::QueryDevice(0);
  if (!info.ok()) {
    std::fprintf(stderr, "no GPU: %s\n", std::string(info.status().message()).c_str());
    return 1;
  }
  auto bw = CopyBandwidth();
  auto tflops = Bf16GemmTflops();
  if (!bw.ok() || !tflops.ok()) {
    std::fprintf(stderr, "baseline failed: %s %s\n", bw.status().ToString().c_str(),
                 tflops.status().ToString().c_str());
    return 1;
  }
  // The header first and each format's row as soon as it is measured, so a run cut short
  // (a time limit) still shows what it finished.
  std::printf("\n## qshard_cuda_bench: %s, random weights\n", shape_name.c_str());
  std::printf("device: %s\n", info->ToString().c_str());
  std::printf("baselines (same run): device-to-device copy %.2f TB/s (read + write); "
              "cuBLASLt bf16 8192^3 %.0f TFLOP/s\n",
              *bw / 1e12, *tflops);
  std::printf(
      "decode: context %lld tokens, median of %lld steps, logits to the host each step "
      "(gpu-sample: greedy on the GPU, ids to the host; +graphs: also CUDA graphs; "
      "+fused: also the opt-in kernels: fused RoPE/KV-write, in-kernel attention combine, "
      "fp8 activations quantized by their producers, cuBLASLt autotuning, 4-bit factored "
      "scales); "
      "prefill: one %lld-token prompt\n\n",
      static_cast<long long>(context), static_cast<long long>(steps - 2),
      static_cast<long long>(prefill));
  std::printf("| format | kernel | weights GB/token | roofline b1 tok/s | linears M=1 ms (TB/s) "
              "| linears M=16 ms (TB/s) |");
  for (int64_t B : batches) std::printf(" decode b%lld tok/s |", static_cast<long long>(B));
  std::printf(
      " b1 / roofline | prefill tok/s | prefill tc-attn tok/s | prefill tc-attn +opt-in "
      "tok/s |");
  if (graphs) {
    for (int64_t B : batches) std::printf(" gpu-sample b%lld tok/s |", static_cast<long long>(B));
    for (int64_t B : batches) std::printf(" +graphs b%lld tok/s |", static_cast<long long>(B));
    for (int64_t B : batches) {
      std::printf(" +graphs +fused b%lld tok/s |", static_cast<long long>(B));
    }
    std::printf(
        " +graphs b1 / roofline | linears M=1 no-PDL ms | opt-in linear kernel: all "
        "linears ms, default -> opt-in |");
  }
  std::printf("\n|---|---|---|---|---|---|");
  for (size_t i = 0; i < batches.size(); ++i) std::printf("---|");
  std::printf("---|---|---|---|");
  if (graphs) {
    for (size_t i = 0; i < 3 * batches.size(); ++i) std::printf("---|");
    std::printf("---|---|---|");
  }
  std::printf("\n");
  std::fflush(stdout);
  ModelLoadOptions unfused_load;
  unfused_load.fuse_projections = false;
  const std::vector<int64_t> first_batch = {batches.front()};
  const double lm_head_bytes = 2.0 * shape->vocab_size * shape->hidden_size;
  // One table row; batches (and the prefill) that were not measured show "-".
  auto print_row = [&](const FormatResult& r, const std::string& label) {
    const double roof = *bw / r.linear_bytes;
    const double lin_bytes = r.linear_bytes - lm_head_bytes;
    auto cell = [](const std::map<int64_t, double>& tps, int64_t B) {
      if (tps.count(B)) {
        std::printf(" %.1f |", tps.at(B));
      } else {
        std::printf(" - |");
      }
    };
    std::printf("| %s | %s | %.2f | %.0f | %.3f (%.2f) | %.3f (%.2f) |", label.c_str(),
                r.kernel.c_str(), r.linear_bytes / 1e9, roof, r.linear_ms.at(1),
                lin_bytes / (r.linear_ms.at(1) * 1e-3) / 1e12, r.linear_ms.at(16),
                lin_bytes / (r.linear_ms.at(16) * 1e-3) / 1e12);
    for (int64_t B : batches) cell(r.decode_tps, B);
    std::printf(" %.0f%% |", 100.0 * r.decode_tps.at(batches.front()) / roof);
    if (r.prefill_tps > 0) {
      std::printf(" %.0f | %.0f | %.0f |", r.prefill_tps, r.prefill_tc_tps, r.prefill_opt_in_tps);
    } else {
      std::printf(" - | - | - |");
    }
    if (graphs) {
      for (const auto& tps : r.fast_tps) {
        for (int64_t B : batches) cell(tps, B);
      }
      const auto& g = r.fast_tps[1];
      const double g1 = g.count(batches.front()) ? g.at(batches.front()) : 0.0;
      std::printf(" %.0f%% | %.3f |", 100.0 * g1 / roof, r.linear_ms_no_pdl);
      if (!r.alt.empty()) {
        for (size_t i = 0; i < r.alt.size(); ++i) {
          const auto& t = r.alt[i];
          if (i == 0 || t.kernel != r.alt[i - 1].kernel) std::printf(" %s:", t.kernel.c_str());
          std::printf(" M=%lld %.3f -> %.3f (%.2fx)", static_cast<long long>(t.m), t.base_ms,
                      t.alt_ms, t.base_ms / t.alt_ms);
        }
        std::printf(" |");
      } else {
        std::printf(" - |");
      }
    }
    std::printf("\n");
    for (size_t i = 0; i < r.sweep.size();) {  // one line per (path, blocks/SM target)
      const auto& first = r.sweep[i];
      std::printf("  sweep %s%s%s: %d blocks/SM target: all linears", r.format.c_str(),
                  *first.path != '\0' ? " " : "", first.path, first.blocks_per_sm);
      for (; i < r.sweep.size() && r.sweep[i].blocks_per_sm == first.blocks_per_sm &&
             r.sweep[i].path == first.path;
           ++i) {
        std::printf(" M=%lld %.3f ms", static_cast<long long>(r.sweep[i].m), r.sweep[i].ms);
      }
      std::printf("\n");
    }
    for (const auto& pt : r.attn_sweep) {
      std::printf(
          "  sweep %s: attention splits of >= %lld positions, b%lld: +graphs +fused "
          "%.1f tok/s\n",
          r.format.c_str(), static_cast<long long>(pt.min_split_len),
          static_cast<long long>(pt.batch), pt.tps);
    }
    if (!r.fast_error.empty()) {
      std::printf("  (a GPU-sampling / graph pass failed: %s)\n", r.fast_error.c_str());
    }
    std::fflush(stdout);
  };
  std::vector<FormatResult> results;
  for (absl::string_view f : absl::StrSplit(formats, ',', absl::SkipEmpty())) {
    FormatResult r;
    r.format = std::string(f);
    std::fprintf(stderr, "running %s ...\n", r.format.c_str());
    absl::Status st = RunFormat(*shape, r.format, ModelLoadOptions(), batches, context, steps,
                                prefill, graphs, sweep, r);
    if (!st.ok()) r.error = st.ToString();
    results.push_back(r);
    if (!r.error.empty()) {
      std::printf("| %s | FAILED: %s |\n", r.format.c_str(), r.error.c_str());
      std::fflush(stdout);
      continue;
    }
    print_row(r, r.format);
    if (!unfused_baseline) continue;

    // The same weights with separate q/k/v and gate/up Linears (the fused model is freed
    // by now): linears and decode at the first batch size, no prefill. A failure here is
    // reported and does not fail the run.
    FormatResult u;
    u.format = r.format;
    const std::string label = r.format + " (unfused)";
    std::fprintf(stderr, "running %s ...\n", label.c_str());
    st = RunFormat(*shape, u.format, unfused_load, first_batch, context, steps, /*prefill=*/0,
                   graphs, /*sweep=*/false, u);
    if (!st.ok()) {
      std::printf("| %s | FAILED: %s |\n", label.c_str(), st.ToString().c_str());
      std::fflush(stdout);
      continue;
    }
    print_row(u, label);
    // Speedups of fusion, > 1: the fused model is faster.
    const int64_t B0 = batches.front();
    auto ratio = [](double num, double den) -> std::string {
      return num > 0 && den > 0 ? absl::StrFormat("%.3fx", num / den) : "n/a";
    };
    // Linears: unfused ms / fused ms; decode: fused tok/s / unfused tok/s.
    std::string line = absl::StrFormat(
        "  %s fusion speedup (fused vs unfused, same run; >1: fused faster): linears M=1 "
        "%.3f vs %.3f ms %s, M=16 %s; decode b%lld %.1f vs %.1f tok/s %s",
        r.format, r.linear_ms.at(1), u.linear_ms.at(1), ratio(u.linear_ms.at(1), r.linear_ms.at(1)),
        ratio(u.linear_ms.at(16), r.linear_ms.at(16)), static_cast<long long>(B0),
        r.decode_tps.at(B0), u.decode_tps.at(B0), ratio(r.decode_tps.at(B0), u.decode_tps.at(B0)));
    if (graphs) {
      auto at = [B0](const std::map<int64_t, double>& tps) {
        return tps.count(B0) ? tps.at(B0) : 0.0;
      };
      absl::StrAppendFormat(&line, ", gpu-sample %s, +graphs %s",
                            ratio(at(r.fast_tps[0]), at(u.fast_tps[0])),
                            ratio(at(r.fast_tps[1]), at(u.fast_tps[1])));
    }
    std::printf("%s\n", line.c_str());
    std::fflush(stdout);
  }
  bool failed = false;
  for (const auto& r : results) failed |= !r.error.empty();
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace qshard

int main(int argc, char** argv) { return qshard::Main(argc, argv); }
