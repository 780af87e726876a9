// File: int_weight_gemm.h
// Integer-weight GEMM (GPTQ / AWQ / compressed-tensors pack-quantized, 4- and 8-bit) on
// tensor cores, in the style of Marlin: the weights stay packed in device memory and are
// dequantized to bf16 inside the multiply loop, so a decode step streams ~bits/16 of the
// bytes a bf16 GEMM would.
//
//   y[m, n] = sum_k x[m, k] * W[n, k],   W[n, k] = scale[g(k), n] * (code[n, k] - zero[g(k), n])
//
// x: bf16 row-major [M, K] (device); y: row-major [M, N] in bf16 or fp32 (device).
//
// Design (details and the fragment layouts in int_weight_gemm.cu):
//   - Load time (host, PackIntWeights below): inputs are sorted by group (a stable sort of
//     g_idx; the identity for ordinary checkpoints, a real permutation perm[K] for
//     act-order / desc_act ones) so every group is a contiguous run of k; the codes are then
//     rearranged so that each thread of the kernel finds the codes of its mma.sync B
//     fragments for one 64-deep K tile as one (4-bit) or two (8-bit) 16-byte vectors, and
//     the whole 64 x 128 (K x N) tile is one contiguous 4 KiB (4-bit) / 8 KiB (8-bit) block.
//     Per group and column 8 bytes of scale / zero data (see PackedIntWeights::scale_zero).
//   - Run time: (act-order only) a small kernel gathers x's columns through perm into a
//     scratch buffer; then one kernel: a multi-stage cp.async pipeline of (x tile, code
//     tile, scale rows); dequantization in registers right before the MMAs (4-bit: one LOP3
//     turns two codes into bf16x2 128 + q, then bf16x2 sub / fma with the scale; 8-bit: PRMT
//     into the fp32 2^23 + q trick, fp32 fma, cvt to bf16x2); mma.sync.m16n8k16 bf16 with
//     fp32 accumulators. M <= 16 uses 16 x 128 block tiles (5 stages, 3-4 blocks per SM),
//     M 17..64 64 x 128 (4 stages: the codes are streamed and dequantized once for all
//     rows), larger M 128 x 128 block tiles (3 stages). When the output tiles alone give fewer
//     than ~8 blocks per SM, K is split over blocks: each split stores its fp32 partial
//     tile into its own slice of a shared workspace, and the last block of each output
//     tile (a per-tile arrival counter) sums the slices in split order (deterministic)
//     into y, so the steady state needs no memset and no second kernel.
//
// Requirements (Create returns InvalidArgument otherwise): bits 4 or 8; K a multiple of 64
// (the K tile); after sorting by group, every aligned run of 16 inputs lies in one group
// (true for any group size that is a multiple of 16, with or without act-order, and for
// one group over all of K). N is padded internally to a multiple of 128 (padded columns
// have zero scale and are never written).
//
// Accuracy: each weight is the fp32-accurate value scale * (code - zero) rounded once to
// bf16 (relative error <= 2^-9; 4-bit: computed as s_hi*t + (s_lo*t + c) in bf16x2 fmas
// with the exact t = code - round(zero), see PackedIntWeights::scale_zero; 8-bit: one fp32
// fma). x is bf16 as given; products are exact in fp32 and accumulated in fp32 (order
// differs from any CPU loop; split K adds the partial sums in split order, so two runs give
// the same bits). Against a float64 reference the error is dominated by the weight
// rounding: ~2^-9/sqrt(3) relative per term with random signs, i.e. normwise
// ~1e-3..2.5e-3 of ||y|| (measured on H100); tests use 1e-2 normwise and 3e-2 of the row
// RMS elementwise. bf16 output adds one more rounding (2^-9 relative). The factored-scale
// paths (SetIntGemmFactoredScales, SetIntGemv4) round no weight: their tests use 1e-4.
//
// Measured on one H100 (SXM, 132 SMs; bench test BenchLlama8BShapes, g128, bf16 out):
// decode M = 1 streams the packed weights at ~1.3 TB/s (4-bit) and ~1.7-1.9 TB/s (8-bit)
// on the Llama-3.1-8B shapes (6144/4096/28672 x 4096, 4096 x 14336); M = 2048 runs at
// ~200-230 TFLOP/s. The 4-bit decode path is issue-bound (integer LOP3/SHF at half rate
// plus per-tile overhead), below the 2 TB/s goal.
//
//   QSHARD_ASSIGN_OR_RETURN(auto gemm, cuda::IntWeightGemm::Create(matrix, stream));
//   QSHARD_RETURN_IF_ERROR(gemm->Run(x, m, y, DType::kBF16, stream));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_INT_WEIGHT_GEMM_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_INT_WEIGHT_GEMM_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "quant/int_quant_matrix.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"

namespace qshard::cuda {

// Tile sizes shared by the host repack and the kernel.
inline constexpr int kIntGemmTileK = 64;   // K tile: 4 mma k16 steps
inline constexpr int kIntGemmTileN = 128;  // N tile: 8 "slabs" of 16 output columns
inline constexpr int kIntGemmSlabN = 16;   // columns per slab (two mma n8 tiles)

// The host-side kernel layout of one IntQuantMatrix (built by PackIntWeights, uploaded by
// IntWeightGemm::Create; exposed for the host-only repack test).
struct PackedIntWeights {
  int bits = 4;
  int64_t k = 0;         // in_features
  int64_t n = 0;         // out_features
  int64_t n_padded = 0;  // n rounded up to kIntGemmTileN
  int64_t num_groups = 0;
  // Uniform group size (rows of k per group) when there is one, -1 for one group over all
  // of K, 0 when group sizes vary. Only used for kernel_name().
  int64_t group_size = 0;
  bool act_order = false;  // perm is not the identity
  // Codes in the kernel layout (see PackedCodeIndex): n_padded * k * bits / 32 words.
  std::vector<uint32_t> codes;
  // [num_groups, n_padded, 2] 32-bit words per group and output column:
  //   8-bit: fp32 scale, fp32 -scale * zero.
  //   4-bit: four bf16 for the packed bf16x2 arithmetic, with z_int = clamp(round(zero),
  //   0, 15): word 0 = {s_hi = bf16(scale) (low half), s_lo = bf16(scale - s_hi)},
  //   word 1 = {c = bf16(-scale * (zero - z_int)) (low half), bf16(128 + z_int)}.
  //   The kernel computes w = s_hi*t + (s_lo*t + c), t = (128 + code) - (128 + z_int)
  //   (exact), each step one bf16 fma, so w is the fp32-accurate dequantized weight
  //   rounded once to bf16 (plus a ~2^-9 |c| term, 0 for integer zero points).
  std::vector<uint32_t> scale_zero;
  // 4-bit and every zero point an integer in 0..15 (c = 0 above: GPTQ, AWQ and symmetric
  // checkpoints), which the factored-scale decode path needs (SetIntGemmFactoredScales).
  bool integer_zero_points = false;
  // [k / 16]: for each run of 16 sorted inputs, (group << 2) | slot, where slot (0..3) is
  // the first k16 step of the same K tile that has the same group (the kernel loads that
  // group's scale row once per tile and lets the later steps share it).
  std::vector<int32_t> kblock_info;
  // [k]: sorted position p holds input perm[p] (identity unless act_order).
  std::vector<int32_t> perm;
};

// Repacks `m` (validated as above). Pure host code, no GPU needed.
absl::StatusOr<PackedIntWeights> PackIntWeights(const IntQuantMatrix& m);

// Where the code of output column n and sorted input position p lives in
// PackedIntWeights::codes: word index and bit shift (the code is bits wide).
struct PackedCodeIndex {
  int64_t word;
  int shift;
};
PackedCodeIndex PackedCodeLocation(int64_t n, int64_t p, int64_t k, int bits);
// The code stored for (n, sorted position p); the inverse of the repack (for tests).
uint32_t PackedCodeAt(const PackedIntWeights& packed, int64_t n, int64_t p);

// The K split of the 4-bit decode GEMV (SetIntGemv4), pure host code: K tiles per split
// for a matrix of n_tiles N tiles whose k16 steps (sorted inputs) belong to step_groups
// (size k / 16), aiming at blocks_per_sm blocks per SM on `sms` SMs, with at most
// kIntGemv4MaxTiles K tiles (the staged x) and kIntGemv4GroupRows groups (the staged scale
// rows) in any split's range. Every split but the last has exactly that many tiles.
inline constexpr int kIntGemv4MaxTiles = 16;
inline constexpr int kIntGemv4GroupRows = 16;
int64_t PlanIntGemv4TilesPerSplit(const std::vector<int32_t>& step_groups, int64_t n_tiles, int sms,
                                  int blocks_per_sm);

// The blocks per SM the K split aims for when the output tiles alone are fewer (default 8;
// process-wide, for benchmark sweeps).
void SetIntGemmBlocksPerSm(int blocks);
int IntGemmBlocksPerSm();

// Factored-scale decode path (process-wide; QSHARD_CUDA_INT_FACTORED=1 turns it on at start,
// off by default until a GPU run has measured it): for 4-bit weights with integer zero
// points and M <= 64, the MMAs take the exact integers t = code - zero as their B operand
// and each group's fp32 sum is multiplied by the group's scale once per output, instead of
// every weight being dequantized to bf16 (scale * t) in the loop. Half the dequantization
// instructions of the default path (LOP3 + one bf16x2 subtraction per two codes instead of
// LOP3 + subtraction + two bf16x2 FMAs), and more accurate: no per-weight bf16 rounding,
// so the result is the fp32-accumulated exact product of x and the fp32 dequantized W.
void SetIntGemmFactoredScales(bool on);
bool IntGemmFactoredScalesEnabled();

// Decode GEMV path (process-wide; QSHARD_CUDA_INT_GEMV=1 turns it on at start, off by
// default until a GPU run has measured it): for 4-bit weights with integer zero points and
// M <= 16, a kernel without the GEMM's shared-memory pipeline: each warp streams its 16
// output columns' packed codes straight from global memory into registers (8 K tiles in
// flight per lane; the packed layout makes them 512 contiguous bytes per warp and tile),
// with x, the group ids and the scale rows of the block's K range staged once; arithmetic
// of the factored-scale path. Takes precedence over it where both apply.
void SetIntGemv4(bool on);
bool IntGemv4Enabled();

class IntWeightGemm {
 public:
  // Validates and repacks `m` on the host, uploads it synchronously on `stream`.
  static absl::StatusOr<std::unique_ptr<IntWeightGemm>> Create(const IntQuantMatrix& m,
                                                               cudaStream_t stream);
  ~IntWeightGemm() = default;
  IntWeightGemm(const IntWeightGemm&) = delete;
  IntWeightGemm& operator=(const IntWeightGemm&) = delete;

  // y[m, N] = x[m, K] . W^T. x: bf16 [m, K] (16-byte aligned), y: [m, N] in y_dtype
  // (kBF16 or kF32), both device, row-major, dense, not overlapping. Any m >= 1.
  // Enqueued on `stream` without host synchronization. Scratch (the act-order gather, and
  // the split-K partials in the pool the quantized linears share) grows on the first calls
  // that need more and is then reused, so quantized linears must not run concurrently on
  // different streams.
  absl::Status Run(const void* x, int64_t m, void* y, DType y_dtype, cudaStream_t stream);

  // Whether Run(x, m, ...) takes the factored-scale GEMM path (SetIntGemmFactoredScales) or
  // the decode GEMV (SetIntGemv4; this one wins where both apply).
  bool UsesFactoredScales(int64_t m) const;
  bool UsesGemv4(int64_t m) const;

  int64_t weight_bytes() const;     // device bytes of codes + scales/zeros + tables + perm
  std::string kernel_name() const;  // e.g. "cuda-marlin-w4-g128", "cuda-marlin-w4-g128-actorder"
  int64_t in_features() const { return k_; }
  int64_t out_features() const { return n_; }

 private:
  IntWeightGemm() = default;
  absl::Status EnsureScratch(DeviceBuffer& buf, size_t bytes, cudaStream_t stream);
  absl::Status RunGemv4(const void* x, int64_t m, void* y, DType y_dtype, cudaStream_t stream);
  // K tiles per split of the GEMV for the current IntGemmBlocksPerSm() (cached).
  int64_t Gemv4TilesPerSplit();

  int bits_ = 4;
  int64_t k_ = 0;
  int64_t n_ = 0;
  int64_t n_padded_ = 0;
  int64_t group_size_ = 0;
  bool act_order_ = false;
  bool integer_zero_points_ = false;
  std::vector<int32_t> step_groups_;  // group of each k16 step (sorted inputs), host copy
  int gemv_plan_bps_ = -1;            // IntGemmBlocksPerSm() the cached GEMV plan is for
  int64_t gemv_tiles_per_split_ = 0;
  int multiprocessors_ = 0;
  DeviceBuffer codes_;
  DeviceBuffer scale_zero_;
  DeviceBuffer kblock_info_;
  DeviceBuffer perm_;
  DeviceBuffer gather_;  // act-order: x with columns permuted, bf16 [m, K]
};

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_INT_WEIGHT_GEMM_H_
