// Integer-weight GEMM kernel (Marlin-style): y[M, N] = x[M, K] . W^T with W dequantized from
// 4- or 8-bit codes inside the multiply loop. See int_weight_gemm.h for the interface and
// the accuracy argument; int_weight_pack.cc builds the layout described here.
//
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 fragment layouts (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"); lane = 0..31, gid = lane / 4
// (groupID), tig = lane % 4 (threadID_in_group); each .b32 register holds two bf16, the
// lower-indexed element in the low 16 bits:
//   A (16 x 16, M x K, row-major), a0..a3:
//     a0: (row gid,     k 2*tig, 2*tig+1)     a1: (row gid + 8, k 2*tig, 2*tig+1)
//     a2: (row gid,     k 2*tig+8, 2*tig+9)   a3: (row gid + 8, k 2*tig+8, 2*tig+9)
//   B (16 x 8, K x N, "col"), b0..b1:
//     b0: (k 2*tig, 2*tig+1;   col gid)       b1: (k 2*tig+8, 2*tig+9; col gid)
//   C/D (16 x 8, fp32), c0..c3:
//     c0, c1: (row gid,     col 2*tig, 2*tig+1)
//     c2, c3: (row gid + 8, col 2*tig, 2*tig+1)
// A comes from shared memory through ldmatrix.x4: lanes 8i..8i+7 give the row addresses of
// 8x8 matrix i, and register i receives matrix i with thread t holding row t/4, columns
// 2(t%4), 2(t%4)+1 -- exactly the A fragment when matrices 0..3 are (rows 0-7, k 0-7),
// (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15).
//
// Packed code layout (one 64 x 128 K x N tile is one contiguous block, tiles ordered
// [N tile][K tile]): inside a tile, 8 slabs of 16 output columns; inside a slab, 32 lanes x
// `bits` 32-bit words (16 or 32 bytes per lane, read as uint4). Lane l of a slab owns the
// 32 codes it needs as B fragments for the slab's two n8 tiles (jj = 0, 1) and the tile's
// four k16 steps (s = 0..3), elements e = 0..3 = (b0.lo, b0.hi, b1.lo, b1.hi) at column
// gid = l / 4 and rows 2*tig + {0, 1, 8, 9}:
//   4-bit: word s, nibble (jj*2 + e/2) + 4*(e%2)  (the two halves of one bf16x2 register
//          are 16 bits apart, so one LOP3 converts both)
//   8-bit: word s*2 + jj, byte e
// (PackedCodeLocation in int_weight_pack.cc is the one definition the host side uses.)
//
// Block: 256 threads = kWarpsM x kWarpsN warps; a warp computes (kMT*16) x (kNT*8) of the
// output, i.e. kNT/2 slabs. Per K tile a stage holds: the x tile (BM x 64 bf16, 16-byte
// chunks XOR-swizzled by row so ldmatrix is conflict-free), the code tile, up to four
// scale rows (one per distinct group among the tile's four k16 steps; 128 x 8 bytes) and
// the four k16 steps' scale-row slots. cp.async.cg (L2 only: each code byte is used by one
// block) fills kStages stages; one __syncthreads per K tile.
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/fp8_linear.h"  // the quantized linears' shared scratch pool
#include "runtime/backend/cuda/int_weight_gemm.h"
#include "runtime/backend/cuda/pdl.cuh"
#include "runtime/base/status_macros.h"

namespace qshard::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
// K tiles of its range a block pulls toward L2 before the previous kernel has finished.
constexpr int kPrefetchTiles = 16;
constexpr int kTileK = kIntGemmTileK;
constexpr int kTileN = kIntGemmTileN;
static_assert(kTileK == 64 && kTileN == 128, "the kernel's index math assumes 64 x 128 tiles");

template <int kBits, int kWarpsM, int kMT, int kStages>
struct TileConfig {
  static constexpr int kBM = kWarpsM * kMT * 16;
  static constexpr int kABytes = kBM * kTileK * 2;             // bf16 x tile
  static constexpr int kBBytes = kTileN * kTileK * kBits / 8;  // code tile
  static constexpr int kSBytes = 4 * kTileN * 8;               // 4 rows of 8-byte entries
  static constexpr int kSlotBytes = 16;                        // 4 int slots
  static constexpr int kStageBytes = kABytes + kBBytes + kSBytes + kSlotBytes;
  static constexpr int kSmemBytes = kStageBytes * kStages;
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; with pred false the destination is zero-filled and
// nothing is read (src-size 0).
__device__ __forceinline__ void CpAsync16(uint32_t smem_addr, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem))
               : "memory");
}

__device__ __forceinline__ void MmaBf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two bf16 (round to nearest even), `lo` in the low half.
__device__ __forceinline__ uint32_t PackBf16x2(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

__device__ __forceinline__ __nv_bfloat162 AsBf162(uint32_t u) {
  __nv_bfloat162 h;
  memcpy(&h, &u, sizeof(u));
  return h;
}
__device__ __forceinline__ uint32_t AsU32(__nv_bfloat162 h) {
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// (a & b) | c in one LOP3 (the compiler splits it in two when b and c are both immediates).
__device__ __forceinline__ uint32_t Lop3AndOr(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// 4-bit: the lane's word for this k16 step holds, for n8 tile jj, pair pi = jj*2 + h
// (h = 0: b0, h = 1: b1) at nibbles pi (low element) and pi + 4 (high element). OR-ing a
// code into the mantissa of bf16 128.0 (0x4300; ulp 1 at 128) gives 128 + code exactly, for
// both halves in one LOP3. Then, all in bf16x2 with one rounding each (int_weight_gemm.h):
//   t = (128 + q) - (128 + z_int)                  exact small integer
//   w = s_hi * t + (s_lo * t + c)                  ~ scale * (q - zero), rounded once
// sz.x = {s_hi, s_lo}, sz.y = {c, 128 + z_int} (low half first).
__device__ __forceinline__ void Dequant4(uint32_t word, int jj, uint2 sz, uint32_t& b0,
                                         uint32_t& b1) {
  const __nv_bfloat162 s2 = AsBf162(sz.x);
  const __nv_bfloat162 cz = AsBf162(sz.y);
  const __nv_bfloat162 s_hi = __low2bfloat162(s2);
  const __nv_bfloat162 s_lo = __high2bfloat162(s2);
  const __nv_bfloat162 c = __low2bfloat162(cz);
  const __nv_bfloat162 zm = __high2bfloat162(cz);
  uint32_t out[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t bits = Lop3AndOr(word >> (4 * (jj * 2 + h)), 0x000F000Fu, 0x43004300u);
    const __nv_bfloat162 t = __hsub2(AsBf162(bits), zm);
    out[h] = AsU32(__hfma2(t, s_hi, __hfma2(t, s_lo, c)));
  }
  b0 = out[0];
  b1 = out[1];
}

// Factored-scale 4-bit (IntWeightGemm's small-M path when every zero point is an integer):
// the B fragments are the exact small integers t = code - z_int (one LOP3 and one bf16x2
// subtraction per two codes, half the work of Dequant4); the group's fp32 scale multiplies
// the fp32 group sum afterwards (FlushGroup). zz = bf16x2 {128 + z_int, 128 + z_int}.
__device__ __forceinline__ void CodesMinusZero4(uint32_t word, int jj, uint32_t zz, uint32_t& b0,
                                                uint32_t& b1) {
  const __nv_bfloat162 z2 = AsBf162(zz);
  b0 = AsU32(__hsub2(AsBf162(Lop3AndOr(word >> (8 * jj), 0x000F000Fu, 0x43004300u)), z2));
  b1 = AsU32(__hsub2(AsBf162(Lop3AndOr(word >> (8 * jj + 4), 0x000F000Fu, 0x43004300u)), z2));
}

// 8-bit: the word holds elements e = 0..3 (b0.lo, b0.hi, b1.lo, b1.hi) in bytes 0..3. PRMT
// moves byte e under the exponent of 2^23 (0x4B000000): 2^23 + code exactly; then
// fp32 w = code * scale + (-scale * zero), rounded once to bf16. sz = {scale, -scale*zero}.
__device__ __forceinline__ void Dequant8(uint32_t word, uint2 sz, uint32_t& b0, uint32_t& b1) {
  const float scale = __uint_as_float(sz.x);
  const float zterm = __uint_as_float(sz.y);
  float w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float q = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7650u + e)) - 8388608.0f;
    w[e] = fmaf(q, scale, zterm);
  }
  b0 = PackBf16x2(w[0], w[1]);
  b1 = PackBf16x2(w[2], w[3]);
}

// The factored-scale paths' group bookkeeping, shared by the GEMM and the GEMV.
// FlushGroup: acc += the finished group's sums times its scales (this lane's C columns
// 2 tig, 2 tig + 1 of each n8 tile); gacc back to zero.
template <int kMT, int kNT>
__device__ __forceinline__ void FlushGroup(float (&acc)[kMT][kNT][4], float (&gacc)[kMT][kNT][4],
                                           const float (&gscale)[kNT][2]) {
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[i][j][e] = fmaf(gacc[i][j][e], gscale[j][e & 1], acc[i][j][e]);
        gacc[i][j][e] = 0.0f;
      }
    }
  }
}
// LoadGroupScales: a new group's scale row entries for this warp's kNT n8 tiles (`row`
// points at the warp's first column): the zero pair of the lane's B column (gid; word 1 =
// {c = 0, 128 + z_int}, both halves become 128 + z_int) and the fp32 scales s_hi + s_lo
// (exact) of its C columns.
template <int kNT>
__device__ __forceinline__ void LoadGroupScales(const uint2* row, int lane, uint32_t (&gzero)[kNT],
                                                float (&gscale)[kNT][2]) {
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    gzero[j] = __byte_perm(row[j * 8 + (lane >> 2)].y, 0u, 0x3232);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const __nv_bfloat162 sc = AsBf162(row[j * 8 + (lane & 3) * 2 + e].x);
      gscale[j][e] = __low2float(sc) + __high2float(sc);
    }
  }
}

// The epilogue of both integer-weight kernels. A warp's accumulators acc[kMT][kNT] cover
// rows row0 + mt * 16 + gid (+ 8) and columns col0 + j * 8 + 2 tig (+ 1) (C fragment layout);
// the block's tile is kBM x kTileN at (tile_row0, tile_col0). One split (num_splits == 1):
// direct stores. Split K: every split stores its partial tile into its own fp32 slice of
// the workspace; the last split to finish this output tile (tile_counters[counter]) sums
// the slices in split order into y and puts the counter back to zero, so no memset or
// extra kernel is needed and the result does not depend on which block finished first
// (fp32 atomics would make two runs of one step differ in the last bits). The fence before
// the counter increment publishes this block's stores before it is counted; the last block
// reads from L2. Called by all threads of the block.
template <int kMT, int kNT, int kBM>
__device__ __forceinline__ void StoreTile(const float (&acc)[kMT][kNT][4], int row0, int col0,
                                          int tile_row0, int tile_col0, int m, int n,
                                          void* __restrict__ y, int y_is_bf16, int vec_store,
                                          float* __restrict__ workspace,
                                          int* __restrict__ tile_counters, int split,
                                          int num_splits, int counter) {
  const int lane = threadIdx.x & 31;
  // f(row, col, v0, v1) for each pair of this lane's accumulators inside [m, n): v0 at
  // (row, col), v1 at (row, col + 1) (col + 1 may be n).
  auto each_pair = [&](auto&& f) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const int col = col0 + j * 8 + (lane & 3) * 2;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = row0 + mt * 16 + (lane >> 2) + half * 8;
          if (row < m && col < n) f(row, col, acc[mt][j][half * 2], acc[mt][j][half * 2 + 1]);
        }
      }
    }
  };
  if (num_splits == 1) {
    each_pair([&](int row, int col, float v0, float v1) {
      const size_t off = static_cast<size_t>(row) * n + col;
      if (y_is_bf16) {
        bf16* yb = static_cast<bf16*>(y);
        if (vec_store && col + 1 < n) {
          *reinterpret_cast<__nv_bfloat162*>(yb + off) = __floats2bfloat162_rn(v0, v1);
        } else {
          yb[off] = __float2bfloat16_rn(v0);
          if (col + 1 < n) yb[off + 1] = __float2bfloat16_rn(v1);
        }
      } else {
        float* yf = static_cast<float*>(y);
        if (vec_store && col + 1 < n) {
          *reinterpret_cast<float2*>(yf + off) = make_float2(v0, v1);
        } else {
          yf[off] = v0;
          if (col + 1 < n) yf[off + 1] = v1;
        }
      }
    });
    return;
  }

  const size_t slice = static_cast<size_t>(m) * n;
  float* const mine = workspace + slice * split;
  each_pair([&](int row, int col, float v0, float v1) {
    const size_t off = static_cast<size_t>(row) * n + col;
    __stcg(mine + off, v0);
    if (col + 1 < n) __stcg(mine + off + 1, v1);
  });
  __threadfence();
  __syncthreads();
  __shared__ int is_last;
  if (threadIdx.x == 0) {
    const int prev = atomicAdd(tile_counters + counter, 1);
    is_last = (prev == num_splits - 1) ? 1 : 0;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < kBM * kTileN; i += blockDim.x) {
    const int row = tile_row0 + i / kTileN;
    const int col = tile_col0 + i % kTileN;
    if (row >= m || col >= n) continue;
    const size_t off = static_cast<size_t>(row) * n + col;
    float v = 0.0f;
    for (int z = 0; z < num_splits; ++z) v += __ldcg(workspace + slice * z + off);
    if (y_is_bf16) {
      static_cast<bf16*>(y)[off] = __float2bfloat16_rn(v);
    } else {
      static_cast<float*>(y)[off] = v;
    }
  }
  if (threadIdx.x == 0) tile_counters[counter] = 0;
}

// One block computes a BM x 128 output tile over the K tiles
// [blockIdx.z * ktiles_per_split, ...). grid = (N tiles, M tiles, K splits).
// With more than one split (gridDim.z > 1), `workspace` holds fp32 partials
// [splits, m, n] (any contents on entry) and `tile_counters` ([M tiles, N tiles]) must be
// zero on entry; the kernel leaves the counters zero again.
// kFactored (4-bit, every zero point an integer: PackedIntWeights::integer_zero_points):
// the MMAs multiply x by the exact t = code - zero and accumulate one group at a time in
// fp32; each group's sum is scaled by its fp32 scale (s_hi + s_lo) when the group ends.
template <int kBits, int kWarpsM, int kWarpsN, int kMT, int kNT, int kStages, int kMinBlocks,
          bool kFactored>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    IntWeightGemmKernel(const bf16* __restrict__ x, const uint4* __restrict__ codes,
                        const uint32_t* __restrict__ scale_zero, const int32_t* __restrict__ kinfo,
                        int m, int k, int n, int n_padded, int ktiles_per_split,
                        void* __restrict__ y, int y_is_bf16, int vec_store,
                        float* __restrict__ workspace, int* __restrict__ tile_counters) {
  using Cfg = TileConfig<kBits, kWarpsM, kMT, kStages>;
  static_assert(kWarpsM * kWarpsN * 32 == kThreads, "256 threads");
  static_assert(kWarpsN * kNT * 8 == kTileN, "warps must cover the N tile");
  static_assert(kNT % 2 == 0, "a warp owns whole 16-column slabs");
  static_assert(4 * (kTileN * 8 / 16) == kThreads, "one scale chunk per thread");
  static_assert(!kFactored || kBits == 4, "the factored-scale path is 4-bit only");
  constexpr int kBM = Cfg::kBM;
  constexpr int kBVec = Cfg::kBBytes / 16;  // uint4 per code tile
  constexpr int kLaneVec = kBits / 4;       // uint4 per lane per slab

  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp / kWarpsN;
  const int warp_n = warp % kWarpsN;
  const int ntile = blockIdx.x;
  const int m0 = blockIdx.y * kBM;
  const int k_tiles = k / kTileK;
  const int kt_begin = blockIdx.z * ktiles_per_split;
  const int kt_end = min(k_tiles, kt_begin + ktiles_per_split);
  const int num_kt = kt_end - kt_begin;

  // The code tiles do not depend on the kernel before this one (pdl.cuh): the first
  // kPrefetchTiles of this block's K range go toward L2 while that kernel finishes.
  {
    const char* tiles = reinterpret_cast<const char*>(
        codes + (static_cast<size_t>(ntile) * k_tiles + kt_begin) * (Cfg::kBBytes / 16));
    const int lines = min(num_kt, kPrefetchTiles) * (Cfg::kBBytes / 128);
    for (int i = tid; i < lines; i += kThreads) PrefetchL2(tiles + static_cast<size_t>(i) * 128);
  }
  PdlWait();
  PdlLaunchDependents();

  // Per-thread copy assignments, fixed for the whole loop (compile-time trip counts, so
  // the loader is straight-line code): x chunks i = r * kThreads + tid of the kBM x 8
  // chunk tile; code vectors likewise; one 16-byte scale chunk per thread. Shared
  // addresses are 32-bit offsets from the stage base; global pointers are set for K tile
  // kt_begin and advanced by one tile per load.
  constexpr int kAChunks = kBM * 8;
  constexpr int kAIters = (kAChunks + kThreads - 1) / kThreads;
  constexpr int kBIters = kBVec / kThreads;
  static_assert(kBVec % kThreads == 0, "code tile is whole 16-byte vectors per thread");
  const uint32_t smem_base = SmemAddr(smem);
  const bf16* a_src[kAIters];
  uint32_t a_dst[kAIters];
  bool a_ok[kAIters];
  bool a_mine[kAIters];
#pragma unroll
  for (int r = 0; r < kAIters; ++r) {
    const int i = r * kThreads + tid;
    const int row = i >> 3;
    const int ch = i & 7;
    a_mine[r] = kAChunks % kThreads == 0 || i < kAChunks;
    a_ok[r] = a_mine[r] && m0 + row < m;
    a_src[r] = a_ok[r] ? x + static_cast<size_t>(m0 + row) * k + kt_begin * kTileK + ch * 8 : x;
    a_dst[r] = static_cast<uint32_t>((row * 8 + (ch ^ (row & 7))) * 16);
  }
  const uint4* b_src = codes + (static_cast<size_t>(ntile) * k_tiles + kt_begin) * kBVec + tid;
  const int s_row = tid >> 6;
  const int s_ch = tid & 63;
  const uint32_t* s_src_base = scale_zero + static_cast<size_t>(ntile) * kTileN * 2 + s_ch * 4;
  const uint32_t s_dst =
      static_cast<uint32_t>(Cfg::kABytes + Cfg::kBBytes + (s_row * 64 + s_ch) * 16);
  int* const slot_dst =
      reinterpret_cast<int*>(smem + Cfg::kABytes + Cfg::kBBytes + Cfg::kSBytes) + s_row;

  // Loads the next K tile (the pointers' current one) into `stage`. `info` is
  // kinfo[kt * 4 + s_row], fetched by the caller one iteration ahead so its latency never
  // stalls the copy issue; it goes to the stage's slot words whole ((group << 2) | slot).
  auto load_stage = [&](int stage, int info) {
    const uint32_t base = smem_base + static_cast<uint32_t>(stage * Cfg::kStageBytes);
    // x tile: kBM rows x 8 chunks of 8 bf16; rows past m are zero-filled (src-size 0).
#pragma unroll
    for (int r = 0; r < kAIters; ++r) {
      if (a_mine[r]) CpAsync16(base + a_dst[r], a_src[r], a_ok[r]);
      if (a_ok[r]) a_src[r] += kTileK;
    }
    // Code tile: contiguous.
#pragma unroll
    for (int r = 0; r < kBIters; ++r) {
      CpAsync16(base + Cfg::kABytes + (r * kThreads + tid) * 16, b_src + r * kThreads, true);
    }
    b_src += kBVec;
    // Scale rows: row r (k16 step r) is loaded only when it is the first step of its group
    // in this tile (slot == r); later steps of the same group read that row. The slots go
    // to shared memory with the stage (plain stores; the consumer reads them after at least
    // one __syncthreads, like the cp.async data).
    if (s_ch == 0) slot_dst[stage * (Cfg::kStageBytes / 4)] = info;
    if ((info & 3) == s_row) {
      CpAsync16(base + s_dst, s_src_base + static_cast<size_t>(info >> 2) * n_padded * 2, true);
    }
  };

  float acc[kMT][kNT][4] = {};
  // kFactored only (dead otherwise): the current group's fp32 sums, its id, its scales and
  // zero pairs (LoadGroupScales).
  float gacc[kMT][kNT][4] = {};
  float gscale[kNT][2] = {};
  uint32_t gzero[kNT] = {};
  int cur_group = -1;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_kt) load_stage(s, __ldg(kinfo + (kt_begin + s) * 4 + s_row));
    CpAsyncCommit();
  }
  int info_next = (kStages - 1 < num_kt) ? __ldg(kinfo + (kt_begin + kStages - 1) * 4 + s_row) : 0;
  // Stage indices as wrapping counters (no division in the loop).
  int load_stage_idx = kStages - 1;
  int stage = 0;

  for (int it = 0; it < num_kt; ++it) {
    // Stage `it` has landed for this thread; the barrier makes every thread's copies
    // visible and guarantees all warps finished computing on stage it-1, which is the
    // stage the next load overwrites.
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    {
      const int next = it + kStages - 1;
      if (next < num_kt) load_stage(load_stage_idx, info_next);
      CpAsyncCommit();
      if (next + 1 < num_kt) info_next = __ldg(kinfo + (kt_begin + next + 1) * 4 + s_row);
      load_stage_idx = load_stage_idx == kStages - 1 ? 0 : load_stage_idx + 1;
    }

    const unsigned char* a_s = smem + stage * Cfg::kStageBytes;
    const uint4* b_s = reinterpret_cast<const uint4*>(a_s + Cfg::kABytes);
    const uint2* s_s = reinterpret_cast<const uint2*>(a_s + Cfg::kABytes + Cfg::kBBytes);
    const int4 info4 =
        *reinterpret_cast<const int4*>(a_s + Cfg::kABytes + Cfg::kBBytes + Cfg::kSBytes);
    const int infos[4] = {info4.x, info4.y, info4.z, info4.w};

    // This warp's codes for the whole K tile: kNT/2 slabs x kBits words.
    uint32_t bw[kNT / 2][kBits];
#pragma unroll
    for (int sl = 0; sl < kNT / 2; ++sl) {
      const int slab = warp_n * (kNT / 2) + sl;
      const uint4* p = b_s + (slab * 32 + lane) * kLaneVec;
#pragma unroll
      for (int v = 0; v < kLaneVec; ++v) {
        const uint4 t = p[v];
        bw[sl][v * 4 + 0] = t.x;
        bw[sl][v * 4 + 1] = t.y;
        bw[sl][v * 4 + 2] = t.z;
        bw[sl][v * 4 + 3] = t.w;
      }
    }

#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int slot = infos[s] & 3;
      if constexpr (kFactored) {
        const int group = infos[s] >> 2;  // the same for the whole block
        if (group != cur_group) {
          if (cur_group >= 0) FlushGroup(acc, gacc, gscale);
          cur_group = group;
          LoadGroupScales(s_s + slot * kTileN + warp_n * kNT * 8, lane, gzero, gscale);
        }
      }
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int row = warp_m * kMT * 16 + mt * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int ch = s * 2 + (lane >> 4);
        LdMatrixX4(a[mt], a_s + (row * 8 + (ch ^ (row & 7))) * 16);
      }
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        uint32_t b0, b1;
        if constexpr (kFactored) {
          CodesMinusZero4(bw[j / 2][s], j % 2, gzero[j], b0, b1);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) MmaBf16(gacc[mt][j], a[mt], b0, b1);
          continue;
        }
        const int col = warp_n * kNT * 8 + j * 8 + (lane >> 2);
        const uint2 sz = s_s[slot * kTileN + col];
        if constexpr (kBits == 4) {
          Dequant4(bw[j / 2][s], j % 2, sz, b0, b1);
        } else {
          Dequant8(bw[j / 2][s * 2 + j % 2], sz, b0, b1);
        }
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) MmaBf16(acc[mt][j], a[mt], b0, b1);
      }
    }
    stage = stage == kStages - 1 ? 0 : stage + 1;
  }
  CpAsyncWait<0>();
  if constexpr (kFactored) {
    if (cur_group >= 0) FlushGroup(acc, gacc, gscale);
  }

  StoreTile<kMT, kNT, kBM>(acc, m0 + warp_m * kMT * 16, ntile * kTileN + warp_n * kNT * 8, m0,
                           ntile * kTileN, m, n, y, y_is_bf16, vec_store, workspace, tile_counters,
                           blockIdx.z, gridDim.z, blockIdx.y * gridDim.x + ntile);
}

// ---- 4-bit decode GEMV (M <= 16, integer zero points; opt-in, SetIntGemv4) ----------------
// The GEMM above stages every code tile through shared memory with cp.async and one
// __syncthreads per 64-deep K tile, work that is not needed when each code byte is used by
// one warp only: in the packed layout a slab's 64 x 16 codes of one K tile are 32 lanes x
// 16 bytes, contiguous, and the K tiles of one N tile follow each other. So here warp w of
// block (N tile, K split) streams slab w straight from global memory into registers
// (kGemvLoads 16-byte loads in flight per lane, ld.global.nc without L1 allocation), with
// x (16 rows, zero past m, the block's K range), the block's kinfo words and the scale rows
// of the groups its K range touches (at most kGemvGroupRows, the host plans the split so)
// staged once in shared memory. Arithmetic as the factored GEMM path: B = t = code - zero
// exactly, fp32 group sums scaled by the group's fp32 scale; epilogue StoreTile.
constexpr int kGemvLoads = 8;       // K tiles of codes in flight per lane
constexpr int kGemvMaxTiles = kIntGemv4MaxTiles;    // K tiles per split (x rows of 2 KiB)
constexpr int kGemvGroupRows = kIntGemv4GroupRows;  // scale rows per split
constexpr int kGemvXStride = kGemvMaxTiles * kTileK * 2 + 16;  // bytes per staged x row
constexpr int kGemvSmemBytes =
    16 * kGemvXStride + kGemvGroupRows * kTileN * 8 + kGemvMaxTiles * 4 * 4 + kGemvGroupRows * 4;

// grid = (N tiles, K splits), 256 threads; ktiles_per_split <= kGemvMaxTiles, and the K
// range of every split touches at most kGemvGroupRows groups. Split-K scratch as the GEMM's.
// Three blocks per SM (<= 85 registers, 3 x 49 KiB of shared memory): 24 warps, each
// with kGemvLoads x 512 bytes of codes in flight.
__global__ void __launch_bounds__(kThreads, 3)
    IntGemv4Kernel(const bf16* __restrict__ x, const uint4* __restrict__ codes,
                   const uint32_t* __restrict__ scale_zero, const int32_t* __restrict__ kinfo,
                   int m, int k, int n, int n_padded, int ktiles_per_split, void* __restrict__ y,
                   int y_is_bf16, int vec_store, float* __restrict__ workspace,
                   int* __restrict__ tile_counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* const x_s = smem;                                            // [16][kGemvXStride]
  uint2* const scale_s = reinterpret_cast<uint2*>(smem + 16 * kGemvXStride);  // [rows][128]
  int* const info_s = reinterpret_cast<int*>(scale_s + kGemvGroupRows * kTileN);  // [tiles*4]
  int* const group_s = info_s + kGemvMaxTiles * 4;  // group id of each staged scale row

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;  // = the slab of this N tile
  const int ntile = blockIdx.x;
  const int k_tiles = k / kTileK;
  const int kt_begin = blockIdx.y * ktiles_per_split;
  const int num_kt = min(k_tiles, kt_begin + ktiles_per_split) - kt_begin;
  const int steps = num_kt * 4;
  const uint4* const cp =
      codes + (static_cast<size_t>(ntile) * k_tiles + kt_begin) * (kTileN * kTileK / 32) +
      warp * 32 + lane;

  // Before the previous kernel has finished (pdl.cuh): everything but x. This warp's first
  // code loads go out at once; the block's kinfo words, then its scale rows, to shared memory.
  uint4 cv[kGemvLoads];
#pragma unroll
  for (int u = 0; u < kGemvLoads; ++u) {
    cv[u] = u < num_kt ? LoadStreamed16(cp + u * (kTileN * kTileK / 32)) : make_uint4(0, 0, 0, 0);
  }
  for (int i = tid; i < steps; i += kThreads) info_s[i] = __ldg(kinfo + kt_begin * 4 + i);
  __syncthreads();
  if (tid == 0) {  // the distinct groups of this K range, in order (<= kGemvGroupRows)
    int rows = 0, last = -1;
    for (int i = 0; i < steps; ++i) {
      const int g = info_s[i] >> 2;
      if (g != last && rows < kGemvGroupRows) group_s[rows++] = g;
      last = g;
    }
    for (int r = rows; r < kGemvGroupRows; ++r) group_s[r] = -1;
  }
  __syncthreads();
  for (int i = tid; i < kGemvGroupRows * (kTileN / 2); i += kThreads) {  // 16 B = 2 columns
    const int r = i / (kTileN / 2);
    const int c = (i % (kTileN / 2)) * 2;
    const int g = group_s[r];
    if (g < 0) continue;
    *reinterpret_cast<uint4*>(scale_s + r * kTileN + c) = __ldg(reinterpret_cast<const uint4*>(
        scale_zero + (static_cast<size_t>(g) * n_padded + ntile * kTileN + c) * 2));
  }
  PdlWait();
  PdlLaunchDependents();
  // x[0:16, K range] as bf16, rows past m zero.
  {
    const int chunks = num_kt * (kTileK / 8);  // 16-byte chunks per row
    for (int i = tid; i < 16 * chunks; i += kThreads) {
      const int r = i / chunks, c = i - r * chunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < m) {
        v = *reinterpret_cast<const uint4*>(x + static_cast<size_t>(r) * k + kt_begin * kTileK +
                                            c * 8);
      }
      *reinterpret_cast<uint4*>(x_s + r * kGemvXStride + c * 16) = v;
    }
  }
  __syncthreads();

  float acc[1][2][4] = {};
  float gacc[1][2][4] = {};
  float gscale[2][2] = {};
  uint32_t gzero[2] = {0, 0};
  int cur_group = -1, row = -1;
  const int a_row = ((lane >> 3) & 1) * 8 + (lane & 7);  // ldmatrix row of this lane
  const unsigned char* const a_base = x_s + a_row * kGemvXStride + (lane >> 4) * 16;
  // A ring of kGemvLoads code vectors: tile tt's slot is refilled with tile tt + kGemvLoads
  // as soon as tt's words are out of it, so kGemvLoads loads stay in flight to the end
  // (the loop is unrolled over the at most kGemvMaxTiles tiles: slots are registers).
#pragma unroll
  for (int tt = 0; tt < kGemvMaxTiles; ++tt) {
    if (tt >= num_kt) break;
    const uint4 c = cv[tt % kGemvLoads];
    if (tt + kGemvLoads < num_kt) {
      cv[tt % kGemvLoads] = LoadStreamed16(cp + (tt + kGemvLoads) * (kTileN * kTileK / 32));
    }
    const uint32_t words[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const int group = info_s[tt * 4 + s] >> 2;  // the same for the whole block
      if (group != cur_group) {
        if (cur_group >= 0) FlushGroup(acc, gacc, gscale);
        cur_group = group;
        row = min(row + 1, kGemvGroupRows - 1);  // the host's plan keeps row in range
        LoadGroupScales(scale_s + row * kTileN + warp * 16, lane, gzero, gscale);
      }
      uint32_t a[4];
      LdMatrixX4(a, a_base + (tt * kTileK + s * 16) * 2);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        uint32_t b0, b1;
        CodesMinusZero4(words[s], j, gzero[j], b0, b1);
        MmaBf16(gacc[0][j], a, b0, b1);
      }
    }
  }
  FlushGroup(acc, gacc, gscale);  // the last group (every split has one)
  StoreTile<1, 2, 16>(acc, 0, ntile * kTileN + warp * 16, 0, ntile * kTileN, m, n, y, y_is_bf16,
                      vec_store, workspace, tile_counters, blockIdx.y, gridDim.y, ntile);
}

// out[r, p] = x[r, perm[p]] (act-order: inputs in sorted-group order).
__global__ void GatherColumnsKernel(const bf16* __restrict__ x, const int32_t* __restrict__ perm,
                                    int64_t total, int k, bf16* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const int p = static_cast<int>(i - r * k);
    out[i] = x[r * k + __ldg(perm + p)];
  }
}

// The tile shapes. Small M (decode, M <= 16): 16 x 128 blocks, 8 warps side by side in N,
// each one slab; 5 stages; <= 80 registers so three blocks (24 warps, 150-210 KiB of
// stages) share an SM and keep ~12 code tiles in flight per SM. Medium M (batched decode,
// 17..64): 64 x 128 blocks, the same 8 warps each computing 64 x 16, so every code tile
// is read from memory and dequantized once for all 64 rows (16-row tiles would stream the
// weights once per 16 rows); 4 stages, two blocks per SM. Large M: 128 x 128 blocks, 2 x 4
// warps of 64 x 32; 3 stages.
struct SmallShape {
  static constexpr int kWarpsM = 1, kWarpsN = 8, kMT = 1, kNT = 2, kStages = 5, kMinBlocks = 3;
};
struct MediumShape {
  static constexpr int kWarpsM = 1, kWarpsN = 8, kMT = 4, kNT = 2, kStages = 4, kMinBlocks = 2;
};
struct LargeShape {
  static constexpr int kWarpsM = 2, kWarpsN = 4, kMT = 4, kNT = 4, kStages = 3, kMinBlocks = 1;
};
// M up to kSmallMaxM uses SmallShape, up to kMediumMaxM MediumShape, above LargeShape.
constexpr int64_t kSmallMaxM = 16;
constexpr int64_t kMediumMaxM = 64;

template <int kBits, typename Shape, bool kFactored = false>
constexpr auto KernelFor() {
  return &IntWeightGemmKernel<kBits, Shape::kWarpsM, Shape::kWarpsN, Shape::kMT, Shape::kNT,
                              Shape::kStages, Shape::kMinBlocks, kFactored>;
}
template <int kBits, typename Shape>
constexpr int SmemFor() {
  return TileConfig<kBits, Shape::kWarpsM, Shape::kMT, Shape::kStages>::kSmemBytes;
}
template <typename Shape>
constexpr int BlockM() {
  return Shape::kWarpsM * Shape::kMT * 16;
}

template <int kBits, typename Shape, bool kFactored = false>
absl::Status AllowSmem() {
  QSHARD_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(KernelFor<kBits, Shape, kFactored>(),
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   SmemFor<kBits, Shape>()));
  return absl::OkStatus();
}

struct LaunchArgs {
  const bf16* x;
  const uint4* codes;
  const uint32_t* scale_zero;
  const int32_t* kinfo;
  int m, k, n, n_padded, ktiles_per_split;
  void* y;
  int y_is_bf16, vec_store;
  float* workspace;
  int* tile_counters;
};

template <int kBits, typename Shape, bool kFactored = false>
absl::Status LaunchGemm(const LaunchArgs& a, dim3 grid, cudaStream_t stream) {
  QSHARD_CUDA_RETURN_IF_ERROR(LaunchPdl(KernelFor<kBits, Shape, kFactored>(), grid, dim3(kThreads),
                                        SmemFor<kBits, Shape>(), stream, a.x, a.codes, a.scale_zero,
                                        a.kinfo, a.m, a.k, a.n, a.n_padded, a.ktiles_per_split, a.y,
                                        a.y_is_bf16, a.vec_store, a.workspace, a.tile_counters));
  return absl::OkStatus();
}

int ElementwiseBlocks(int64_t total) {
  return static_cast<int>(std::min<int64_t>((total + 255) / 256, 4096));
}

}  // namespace

namespace {
// 8: qshard_cuda_bench --sweep-splits on an H100 (fused Llama-3.1-8B linears, 4-bit g128):
// all linears at M = 1 took 3.39 ms at 3, 3.11 at 4, 3.07 at 6, 3.02 at 8, 3.01 at 12; at
// M = 16 4.27 / 3.93 / 4.00 / 4.02 / 4.23 ms.
std::atomic<int> g_int_gemm_blocks_per_sm{8};

EnvFlag& FactoredScalesFlag() {
  static EnvFlag flag("QSHARD_CUDA_INT_FACTORED", /*default_on=*/false);
  return flag;
}
EnvFlag& Gemv4Flag() {
  static EnvFlag flag("QSHARD_CUDA_INT_GEMV", /*default_on=*/false);
  return flag;
}
}  // namespace

void SetIntGemv4(bool on) { Gemv4Flag().Set(on); }
bool IntGemv4Enabled() { return Gemv4Flag().Get(); }

void SetIntGemmFactoredScales(bool on) { FactoredScalesFlag().Set(on); }
bool IntGemmFactoredScalesEnabled() { return FactoredScalesFlag().Get(); }

void SetIntGemmBlocksPerSm(int blocks) {
  g_int_gemm_blocks_per_sm.store(std::clamp(blocks, 1, 64), std::memory_order_relaxed);
}
int IntGemmBlocksPerSm() { return g_int_gemm_blocks_per_sm.load(std::memory_order_relaxed); }

absl::StatusOr<std::unique_ptr<IntWeightGemm>> IntWeightGemm::Create(const IntQuantMatrix& m,
                                                                     cudaStream_t stream) {
  if (m.in_features > (int64_t{1} << 30) || m.out_features > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("IntWeightGemm: N x K = ", m.out_features, " x ",
                                                   m.in_features, " is too large"));
  }
  QSHARD_ASSIGN_OR_RETURN(PackedIntWeights packed, PackIntWeights(m));
  std::unique_ptr<IntWeightGemm> g(new IntWeightGemm());
  g->bits_ = packed.bits;
  g->k_ = packed.k;
  g->n_ = packed.n;
  g->n_padded_ = packed.n_padded;
  g->group_size_ = packed.group_size;
  g->act_order_ = packed.act_order;
  g->integer_zero_points_ = packed.integer_zero_points;
  g->step_groups_.resize(packed.kblock_info.size());
  for (size_t i = 0; i < packed.kblock_info.size(); ++i) {
    g->step_groups_[i] = packed.kblock_info[i] >> 2;
  }

  int device = 0;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  QSHARD_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&g->multiprocessors_, cudaDevAttrMultiProcessorCount, device));

  auto upload = [&](DeviceBuffer& buf, const void* src, size_t bytes) -> absl::Status {
    QSHARD_ASSIGN_OR_RETURN(buf, DeviceBuffer::Allocate(bytes));
    return buf.CopyFromHost(src, bytes, stream);
  };
  QSHARD_RETURN_IF_ERROR(
      upload(g->codes_, packed.codes.data(), packed.codes.size() * sizeof(uint32_t)));
  QSHARD_RETURN_IF_ERROR(
      upload(g->scale_zero_, packed.scale_zero.data(), packed.scale_zero.size() * sizeof(float)));
  QSHARD_RETURN_IF_ERROR(upload(g->kblock_info_, packed.kblock_info.data(),
                                packed.kblock_info.size() * sizeof(int32_t)));
  if (packed.act_order) {
    QSHARD_RETURN_IF_ERROR(
        upload(g->perm_, packed.perm.data(), packed.perm.size() * sizeof(int32_t)));
  }
  // Dynamic shared memory above 48 KiB needs an opt-in per kernel (idempotent).
  if (g->bits_ == 4) {
    QSHARD_RETURN_IF_ERROR((AllowSmem<4, SmallShape>()));
    QSHARD_RETURN_IF_ERROR((AllowSmem<4, SmallShape, true>()));
    QSHARD_RETURN_IF_ERROR((AllowSmem<4, MediumShape>()));
    QSHARD_RETURN_IF_ERROR((AllowSmem<4, MediumShape, true>()));
    QSHARD_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        IntGemv4Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kGemvSmemBytes));
    QSHARD_RETURN_IF_ERROR((AllowSmem<4, LargeShape>()));
  } else {
    QSHARD_RETURN_IF_ERROR((AllowSmem<8, SmallShape>()));
    QSHARD_RETURN_IF_ERROR((AllowSmem<8, MediumShape>()));
    QSHARD_RETURN_IF_ERROR((AllowSmem<8, LargeShape>()));
  }
  return g;
}

absl::Status IntWeightGemm::EnsureScratch(DeviceBuffer& buf, size_t bytes, cudaStream_t stream) {
  if (buf.size() >= bytes) return absl::OkStatus();
  // Kernels queued on `stream` may still read the old buffer; graphs captured with it go.
  QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  BumpScratchGeneration();
  QSHARD_ASSIGN_OR_RETURN(buf, DeviceBuffer::Allocate(bytes));
  return absl::OkStatus();
}

absl::Status IntWeightGemm::Run(const void* x, int64_t m, void* y, DType y_dtype,
                                cudaStream_t stream) {
  if (y_dtype != DType::kBF16 && y_dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "IntWeightGemm::Run: y dtype must be bf16 or f32, got ", std::string(DTypeName(y_dtype))));
  }
  if (m < 1 || m > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("IntWeightGemm::Run: bad m = ", m));
  }
  if (x == nullptr || y == nullptr || reinterpret_cast<uintptr_t>(x) % 16 != 0) {
    return absl::InvalidArgumentError(
        "IntWeightGemm::Run: x and y must be non-null and x 16-byte aligned");
  }
  const bf16* xin = static_cast<const bf16*>(x);
  if (act_order_) {
    const int64_t total = m * k_;
    QSHARD_RETURN_IF_ERROR(
        EnsureScratch(gather_, static_cast<size_t>(total) * sizeof(bf16), stream));
    GatherColumnsKernel<<<ElementwiseBlocks(total), 256, 0, stream>>>(
        xin, perm_.as<int32_t>(), total, static_cast<int>(k_), gather_.as<bf16>());
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    xin = gather_.as<bf16>();
  }

  if (UsesGemv4(m)) return RunGemv4(xin, m, y, y_dtype, stream);

  const bool small = m <= kSmallMaxM;
  const bool medium = !small && m <= kMediumMaxM;
  const int64_t bm = small    ? BlockM<SmallShape>()
                     : medium ? BlockM<MediumShape>()
                              : BlockM<LargeShape>();
  const int64_t m_tiles = (m + bm - 1) / bm;
  const int64_t n_tiles = n_padded_ / kTileN;
  const int64_t k_tiles = k_ / kTileK;
  if (m_tiles > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("IntWeightGemm::Run: m = ", m, " too large"));
  }
  // Split K when the output tiles alone leave SMs idle: aim for IntGemmBlocksPerSm() blocks
  // per SM (whether or not they are resident at once), keeping
  // at least 4 K tiles per block so the pipeline has something to overlap.
  const int64_t blocks = m_tiles * n_tiles;
  const int64_t target =
      IntGemmBlocksPerSm() * static_cast<int64_t>(std::max(multiprocessors_, 1));
  int64_t splits = 1;
  if (blocks < target) {
    splits = std::min<int64_t>((target + blocks - 1) / blocks, std::max<int64_t>(1, k_tiles / 4));
  }
  const int64_t per_split = (k_tiles + splits - 1) / splits;
  splits = (k_tiles + per_split - 1) / per_split;  // every split gets >= 1 K tile

  LaunchArgs a;
  a.x = xin;
  a.codes = codes_.as<uint4>();
  a.scale_zero = scale_zero_.as<uint32_t>();
  a.kinfo = kblock_info_.as<int32_t>();
  a.m = static_cast<int>(m);
  a.k = static_cast<int>(k_);
  a.n = static_cast<int>(n_);
  a.n_padded = static_cast<int>(n_padded_);
  a.ktiles_per_split = static_cast<int>(per_split);
  a.y = y;
  a.y_is_bf16 = y_dtype == DType::kBF16 ? 1 : 0;
  a.vec_store = (n_ % 2 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0) ? 1 : 0;
  a.workspace = nullptr;
  a.tile_counters = nullptr;
  if (splits > 1) {
    // The partial slices and arrival counters live in the scratch pool every quantized
    // linear shares (one stream runs one linear at a time): splits * m * n floats is about
    // 8 blocks per SM times one output tile, a few MiB, where a buffer per layer would
    // cost hundreds of MiB on an 8B model. The kernel leaves the counters zero.
    QSHARD_ASSIGN_OR_RETURN(const Quant8Scratch s,
                            GetQuant8Scratch(0, 0, 0, splits * m * n_, m_tiles * n_tiles, stream));
    a.workspace = static_cast<float*>(s.partials);
    a.tile_counters = s.counters;
  }
  const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles),
                  static_cast<unsigned>(splits));
  auto launch = [&]() -> absl::Status {
    const bool factored = UsesFactoredScales(m);
    if (bits_ == 4 && small && factored) return LaunchGemm<4, SmallShape, true>(a, grid, stream);
    if (bits_ == 4 && small) return LaunchGemm<4, SmallShape>(a, grid, stream);
    if (bits_ == 4 && medium && factored) {
      return LaunchGemm<4, MediumShape, true>(a, grid, stream);
    }
    if (bits_ == 4 && medium) return LaunchGemm<4, MediumShape>(a, grid, stream);
    if (bits_ == 4) return LaunchGemm<4, LargeShape>(a, grid, stream);
    if (small) return LaunchGemm<8, SmallShape>(a, grid, stream);
    if (medium) return LaunchGemm<8, MediumShape>(a, grid, stream);
    return LaunchGemm<8, LargeShape>(a, grid, stream);
  };
  QSHARD_RETURN_IF_ERROR(launch());
  return absl::OkStatus();
}

bool IntWeightGemm::UsesGemv4(int64_t m) const {
  return bits_ == 4 && integer_zero_points_ && m <= kSmallMaxM && IntGemv4Enabled();
}

int64_t IntWeightGemm::Gemv4TilesPerSplit() {
  const int bps = IntGemmBlocksPerSm();
  if (bps == gemv_plan_bps_) return gemv_tiles_per_split_;
  gemv_tiles_per_split_ =
      PlanIntGemv4TilesPerSplit(step_groups_, n_padded_ / kTileN, multiprocessors_, bps);
  gemv_plan_bps_ = bps;
  return gemv_tiles_per_split_;
}

absl::Status IntWeightGemm::RunGemv4(const void* x, int64_t m, void* y, DType y_dtype,
                                     cudaStream_t stream) {
  const int64_t n_tiles = n_padded_ / kTileN;
  const int64_t k_tiles = k_ / kTileK;
  const int64_t per = Gemv4TilesPerSplit();
  const int64_t splits = (k_tiles + per - 1) / per;
  float* workspace = nullptr;
  int* counters = nullptr;
  if (splits > 1) {
    QSHARD_ASSIGN_OR_RETURN(const Quant8Scratch s,
                            GetQuant8Scratch(0, 0, 0, splits * m * n_, n_tiles, stream));
    workspace = static_cast<float*>(s.partials);
    counters = s.counters;
  }
  const int vec_store = (n_ % 2 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0) ? 1 : 0;
  QSHARD_CUDA_RETURN_IF_ERROR(LaunchPdl(
      IntGemv4Kernel, dim3(static_cast<unsigned>(n_tiles), static_cast<unsigned>(splits)),
      dim3(kThreads), kGemvSmemBytes, stream, static_cast<const bf16*>(x), codes_.as<uint4>(),
      scale_zero_.as<uint32_t>(), kblock_info_.as<int32_t>(), static_cast<int>(m),
      static_cast<int>(k_), static_cast<int>(n_), static_cast<int>(n_padded_),
      static_cast<int>(per), y, y_dtype == DType::kBF16 ? 1 : 0, vec_store, workspace, counters));
  return absl::OkStatus();
}

bool IntWeightGemm::UsesFactoredScales(int64_t m) const {
  return bits_ == 4 && integer_zero_points_ && m <= kMediumMaxM && IntGemmFactoredScalesEnabled();
}

int64_t IntWeightGemm::weight_bytes() const {
  return static_cast<int64_t>(codes_.size() + scale_zero_.size() + kblock_info_.size() +
                              perm_.size());
}

std::string IntWeightGemm::kernel_name() const {
  std::string g = group_size_ == -1  ? "gall"
                  : group_size_ == 0 ? "gvar"
                                     : absl::StrCat("g", group_size_);
  return absl::StrCat("cuda-marlin-w", bits_, "-", g, act_order_ ? "-actorder" : "");
}

}  // namespace qshard::cuda
