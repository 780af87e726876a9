// File: quant_linear.h
// Quantized linear layers on the CPU: fused dequantize-and-multiply, no dequantized copy of
// the weights is kept (resident memory stays near the checkpoint's packed size).
//
// Integer formats (GPTQ 4/8-bit, AWQ 4-bit, compressed-tensors pack-quantized and int8) are
// repacked at load into one output-feature-major layout: per output feature, the codes of
// all inputs (4-bit: 16 bytes per 32 inputs, low nibbles = inputs 0..15 of the block, high
// nibbles = 16..31; 8-bit: one byte each) in "chunks" of <= 128 inputs that share one
// scale and zero. act-order (desc_act) checkpoints are permuted at load so every group is
// contiguous; the activations are gathered through the same permutation at run time.
// FP8 weights are used in place from the checkpoint ([N, K] e4m3 bytes).
//
// Decode (<= 4 rows) quantizes each activation chunk to int16 with its own scale (relative
// error ~1.5e-5 of the chunk's largest value) and multiplies codes with AVX2 pmaddwd or
// AVX-512 VNNI vpdpwssd; int8 W8A8 activations are exact int8 codes (vpdpbusd on AVX-512
// VNNI). Prefill (> 4 rows) runs the packed fp32 GEMM of gemm.h, which dequantizes each
// block of W into fp32 panels once per call. The scalar fallback is exact fp32 for every m.
// The ISA is chosen at run time (isa.h; QSHARD_CPU_ISA caps it); kernel names end in the
// ISA in use ("-avx512", "-avx2", "-scalar").
//
//   auto op = cpu::PrepareQuantLinear(weights);           // weights.format != kDense
//   static_cast<const cpu::CpuQuantLinear&>(**op).Run(x, m, y);
#ifndef QSHARD_RUNTIME_BACKEND_CPU_QUANT_LINEAR_H_
#define QSHARD_RUNTIME_BACKEND_CPU_QUANT_LINEAR_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "quant/linear_weights.h"
#include "runtime/backend/backend.h"

namespace qshard::cpu {

// A LinearOp the CPU backend runs by calling Run.
class CpuQuantLinear : public LinearOp {
 public:
  // y[m, N] = x[m, K] . W^T (+ bias), with the layer's activation quantization applied to
  // x first (W8A8 formats). x and y are fp32 row-major.
  virtual void Run(const float* x, int64_t m, float* y) const = 0;
};

// Whether PrepareQuantLinear handles the format (everything but kDense).
bool IsQuantFormat(WeightFormat f);

// Validates and repacks w. Errors name the layer and tensor.
absl::StatusOr<std::unique_ptr<LinearOp>> PrepareQuantLinear(const LinearWeights& w);

}  // namespace qshard::cpu

#endif  // QSHARD_RUNTIME_BACKEND_CPU_QUANT_LINEAR_H_
