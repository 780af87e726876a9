// File: gemm.h
// The prefill-sized (many rows) fp32 GEMM shared by every CPU linear format:
//
//   y[m, n] = x[m, k] . W[n, k]^T (+ bias[n])
//
// The weight side is abstracted as a WeightPanelSource that produces fp32 values of any
// block of W (dense bf16/f16/f32 converted, quantized formats dequantized). The driver
// converts each block of W exactly once per call: it packs kNr output features x kGemmKBlock
// inputs into a k-major panel ([kc][kNr] fp32, cache resident) and runs a register-blocked
// FMA microkernel over every row of x against it (AVX2: 6 rows x 16 features in 12 ymm
// accumulators; AVX-512: 12 rows x 32 features in 24 zmm accumulators). Threads split the
// output features, so each thread packs only its own part of W.
//
// Numerics: every output is an fp32 sum over k; within a block of kGemmKBlock inputs the
// products are accumulated sequentially (one FMA chain per output), the block sums are then
// added in k order, bias first. The result does not depend on the thread count.
#ifndef QSHARD_RUNTIME_BACKEND_CPU_GEMM_H_
#define QSHARD_RUNTIME_BACKEND_CPU_GEMM_H_

#include <cstdint>

namespace qshard::cpu {

// Inputs per packed block: Dequant's k0 is always a multiple of this (and k1 is k0 +
// kGemmKBlock or the end of K). A multiple of 128 so quantization groups never straddle
// two blocks unless they straddle 128-input boundaries anyway.
constexpr int64_t kGemmKBlock = 256;

class WeightPanelSource {
 public:
  virtual ~WeightPanelSource() = default;
  // out[j * ldo + (i - k0)] = W[n0 + j, i] in fp32, for j < count and i in [k0, k1).
  // Called concurrently from several threads (for disjoint n ranges).
  virtual void Dequant(int64_t n0, int64_t count, int64_t k0, int64_t k1, float* out,
                       int64_t ldo) const = 0;
};

// y (row stride ldy) = x (row stride ldx) . W^T + bias, threaded over n on the global pool.
// bias may be null. Needs ActiveIsa() >= kAvx2 (callers keep their own scalar path).
void PackedGemm(const WeightPanelSource& w, const float* x, int64_t ldx, int64_t m, int64_t k,
                int64_t n, const float* bias, float* y, int64_t ldy);

}  // namespace qshard::cpu

#endif  // QSHARD_RUNTIME_BACKEND_CPU_GEMM_H_
