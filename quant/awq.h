// File: awq.h
// AWQ (Lin et al., arXiv 2306.00978): activation-aware per-input-channel scaling and
// per-group weight clipping, searched on calibration activations; the weights are then
// quantized round-to-nearest (QuantizeRtn) with the searched clip (docs/reference/
// quant-formats-and-anchors.md sec. D).
//
//   AwqScaleResult s = AwqSearchScales({wq, wk, wv}, {nq, nk, nv}, K, x, T, o);
//   // fold: W' = W diag(s) for the consumers, the producer (norm / linear) divides by s,
//   // and the samples become x / s; then per linear:
//   std::vector<float> clip = AwqSearchClip(w_scaled, N, K, x_scaled, T, o);
//   IntQuantMatrix q = QuantizeRtn(w_scaled, N, K, {o.bits, o.group_size, !o.zero_point},
//                                  clip.data());
//
// Both searches measure the output error through the second moment of the inputs,
//   mean_t (x_t . d)^2 = d^T (X^T X / T) d,   d = Q(w) - w,
// which is exact and cheaper than recomputing X Q^T for every grid point when K <= T
// (otherwise the outputs are computed directly). The quantizer is the one of
// quantize_weights.h (ranges include 0, f16-rounded scales), the same that QuantizeRtn
// applies afterwards. Threading: uses ThreadPool::Global(); do not call from inside a
// ParallelFor on that pool.
#ifndef QSHARD_QUANT_AWQ_H_
#define QSHARD_QUANT_AWQ_H_

#include <cstdint>
#include <vector>

namespace qshard {

struct AwqOptions {
  int bits = 4;
  int64_t group_size = 128;   // -1: one group per row
  bool zero_point = true;     // asymmetric (false: symmetric, zero 2^(bits-1))
  int grid = 20;              // scale search: ratios 0, 1/grid, ..., (grid-1)/grid
  bool duo_scaling = false;   // AutoAWQ: s = s_x^r / (s_w^(1-r) + 1e-4)
  int64_t clip_tokens = 512;  // clip search: rows of x used (evenly sampled)
  double max_shrink = 0.5;    // clip search: max |w| shrunk down to (1 - max_shrink)
  int clip_grid = 20;         // clip search: shrink steps of 1/clip_grid
};

struct AwqScaleResult {
  std::vector<float> scales;  // [K], multiply W's columns, divide the inputs
  double loss = 0;            // mean squared output error with the best scales
  double ratio = 0;           // the best ratio
  double loss_unscaled = 0;   // the same error without scaling (plain RTN)
};

// Linears sharing one input: ws[i] [ns[i], K] fp32 row-major; x [T, K] calibration inputs.
// For ratio r on the grid: s = s_x^r (s_x = mean_t |x|, per input channel; duo_scaling
// divides by s_w^(1-r) + 1e-4 with s_w the mean group-normalized |W|), clamped >= 1e-4 and
// divided by sqrt(max(s) min(s)); loss = mean over the T x sum(ns) outputs of
// (x W^T - (x / s) Q(W diag(s))^T)^2. Returns the best s (all ones when ratio 0 wins
// without duo_scaling; ties keep the smaller ratio) and its loss. T = 0 or an empty grid:
// ones, loss 0.
AwqScaleResult AwqSearchScales(const std::vector<const float*>& ws, const std::vector<int64_t>& ns,
                               int64_t K, const float* x, int64_t T, const AwqOptions& o);

// Clip search for one (already scaled) linear w [N, K] with inputs x [T, K]: per (row n,
// group g) the limit m = max|w[n, g]| * (1 - i / clip_grid), i = 0 .. max_shrink*clip_grid
// - 1, minimizing the group's own output error mean_t (x_t[g] . (Q(clamp(w[n, g], -m, m)) -
// w[n, g]))^2 over up to clip_tokens evenly sampled rows of x (i = 0, no clipping, wins
// ties). Returns clip [N, G] for QuantizeRtn.
std::vector<float> AwqSearchClip(const float* w, int64_t N, int64_t K, const float* x, int64_t T,
                                 const AwqOptions& o);

}  // namespace qshard

#endif  // QSHARD_QUANT_AWQ_H_
