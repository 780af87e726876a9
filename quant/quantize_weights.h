// File: quantize_weights.h
// Round-to-nearest weight quantization and the packers that write the quantized weights in
// the checkpoint layouts the readers understand (gptq_format.h, awq_format.h,
// compressed_tensors.h). Used by the offline quantizer (GPTQ / AWQ produce an
// IntQuantMatrix, these pack it) and by the dummy benchmark weights.
//
//   IntQuantMatrix m = QuantizeRtn(w, N, K, {.bits = 4, .group_size = 128, .sym = true});
//   QSHARD_ASSIGN_OR_RETURN(LinearWeights lw, PackGptq(m, "model.layers.0.mlp.up_proj",
//                                                      /*sym=*/true, /*v1=*/true));
//   for (auto& [name, t] : CheckpointTensors(lw)) writer.Add(name, t);
//
// Shapes: K = in_features, N = out_features, G = groups along K. Weights are fp32 [N, K]
// row-major (the nn.Linear layout). Every tensor produced is host memory owned by itself.
//
// The integer quantizer follows GPTQ's min/max conventions (AutoGPTQ quantizer.py, see
// docs/reference/quant-formats-and-anchors.md sec. D), for every group of one row:
//   xmin = min(min(x), 0), xmax = max(max(x), 0)          (the range always includes 0)
//   sym:  xmax = max(-xmin, xmax), xmin = -xmax, zero = (maxq + 1) / 2
//   both zero: xmin = -1, xmax = 1
//   scale = (xmax - xmin) / maxq, rounded to f16 (the checkpoints store f16 scales, so the
//           codes are chosen against the scale the reader will see)
//   asym: zero = clamp(round(-xmin / scale), 0, maxq)
//   code = clamp(round(x / scale) + zero, 0, maxq), round half to even.
// AutoAWQ's own quantizer does not force 0 into the range; with weights of both signs in
// every group (the normal case) the two agree.
//
// Threading: the functions here use ThreadPool::Global(); do not call them from inside a
// ParallelFor on that pool.
#ifndef QSHARD_QUANT_QUANTIZE_WEIGHTS_H_
#define QSHARD_QUANT_QUANTIZE_WEIGHTS_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/int_quant_matrix.h"
#include "quant/linear_weights.h"
#include "runtime/base/tensor.h"

namespace qshard {

struct IntQuantParams {
  int bits = 4;              // 2..8 (the packers accept 4 and 8)
  int64_t group_size = 128;  // -1: one group spans all of K
  bool sym = true;
};

// Scale and zero (code units) of one group.
struct GroupScaleZero {
  float scale = 1.0f;  // f16-representable, > 0
  float zero = 0.0f;   // integer in [0, maxq]
};

// The quantizer parameters of x[0..n) (one row's group). clip > 0 limits |x| first (AWQ
// clipping: values are clamped to [-clip, clip] before the min/max); inf = no clip.
GroupScaleZero ComputeScaleZero(const float* x, int64_t n, int bits, bool sym,
                                float clip = std::numeric_limits<float>::infinity());

// clamp(round(x / scale) + zero, 0, maxq), round half to even; NaN maps to 0.
// Written with comparisons and the 1.5 * 2^23 rounding trick (exact for |v| < 2^22, and v is
// limited to +-512 first: codes and zeros are < 256) instead of libm calls, so that loops
// over it vectorize; the result equals std::nearbyint in the default rounding mode.
inline int QuantizeCode(float x, float scale, float zero, int maxq) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  float v = x / scale;
  v = v < -512.0f ? -512.0f : (v > 512.0f ? 512.0f : v);
  float q = ((v + kRound) - kRound) + zero;
  const float fmaxq = static_cast<float>(maxq);
  q = !(q >= 0.0f) ? 0.0f : (q > fmaxq ? fmaxq : q);
  return static_cast<int>(q);
}

// x clamped to [-c, c] (c = inf: unchanged; NaN stays NaN).
inline float ClampAbs(float x, float c) { return x < -c ? -c : (x > c ? c : x); }

// Number of groups along K for a group size (-1 or >= K: one group).
int64_t NumGroups(int64_t K, int64_t group_size);

// Round-to-nearest of w [N, K] into codes [N, K], scales / zeros [G, N], g_idx[k] =
// k / group_size. clip: optional [N, G] per-group |w| limits (AWQ clipping). p.bits must be
// in [2, 8] and p.group_size -1 or > 0 (the caller validates its options).
IntQuantMatrix QuantizeRtn(const float* w, int64_t N, int64_t K, const IntQuantParams& p,
                           const float* clip = nullptr);

// The weights m represents, fp32 [N, K].
std::vector<float> Dequantize(const IntQuantMatrix& m);

// AutoGPTQ layout (format kGptq): qweight i32 [K*bits/32, N], qzeros i32 [G, N*bits/32]
// (zero - 1 when v1, the checkpoint_format "gptq"; the zero itself for "gptq_v2"), scales
// f16 [G, N], g_idx i32 [K] (always written; non-monotone after act-order). group_size is
// recovered from g_idx as the largest group's size (-1 when G = 1). Errors (InvalidArgument,
// naming the layer): bits not 4 / 8, K or N not divisible by 32/bits, inconsistent sizes,
// codes or zeros out of range, sym with a zero other than 2^(bits-1), v1 with an asymmetric
// zero of 0 (v1 stores -1, which other runtimes misread: use gptq_v2), scales that overflow
// f16.
absl::StatusOr<LinearWeights> PackGptq(const IntQuantMatrix& m, const std::string& name, bool sym,
                                       bool v1);

// AutoAWQ GEMM layout (format kAwq): qweight i32 [K, N/8] and qzeros i32 [G, N/8] with the
// interleaved nibble order kAwqOrder, scales f16 [G, N]. 4-bit only; N divisible by 8;
// g_idx must be the default k / group_size (AWQ checkpoints have no g_idx).
absl::StatusOr<LinearWeights> PackAwq(const IntQuantMatrix& m, const std::string& name);

// compressed-tensors float-quantized, per channel: weight e4m3fn [N, K], weight_scale f32
// [N, 1] = amax(row) / 448 (at least FLT_EPSILON, as llm-compressor clamps, so rows of zeros
// get a tiny positive scale); act_quant kFp8PerToken when dynamic_act.
LinearWeights QuantizeFp8PerChannel(const float* w, int64_t N, int64_t K, const std::string& name,
                                    bool dynamic_act);

// The same layout from e4m3 codes chosen elsewhere (GPTQ on the fp8 grid, gptq.h): m.codes
// are e4m3 bytes [N, K], m.scales [1, N] the per-row scales.
absl::StatusOr<LinearWeights> PackFp8PerChannel(const IntQuantMatrix& m, const std::string& name,
                                                bool dynamic_act);

// compressed-tensors int-quantized W8A8: weight int8 [N, K] = clamp(round(w / s), -127, 127),
// weight_scale f32 [N, 1] = s = amax(row) / 127 (at least FLT_EPSILON); act_quant
// kInt8PerToken when dynamic_act.
LinearWeights QuantizeInt8PerChannel(const float* w, int64_t N, int64_t K, const std::string& name,
                                     bool dynamic_act);

// The tensors of w under their checkpoint names (w.name + suffix), skipping empty ones:
//   kGptq: .qweight .qzeros .scales .g_idx    kAwq: .qweight .qzeros .scales
//   kPacked: .weight_packed .weight_scale .weight_zero_point .weight_g_idx
//   kFp8 / kInt8: .weight .weight_scale (.input_scale)    kDense: .weight
// plus .bias when present.
std::vector<std::pair<std::string, Tensor>> CheckpointTensors(const LinearWeights& w);

}  // namespace qshard

#endif  // QSHARD_QUANT_QUANTIZE_WEIGHTS_H_
