// File: gptq.h
// GPTQ (Frantar et al., arXiv 2210.17323): quantizes one Linear column by column, pushing
// each column's rounding error onto the not-yet-quantized columns through the inverse
// Hessian of the layer's reconstruction loss ||W X - Q X||^2 (docs/reference/
// quant-formats-and-anchors.md sec. D).
//
//   HessianAccumulator h(K);
//   for (each calibration batch) h.Add(x, rows);                 // x [rows, K] layer inputs
//   QSHARD_ASSIGN_OR_RETURN(GptqResult r, GptqQuantize(w, N, K, h, {.bits = 4}));
//   QSHARD_ASSIGN_OR_RETURN(LinearWeights lw, PackGptq(r.q, name, /*sym=*/true, /*v1=*/true));
//
// The quantizer per group is the one of quantize_weights.h (f16-rounded scales), so the
// result packs without further rounding and the readers reproduce Dequant() exactly.
// Threading: uses ThreadPool::Global(); do not call from inside a ParallelFor on that pool.
#ifndef QSHARD_QUANT_GPTQ_H_
#define QSHARD_QUANT_GPTQ_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "quant/int_quant_matrix.h"

namespace qshard {

// Running Hessian of the inputs of a Linear: H = (2/n) sum_t x_t x_t^T, K x K in float64.
// Internally the plain sum is kept (one K x K buffer; h() rescales it in place), which is
// the same running mean without an O(K^2) rescale per Add.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t k);

  // Adds x [rows, K] fp32 (row-major). Blocked: the product of each chunk of rows is formed
  // in fp32 with SIMD tiles over the threads, then added to the fp64 sum.
  void Add(const float* x, int64_t rows);
  int64_t num_samples() const { return n_; }
  // H [K, K] row-major, symmetric. Not thread-safe against Add or a concurrent first h()
  // after an Add (it switches the buffer between the sum and the mean representation).
  const std::vector<double>& h() const;
  int64_t k() const { return k_; }

 private:
  int64_t k_;
  int64_t n_ = 0;
  mutable std::vector<double> buf_;  // sum_t x x^T, or H when is_mean_
  mutable bool is_mean_ = false;
};

// The grid GPTQ rounds each column onto.
enum class GptqGrid {
  kInteger,  // codes in [0, 2^bits) with per-group scale and zero (AutoGPTQ)
  // e4m3fn with one scale per output row, s = amax(row) / 448 of the original weights
  // (the compressed-tensors fp8 per-channel layout): GPTQ's error feedback on the fp8 grid,
  // as llm-compressor's GPTQ does for FP8 schemes. Needs group_size -1; the result's codes
  // are e4m3 bytes, scales [1, N], zeros 0, bits 8.
  kFp8E4M3,
};

struct GptqOptions {
  int bits = 4;
  int64_t group_size = 128;  // -1: one group per row
  bool sym = true;
  bool desc_act = false;       // act-order: columns by decreasing diag(H)
  bool static_groups = false;  // with desc_act: groups fixed in the original order up front
  double damp_percent = 0.01;  // lambda = damp_percent * mean(diag(H))
  int64_t block_size = 128;    // lazy-update block (columns)
  GptqGrid grid = GptqGrid::kInteger;
  // Added by this implementation:
  std::string name;               // layer name for errors and warnings
  double max_damp_percent = 1.0;  // Cholesky retries multiply the damping by 10 up to this
};

struct GptqResult {
  IntQuantMatrix q;  // codes in the original K order; g_idx non-monotone with desc_act
  double loss = 0;   // sum over weights of (w - q)^2 / U_ii^2 / 2, as the reference reports
  // Added by this implementation:
  double damp_percent = 0;  // the dampening that succeeded
  int64_t dead_inputs = 0;  // inputs with diag(H) = 0 (their weights are quantized as 0)
  std::string warning;      // non-empty when the dampening had to be increased
};

// w [N, K] fp32 row-major (not modified); H from the accumulator (K must match; h() is
// called, so this must not run concurrently with Add on the same accumulator). Errors:
// InvalidArgument for bad options or sizes, FailedPrecondition when H is empty, not finite,
// or stays indefinite up to max_damp_percent. Cost: K^3/3 fp64 FMAs for the Cholesky and
// triangular inverse plus N K^2 / 2 fp32 FMAs of updates; measured on 2 cores (AVX2):
// K = 1024, N = 384: 0.13 s; K = 5632, N = 2048: 7.4 s.
absl::StatusOr<GptqResult> GptqQuantize(const float* w, int64_t N, int64_t K,
                                        const HessianAccumulator& h, const GptqOptions& o);

namespace quant_internal {
// u = upper Cholesky factor of (h + lambda I)^-1 for the symmetric h [k, k], as fp32 [k, k]
// row-major with zeros below the diagonal (h^-1 = u^T u). Computed in fp64 as
// U = P L^-1 P with L = chol(P (h + lambda I) P), P the reversal permutation: one
// factorization and one triangular inverse instead of chol, inverse, chol. Returns false
// (u unspecified) when h + lambda I is not positive definite.
bool UpperCholeskyOfInverse(const double* h, int64_t k, double lambda, std::vector<float>* u);
}  // namespace quant_internal

}  // namespace qshard

#endif  // QSHARD_QUANT_GPTQ_H_
