#include "runtime/backend/cpu/cpu_backend.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "quant/fp8.h"
#include "runtime/backend/cpu/isa.h"
#include "runtime/backend/cpu/kv_rows.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/backend/cpu/quant_linear.h"
#include "runtime/base/half.h"
#include "runtime/base/thread_pool.h"
#include "runtime/checkpoint/rope_frequencies.h"

namespace qshard {
namespace {

class CpuDenseLinear : public LinearOp {
 public:
  explicit CpuDenseLinear(const LinearWeights& w) : w_(w) {}
  int64_t in_features() const override { return w_.in_features; }
  int64_t out_features() const override { return w_.out_features; }
  std::string kernel_name() const override {
    return absl::StrCat("cpu-dense-", std::string(DTypeName(w_.weight.dtype())),
                        "-", cpu::IsaName(cpu::ActiveIsa()));
  }
  int64_t weight_bytes() const override {
    return static_cast<int64_t>(w_.weight.nbytes() + (w_.bias.empty() ? 0 : w_.bias.nbytes()));
  }
  const LinearWeights& weights() const { return w_; }

 private:
  LinearWeights w_;  // views into the mmap'd checkpoint: no copy
};

class CpuBackend : public Backend {
 public:
  Device device() const override { return Device::kCpu; }
  std::string name() const override {
    const cpu::Isa isa = cpu::ActiveIsa();
    const char* simd = isa == cpu::Isa::kAvx512
                           ? (cpu::CpuHasAvx512Vnni() ? "avx512+vnni" : "avx512")
                       : isa == cpu::Isa::kAvx2 ? "avx2+fma"
                                                : "scalar";
    return absl::StrCat("cpu (", ThreadPool::Global().num_threads(), " threads, ", simd, ")");
  }
  DType activation_dtype() const override { return DType::kF32; }
  DeviceInfo device_info() const override { return DeviceInfo::Cpu(); }

  absl::StatusOr<Tensor> UploadWeight(const Tensor& host) override {
    if (host.device() != Device::kCpu) {
      return absl::InvalidArgumentError("CPU backend: weight is not in host memory");
    }
    return host;  // zero copy
  }

  absl::StatusOr<std::unique_ptr<LinearOp>> PrepareLinear(const LinearWeights& w) override {
    if (cpu::IsQuantFormat(w.format)) return cpu::PrepareQuantLinear(w);
    DType dt = w.weight.dtype();
    if (dt != DType::kBF16 && dt != DType::kF16 && dt != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(
          w.name, ".weight: dtype ", std::string(DTypeName(dt)),
          " is not a dense float format (expected bfloat16, float16 or float32)"));
    }
    return std::unique_ptr<LinearOp>(new CpuDenseLinear(w));
  }

  Tensor Allocate(int64_t rows, int64_t cols) override {
    return Tensor::Empty(DType::kF32, {rows, cols});
  }
  Tensor AllocateF32(int64_t rows, int64_t cols) override { return Allocate(rows, cols); }

  absl::Status AllocateKvCache(const KvCacheSpec& spec) override {
    if (!cpu::IsSupportedKvDType(spec.dtype)) {
      return absl::UnimplementedError(absl::StrCat(
          "CPU backend: KV cache dtype ", std::string(DTypeName(spec.dtype)),
          " is not supported (expected float32, bfloat16, float16, fp8_e4m3 or fp8_e5m2)"));
    }
    // Scales survive a re-allocation of the same model's cache (eval-ppl resizes it).
    if (static_cast<int64_t>(k_scale_.size()) != spec.num_layers) {
      k_scale_.assign(spec.num_layers, 1.0f);
      v_scale_.assign(spec.num_layers, 1.0f);
      scales_pending_.assign(spec.num_layers, false);
    }
    spec_ = spec;
    k_cache_.clear();
    v_cache_.clear();
    for (int64_t l = 0; l < spec.num_layers; ++l) {
      k_cache_.push_back(Tensor::Empty(spec.dtype, {spec.ElementsPerLayer()}, /*zero=*/false));
      v_cache_.push_back(Tensor::Empty(spec.dtype, {spec.ElementsPerLayer()}, /*zero=*/false));
    }
    return absl::OkStatus();
  }
  const KvCacheSpec& kv_cache_spec() const override { return spec_; }

  void SetKvScales(int layer, float k_scale, float v_scale) override {
    k_scale_[layer] = k_scale;
    v_scale_[layer] = v_scale;
  }
  std::pair<float, float> GetKvScales(int layer) const override {
    return {k_scale_[layer], v_scale_[layer]};
  }
  void CalculateKvScalesAtNextStep() override {
    scales_pending_.assign(spec_.num_layers, true);
  }

  absl::Status CopyToHost(const Tensor& src, float* dst) override {
    std::copy(src.data<float>(), src.data<float>() + src.numel(), dst);
    return absl::OkStatus();
  }

  absl::Status BeginStep(const StepMetadata& meta) override {
    meta_ = &meta;
    token_seq_.assign(meta.num_tokens(), 0);
    for (int32_t s = 0; s < meta.num_seqs(); ++s) {
      for (int32_t t = meta.query_start[s]; t < meta.query_start[s + 1]; ++t) token_seq_[t] = s;
    }
    return absl::OkStatus();
  }

  void Embedding(const Tensor& table, const int32_t* ids, Tensor& out) override {
    cpu::Embedding(table, ids, out.dim(0), out.data<float>());
  }

  void RmsNorm(const Tensor& x, const Tensor& w, float eps, Tensor& out) override {
    cpu::RmsNorm(x.data<float>(), w, eps, x.dim(0), x.dim(1), out.data<float>());
  }

  void AddRmsNorm(Tensor& residual, const Tensor& x, const Tensor& w, float eps,
                  Tensor& out) override {
    cpu::AddRmsNorm(residual.data<float>(), x.data<float>(), w, eps, x.dim(0), x.dim(1),
                    out.data<float>());
  }

  void Linear(const Tensor& x, const LinearOp& op, Tensor& y) override {
    if (auto* q = dynamic_cast<const cpu::CpuQuantLinear*>(&op)) {
      q->Run(x.data<float>(), x.dim(0), y.data<float>());
      return;
    }
    const auto& lw = static_cast<const CpuDenseLinear&>(op).weights();
    cpu::Linear(x.data<float>(), x.dim(0), lw.weight, lw.bias.empty() ? nullptr : &lw.bias,
                y.data<float>());
  }

  void Rope(Tensor& q, Tensor& k, int64_t head_dim, const RopeConfig& rope) override {
    if (inv_freq_.empty() || rope_head_dim_ != head_dim || !(rope_ == rope)) {
      inv_freq_ = RopeInvFrequencies(rope, head_dim);
      rope_head_dim_ = head_dim;
      rope_ = rope;
    }
    const int64_t half = head_dim / 2;
    const int64_t T = q.dim(0);
    const int64_t qh = q.dim(1) / head_dim;
    const int64_t kh = k.dim(1) / head_dim;
    std::vector<float> cos(half), sin(half);
    for (int64_t t = 0; t < T; ++t) {
      const float pos = static_cast<float>(meta_->positions[t]);
      for (int64_t i = 0; i < half; ++i) {
        // The angle is formed in fp32 as the reference does, then cos/sin taken exactly.
        const float angle = pos * inv_freq_[i];
        cos[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sin[i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
      auto rotate = [&](float* v) {
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = v[i], x2 = v[i + half];
          v[i] = x1 * cos[i] - x2 * sin[i];
          v[i + half] = x2 * cos[i] + x1 * sin[i];
        }
      };
      for (int64_t h = 0; h < qh; ++h) rotate(q.data<float>() + t * q.dim(1) + h * head_dim);
      for (int64_t h = 0; h < kh; ++h) rotate(k.data<float>() + t * k.dim(1) + h * head_dim);
    }
  }

  void Attention(int layer, const Tensor& q, const Tensor& k, const Tensor& v, int64_t num_heads,
                 int64_t num_kv_heads, int64_t head_dim, float scale, Tensor& out) override {
    const StepMetadata& m = *meta_;
    const int64_t T = q.dim(0);
    const int64_t bs = spec_.block_size;
    const DType dt = spec_.dtype;
    const size_t esz = DTypeSize(dt);
    uint8_t* kc = static_cast<uint8_t*>(k_cache_[layer].raw());
    uint8_t* vc = static_cast<uint8_t*>(v_cache_[layer].raw());
    // Cache address of (block, kv head, offset): layout [blocks, kv_heads, block_size, D].
    auto row = [&](uint8_t* base, int64_t block, int64_t h, int64_t off) {
      return base + (((block * num_kv_heads + h) * bs + off) * head_dim) * esz;
    };
    // 0) --calculate-kv-scales: the first step that reaches this layer sets its fp8
    // scales so the largest |K| / |V| of that step maps to the format's max.
    const float fp8_max = cpu::Fp8MaxValue(dt);
    if (fp8_max > 0 && scales_pending_[layer]) {
      const float k_amax = AbsMax(k.data<float>(), k.numel());
      const float v_amax = AbsMax(v.data<float>(), v.numel());
      if (k_amax > 0) k_scale_[layer] = k_amax / fp8_max;
      if (v_amax > 0) v_scale_[layer] = v_amax / fp8_max;
      scales_pending_[layer] = false;
    }
    const float ks = k_scale_[layer], vs = v_scale_[layer];
    // 1) Write this step's K/V into their slots.
    for (int64_t t = 0; t < T; ++t) {
      const int64_t slot = m.slot_mapping[t];
      const int64_t block = slot / bs, off = slot % bs;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        cpu::StoreKvRow(dt, k.data<float>() + t * k.dim(1) + h * head_dim, head_dim, ks,
                        row(kc, block, h, off));
        cpu::StoreKvRow(dt, v.data<float>() + t * v.dim(1) + h * head_dim, head_dim, vs,
                        row(vc, block, h, off));
      }
    }
    // 2) Causal attention per (token, KV head); token t sees positions 0..positions[t].
    // The `group` query heads that share a KV head are handled together: each K / V row is
    // loaded (and converted from the cache dtype) once for all of them, and the dot
    // products / updates run group-wide (DotRows / AxpyRows) instead of one call per
    // (head, position).
    // With too few (token, KV head) items to keep every thread busy (decode with one or
    // two KV heads), each item takes a single query head instead.
    const int64_t group = num_heads / num_kv_heads;
    const int64_t per_item = T * num_kv_heads >= 2 * ThreadPool::Global().num_threads() ? group : 1;
    const int64_t items_per_token = num_heads / per_item;
    ThreadPool::Global().ParallelFor(T * items_per_token, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> scores, kbuf, acc;
      thread_local std::vector<double> denom;
      kbuf.resize(head_dim);
      acc.resize(per_item * head_dim);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t t = item / items_per_token;
        const int64_t h0 = (item % items_per_token) * per_item;  // first query head
        const int64_t kvh = h0 / group;
        const int32_t s = token_seq_[t];
        const int32_t* table =
            m.block_tables.data() + static_cast<int64_t>(s) * m.max_blocks_per_seq;
        const int64_t len = m.positions[t] + 1;
        // q rows [per_item, head_dim] of heads h0 .. h0 + per_item - 1.
        const float* qg = q.data<float>() + t * q.dim(1) + h0 * head_dim;
        scores.resize(len * per_item);  // [len, per_item]
        for (int64_t j = 0; j < len; ++j) {
          const uint8_t* kr = row(kc, table[j / bs], kvh, j % bs);
          const float* kf = reinterpret_cast<const float*>(kr);
          if (dt != DType::kF32) {
            cpu::LoadKvRow(dt, kr, head_dim, ks, kbuf.data());
            kf = kbuf.data();
          }
          cpu::DotRows(qg, per_item, kf, head_dim, scale, scores.data() + j * per_item);
        }
        denom.assign(per_item, 0.0);
        for (int64_t g = 0; g < per_item; ++g) {
          float max_score = -std::numeric_limits<float>::infinity();
          for (int64_t j = 0; j < len; ++j)
            max_score = std::max(max_score, scores[j * per_item + g]);
          for (int64_t j = 0; j < len; ++j) {
            float& sc = scores[j * per_item + g];
            sc = std::exp(sc - max_score);
            denom[g] += sc;
          }
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < len; ++j) {
          const uint8_t* vr = row(vc, table[j / bs], kvh, j % bs);
          const float* vf = reinterpret_cast<const float*>(vr);
          if (dt != DType::kF32) {
            cpu::LoadKvRow(dt, vr, head_dim, vs, kbuf.data());
            vf = kbuf.data();
          }
          cpu::AxpyRows(scores.data() + j * per_item, 1, vf, per_item, head_dim, acc.data());
        }
        for (int64_t g = 0; g < per_item; ++g) {
          float* o = out.data<float>() + t * out.dim(1) + (h0 + g) * head_dim;
          const float inv = static_cast<float>(1.0 / denom[g]);
          for (int64_t d = 0; d < head_dim; ++d) o[d] = acc[g * head_dim + d] * inv;
        }
      }
    });
  }

  void SiluMul(const Tensor& gate, const Tensor& up, Tensor& out) override {
    cpu::SiluMul(gate.data<float>(), up.data<float>(), gate.dim(0), gate.dim(1),
                 out.data<float>());
  }

  void SiluMulPacked(const Tensor& gate_up, Tensor& out) override {
    assert(gate_up.dim(0) == out.dim(0) && gate_up.dim(1) == 2 * out.dim(1));
    cpu::SiluMulPacked(gate_up.data<float>(), out.dim(0), out.dim(1), out.data<float>());
  }

  void SplitColumns(const Tensor& x, absl::Span<Tensor* const> outs) override {
    std::vector<int64_t> cols;
    std::vector<float*> ptrs;
    int64_t width = 0;
    for (Tensor* o : outs) {
      assert(o->dim(0) == x.dim(0));
      cols.push_back(o->dim(1));
      ptrs.push_back(o->data<float>());
      width += o->dim(1);
    }
    assert(width == x.dim(1));
    (void)width;
    cpu::SplitColumns(x.data<float>(), x.dim(0), cols.data(), ptrs.data(),
                      static_cast<int64_t>(outs.size()));
  }

  void Add(Tensor& x, const Tensor& y) override {
    float* a = x.data<float>();
    const float* b = y.data<float>();
    for (int64_t i = 0; i < x.numel(); ++i) a[i] += b[i];
  }

  void GatherRows(const Tensor& src, const std::vector<int32_t>& rows, Tensor& out) override {
    const int64_t cols = src.dim(1);
    for (size_t i = 0; i < rows.size(); ++i) {
      std::copy(src.data<float>() + rows[i] * cols, src.data<float>() + (rows[i] + 1) * cols,
                out.data<float>() + i * cols);
    }
  }

 private:
  KvCacheSpec spec_;
  std::vector<Tensor> k_cache_, v_cache_;  // per layer: [blocks, kv_heads, block_size, D]
  std::vector<float> k_scale_, v_scale_;   // [layers] fp8 KV scales (value = code * scale)
  std::vector<bool> scales_pending_;       // [layers] compute scales at the next step
  const StepMetadata* meta_ = nullptr;
  std::vector<int32_t> token_seq_;  // [T] sequence index of each token
  std::vector<float> inv_freq_;
  int64_t rope_head_dim_ = 0;
  RopeConfig rope_;  // the config inv_freq_ was computed for
};

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend() { return std::make_unique<CpuBackend>(); }

}  // namespace qshard
