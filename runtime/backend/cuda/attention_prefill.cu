// Tensor-core paged attention for prefill and mixed steps (LaunchPagedPrefillAttentionTc in
// attention.h): the FlashAttention-2 algorithm (Dao, 2023) over the paged KV cache, written
// for mma.sync m16n8k16 with fp32 accumulation. Same semantics and outputs as the CUDA-core
// kernel in attention.cu; bf16 activations only, caches bf16 / f16 / fp8 e4m3 / e5m2.
//
// ---- Work decomposition --------------------------------------------------------------------
// A CTA (4 warps, 128 threads) owns kBM = 64 "query rows" (token, query head) that share one
// KV head, exactly as the CUDA-core kernel forms them: `tile_tokens` consecutive tokens of
// one sequence times `heads_per_cta` heads of one GQA group, row r = (token r / gc, head
// r % gc). So one K/V tile in shared memory serves every head of the group (GQA sharing),
// and a short sequence (a decode token of a mixed step) still fills gc rows. Warp w owns rows
// 16w .. 16w + 15: its Q fragments stay in registers for the whole kernel, and it computes
// S = Q K^T (16 x 64), the online softmax and O += P V (16 x D) for those rows alone; the 4
// warps share only the K/V tiles.
//
// Grid: x = query tiles of all sequences, packed; y = KV heads x head subgroups. Sequence s
// owns the tile indices [F(s), F(s + 1)) with F(s) = s + floor(query_start[s] / tile_tokens):
// F(s + 1) - F(s) = 1 + floor(qs[s+1] / tt) - floor(qs[s] / tt) >= 1 + floor(q_len / tt) >=
// ceil(q_len / tt), so every tile of s has an index, F is strictly increasing (a CTA finds
// its sequence with a binary search over query_start) and gridDim.x = F(S) = S + T / tt
// bounds the total on the host without reading query_start. Indices past a sequence's last
// tile (at most one per sequence) exit at once. blockIdx.x is reversed (tile index =
// gridDim.x - 1 - blockIdx.x): a sequence's last query tiles see the longest context, so the
// heaviest CTAs start first and the light ones fill the tail.
//
// ---- K/V tiles -----------------------------------------------------------------------------
// The CTA's keys are positions [0, kv_end), kv_end = 1 + max position of its tokens (tiles
// entirely above the causal diagonal of every row are never loaded), in tiles of kBN = 64
// positions. Key j of a tile is position pos = tile_start + j, found through the block table:
// cache row ((table[pos / block_size] * KVH + kvh) * block_size + pos % block_size) * D (any
// block_size >= 1; a shift when it is a power of two). 16-byte cp.async.cg (L2 only: a tile
// is reused by other CTAs, not by this one) copies every row into shared memory; positions
// >= kv_end (and a -1 table entry) are zero-filled instead of read (src-size 0): those slots
// were never written (the tests poison them with NaN), and a masked p = 0 times a NaN V would
// still be NaN in the mma.
//   bf16 / f16 caches: two stages of [kBN, D + 8] K and V; the copy of tile n + 1 is issued
//   right after the barrier that opens tile n, so it overlaps tile n's math:
//     for n: wait_group 0 (this thread's copies of tile n landed); __syncthreads (everyone's
//            landed; everyone finished tile n - 1, so stage (n + 1) % 2 is free); issue tile
//            n + 1 into stage (n + 1) % 2; compute tile n from stage n % 2.
//   fp8 caches: the raw codes go through two cp.async stages [kBN, D] bytes, then each
//   thread converts its share to bf16 in one [kBN, D + 8] K and V buffer (a second barrier
//   before the math). The conversion is exact (every e4m3 / e5m2 value is a bf16 value):
//   the scales are applied outside the mma instead, k_scale folded into the score scale and
//   v_scale into the final 1 / l.
// Q (64 rows x D) arrives with tile 0, in stage 1's K buffer (fp8: the converted K buffer),
// which nothing else uses until the first loop barrier, after every warp has read its Q
// fragments. Rows padded by 8 elements (16 bytes): a row stride of 144 or 272 bytes moves
// each of the 8 rows one ldmatrix 8x8 matrix reads by 4 banks, so those reads are
// conflict-free.
//
// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 --------------------------
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type");
// lane = 0..31, gid = lane / 4 (groupID), tig = lane % 4 (threadID_in_group); each .b32
// register holds two 16-bit values, the lower-indexed one in the low half:
//   A (16 x 16, M x K, row-major): a0: (row gid, k 2tig..+1)      a1: (row gid + 8, k 2tig..+1)
//                                  a2: (row gid, k 2tig + 8..+9)  a3: (row gid + 8, k 2tig + 8..+9)
//   B (16 x 8, K x N, "col"):      b0: (k 2tig..+1, col gid)      b1: (k 2tig + 8..+9, col gid)
//   C/D (16 x 8, fp32):            c0, c1: (row gid, col 2tig, 2tig + 1)
//                                  c2, c3: (row gid + 8, col 2tig, 2tig + 1)
// ldmatrix.m8n8.x4: lanes 8i .. 8i + 7 give the 8 row addresses (16 bytes each) of matrix i,
// and register i receives matrix i with lane t holding (row t / 4, cols 2(t % 4), +1); with
// .trans it holds (rows 2(t % 4), +1 of column t / 4) instead. Below, lane's matrix is
// i = lane / 8 and its row within the matrix rr = lane % 8.
//   Q (A of S = Q K^T, k-step kk over head dims 16kk..16kk+15): matrices (rows 0-7, d 0-7),
//     (rows 8-15, d 0-7), (rows 0-7, d 8-15), (rows 8-15, d 8-15) = a0, a1, a2, a3:
//     lane address row 16w + (i % 2) * 8 + rr, dim 16kk + (i / 2) * 8.
//   K (B of S: K x N = dims x keys, "col" = each key's dims contiguous = a K row in shared
//     memory, so no transpose): for keys 16jp..16jp+15, matrices (keys 0-7, d 0-7),
//     (keys 0-7, d 8-15), (keys 8-15, d 0-7), (keys 8-15, d 8-15) = (b0, b1) of n-tile 2jp
//     and (b0, b1) of n-tile 2jp + 1 (lane t: key gid, dims 2tig..+1 = b's (k, col)):
//     lane address key 16jp + (i / 2) * 8 + rr, dim 16kk + (i % 2) * 8.
//   S (C, 8 n-tiles of 8 keys): s[j][0..1] = (row gid, keys 8j + 2tig, +1), s[j][2..3] = (row
//     gid + 8, same keys). P for the P V k-step kk2 (keys 16kk2..16kk2+15) is then the A
//     fragment with no data movement: a0 = s[2kk2][0..1], a1 = s[2kk2][2..3],
//     a2 = s[2kk2 + 1][0..1], a3 = s[2kk2 + 1][2..3] (rounded to bf16 / f16 pairs).
//   V (B of O += P V: K x N = keys x dims, but V rows are keys with dims contiguous, so
//     ldmatrix.trans): for keys 16kk2.., dims 16np.., matrices (keys 0-7, d 0-7), (keys 8-15,
//     d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15) give lane t (keys 2tig..+1, dim gid) =
//     b0, b1 of d-tile 2np and b0, b1 of d-tile 2np + 1:
//     lane address key 16kk2 + (i % 2) * 8 + rr, dim 16np + (i / 2) * 8.
//   O (C, D / 8 n-tiles of 8 dims): o[n][0..1] = (row gid, dims 8n + 2tig, +1),
//     o[n][2..3] = (row gid + 8, same dims).
//
// ---- Softmax and masking -------------------------------------------------------------------
// A thread holds two rows (h = 0: gid, h = 1: gid + 8) of its warp; their running max m[h]
// (in log2 units: x = score * softmax_scale * log2(e)) is kept identical across the 4 lanes
// of a quad (max over the quad with two xor-shuffles), the running sum l[h] is per-lane and
// summed over the quad once at the end. Per tile: x = -inf where key position >= the row's
// length positions[t] + 1 (only in tiles that reach past the CTA's smallest length; keys
// >= kv_end are in that case too), m_new = max(m, max x), O and l scaled by 2^(m - m_new),
// p = 2^(x - m_new). A row that has seen no key keeps m = -inf and uses 0 as the reference,
// so every exponent is 2^-inf = 0, never NaN (padding rows; a real row sees position 0 in
// tile 0). l sums the fp32 p, the P V mma uses p rounded to 16 bits (as FlashAttention).
// f16 caches run the f16 mma: Q (bf16) converted to f16 once in registers (exact for
// |q| in [2^-14, 65504], the range of an f16 model's activations), p rounded to f16.
//
// Output: 1 / l (times v_scale) applied in fp32, rounded once to bf16, staged through shared
// memory so each row leaves as 16-byte stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/attention.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/base/status_macros.h"

namespace qshard::cuda {
namespace {

using bf16 = __nv_bfloat16;

enum TcCacheKind : int { kTcBF16, kTcF16, kTcE4M3, kTcE5M2 };

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = kWarps * 16;  // query rows per CTA, 16 per warp
constexpr int kBN = 64;           // keys per K/V tile
constexpr int kPad = 8;           // 16-bit elements of padding per shared-memory row
static_assert(kBM == kBN, "Q is staged in one K tile buffer");

constexpr float kLog2e = 1.4426950408889634f;

struct TcParams {
  const bf16* q;           // [T, H * D]
  bf16* out;               // [T, H * D]
  const uint8_t* k_cache;  // [blocks, KVH, block_size, D] in the cache dtype
  const uint8_t* v_cache;
  float score_scale;  // softmax_scale * log2(e) (* k_scale for fp8)
  float out_scale;    // v_scale for fp8, else 1
  int num_seqs, num_heads, num_kv_heads, group;
  int block_size, block_shift;  // block_shift = log2(block_size), or -1
  const int32_t* positions;
  const int32_t* query_start;
  const int32_t* block_tables;
  int max_blocks_per_seq;
  int heads_per_cta, tile_tokens, subgroups;
};

template <int kKind, int D>
struct TcConfig {
  static constexpr bool kFp8 = kKind == kTcE4M3 || kKind == kTcE5M2;
  static constexpr int kStride = D + kPad;          // 16-bit elements per shared row
  static constexpr int kTileElems = kBN * kStride;  // one K or V tile (or the Q tile)
  static constexpr int kTileBytes = kTileElems * 2;
  static constexpr int kRawTileBytes = kBN * D;  // fp8 codes of one K or V tile
  // bf16 / f16: [stage 0 K][stage 0 V][stage 1 K][stage 1 V] (Q in stage 1 K).
  // fp8: [K][V] converted (Q in K), then raw [stage 0 K][stage 0 V][stage 1 K][stage 1 V].
  static constexpr int kSmemBytes = kFp8 ? 2 * kTileBytes + 4 * kRawTileBytes : 4 * kTileBytes;
  static_assert(D % 16 == 0, "head_dim");
};

// ---- PTX wrappers -----------------------------------------------------------------------

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; with pred false nothing is read (src-size 0) and the
// 16 destination bytes are zero-filled.
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)), "l"(gmem),
               "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem))
               : "memory");
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(smem))
               : "memory");
}

// c += a * b for one m16n8k16 tile; kF16 selects f16 inputs instead of bf16.
template <bool kF16>
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- end PTX wrappers -------------------------------------------------------------------

// Two floats -> one register of two 16-bit values (round to nearest even), `lo` in the low
// half: bf16, or f16 when kF16.
template <bool kF16>
__device__ __forceinline__ uint32_t Pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (kF16) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, sizeof(u));
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, sizeof(u));
  }
  return u;
}

// A bf16 pair -> the same values as an f16 pair.
__device__ __forceinline__ uint32_t Bf16x2ToF16x2(uint32_t u) {
  __nv_bfloat162 h;
  memcpy(&h, &u, sizeof(u));
  const float2 f = __bfloat1622float2(h);
  return Pack2<true>(f.x, f.y);
}

// Two fp8 codes (low byte = lower address) -> a bf16 pair holding the same values (exact:
// e4m3 and e5m2 have fewer significand bits and a smaller exponent range than bf16, and
// the f16 step in between is exact too).
template <int kKind>
__device__ __forceinline__ uint32_t Fp8x2ToBf16x2(unsigned short codes) {
  constexpr __nv_fp8_interpretation_t kInterp = kKind == kTcE4M3 ? __NV_E4M3 : __NV_E5M2;
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(codes, kInterp);
  const float2 f = __half22float2(__half2(raw));
  return Pack2<false>(f.x, f.y);
}

// grid: (S + T / tile_tokens, KVH * subgroups); block: kThreads; dynamic shared memory:
// TcConfig::kSmemBytes (see the file comment for the layout).
template <int kKind, int D>
__global__ void __launch_bounds__(kThreads) PagedPrefillTcKernel(const TcParams p) {
  using Cfg = TcConfig<kKind, D>;
  constexpr bool kFp8 = Cfg::kFp8;
  constexpr bool kF16 = kKind == kTcF16;
  constexpr int kStride = Cfg::kStride;
  constexpr int kTileElems = Cfg::kTileElems;
  constexpr int kChunks = D / 8;      // 16-byte chunks per 16-bit row
  constexpr int kRawChunks = D / 16;  // 16-byte chunks per fp8 row
  constexpr int kKSteps = D / 16;     // k-steps of S = Q K^T
  constexpr int kSTiles = kBN / 8;    // n-tiles of S (keys)
  constexpr int kOTiles = D / 8;      // n-tiles of O (dims)
  static_assert(kThreads % kChunks == 0 && (kBN * kChunks) % kThreads == 0, "tile loader");
  static_assert(kThreads % kRawChunks == 0 && (kBN * kRawChunks) % kThreads == 0, "fp8 loader");

  extern __shared__ __align__(16) unsigned char smem[];
  bf16* const tiles = reinterpret_cast<bf16*>(smem);
  // Q shares stage 1's K buffer (bf16 / f16) or the converted K buffer (fp8).
  bf16* const qs = kFp8 ? tiles : tiles + 2 * kTileElems;
  uint8_t* const raw = smem + 2 * Cfg::kTileBytes;  // fp8 only

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int gid = lane >> 2;
  const int tig = lane & 3;

  // ---- which sequence and query tile (file comment: F(s) = s + query_start[s] / tt) ----
  const int b = static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x);
  int lo = 0, hi = p.num_seqs;  // F(lo) <= b < F(hi), F(S) = gridDim.x
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (mid + p.query_start[mid] / p.tile_tokens <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int s = lo;
  const int q_begin = p.query_start[s];
  const int q_end = p.query_start[s + 1];
  const int tok0 = q_begin + (b - (s + q_begin / p.tile_tokens)) * p.tile_tokens;
  if (tok0 >= q_end) return;  // past this sequence's last tile (whole CTA leaves)
  const int kvh = blockIdx.y / p.subgroups;
  const int sub = blockIdx.y - kvh * p.subgroups;
  const int ntok = min(p.tile_tokens, q_end - tok0);
  const int g0 = sub * p.heads_per_cta;
  const int gc = min(p.heads_per_cta, p.group - g0);
  // Valid rows; row r = (token tok0 + r / gc, head head_base + r % gc).
  const int nrows = ntok * gc;
  const int head_base = kvh * p.group + g0;
  const int64_t row_stride = static_cast<int64_t>(p.num_heads) * D;  // elements per token

  // ---- Q rows (zero for padding rows) and tile 0 ----
  for (int i = tid; i < kBM * kChunks; i += kThreads) {
    const int r = i / kChunks;
    const int c = i - r * kChunks;
    const bf16* src = p.q;
    if (r < nrows) {
      src = p.q + (tok0 + r / gc) * row_stride + (head_base + r % gc) * D + c * 8;
    }
    CpAsync16(qs + r * kStride + c * 8, src, r < nrows);
  }

  // Key range: [0, kv_end) is what any row sees; every row sees [0, full_end).
  int kv_end = 0, full_end = INT_MAX;
  for (int i = lane; i < ntok; i += 32) {
    const int len = p.positions[tok0 + i] + 1;
    kv_end = max(kv_end, len);
    full_end = min(full_end, len);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    kv_end = max(kv_end, __shfl_xor_sync(0xffffffffu, kv_end, o));
    full_end = min(full_end, __shfl_xor_sync(0xffffffffu, full_end, o));
  }
  // This thread's two rows (h = 0: warp row gid, h = 1: gid + 8): causal length, 0 = padding.
  int row_len[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + gid + 8 * h;
    row_len[h] = r < nrows ? p.positions[tok0 + r / gc] + 1 : 0;
  }

  const int32_t* table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks_per_seq;
  // Byte offset of key `pos`'s row in the cache, or -1 when it must not be read.
  auto row_offset = [&](int pos, int row_bytes) -> int64_t {
    if (pos >= kv_end) return -1;
    const int bi = p.block_shift >= 0 ? pos >> p.block_shift : pos / p.block_size;
    const int32_t block = table[bi];
    if (block < 0) return -1;
    return ((static_cast<int64_t>(block) * p.num_kv_heads + kvh) * p.block_size +
            (pos - bi * p.block_size)) *
           row_bytes;
  };
  // Issues (does not commit) the copies of K/V tile `tile` into `stage`. Thread tid always
  // copies chunk tid % chunks of keys tid / chunks + it * (kThreads / chunks).
  auto issue_tile = [&](int tile, int stage) {
    const int tile_start = tile * kBN;
    if constexpr (!kFp8) {
      bf16* ks = tiles + 2 * stage * kTileElems;
      bf16* vs = ks + kTileElems;
      const int c = tid % kChunks;
#pragma unroll
      for (int it = 0; it < kBN * kChunks / kThreads; ++it) {
        const int j = tid / kChunks + it * (kThreads / kChunks);
        const int64_t off = row_offset(tile_start + j, D * 2);
        const int64_t src = off < 0 ? 0 : off + c * 16;
        CpAsync16(ks + j * kStride + c * 8, p.k_cache + src, off >= 0);
        CpAsync16(vs + j * kStride + c * 8, p.v_cache + src, off >= 0);
      }
    } else {
      uint8_t* kr = raw + 2 * stage * Cfg::kRawTileBytes;
      uint8_t* vr = kr + Cfg::kRawTileBytes;
      const int c = tid % kRawChunks;
#pragma unroll
      for (int it = 0; it < kBN * kRawChunks / kThreads; ++it) {
        const int j = tid / kRawChunks + it * (kThreads / kRawChunks);
        const int64_t off = row_offset(tile_start + j, D);
        const int64_t src = off < 0 ? 0 : off + c * 16;
        CpAsync16(kr + j * D + c * 16, p.k_cache + src, off >= 0);
        CpAsync16(vr + j * D + c * 16, p.v_cache + src, off >= 0);
      }
    }
  };

  issue_tile(0, 0);
  CpAsyncCommit();
  CpAsyncWaitAll();
  __syncthreads();

  // Q fragments for the whole kernel: qa[kk] = A of k-step kk (head dims 16kk..16kk+15).
  uint32_t qa[kKSteps][4];
  {
    const int i = lane >> 3, rr = lane & 7;
    const bf16* base = qs + (warp * 16 + (i & 1) * 8 + rr) * kStride + (i >> 1) * 8;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      LdMatrixX4(qa[kk], base + kk * 16);
      if constexpr (kF16) {
#pragma unroll
        for (int e = 0; e < 4; ++e) qa[kk][e] = Bf16x2ToF16x2(qa[kk][e]);
      }
    }
  }

  float o[kOTiles][4];
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};

  const int num_tiles = (kv_end + kBN - 1) / kBN;
  for (int tile = 0; tile < num_tiles; ++tile) {
    CpAsyncWaitAll();  // this thread's copies of `tile`
    __syncthreads();   // everyone's copies; everyone is done with tile - 1 (and with Q)
    if (tile + 1 < num_tiles) {
      issue_tile(tile + 1, (tile + 1) & 1);
      CpAsyncCommit();
    }
    const bf16* ks;
    const bf16* vs;
    if constexpr (kFp8) {
      // Raw stage tile & 1 -> the converted [kBN, D + 8] K and V (thread: 16 codes -> 16
      // bf16 = two 16-byte stores per chunk).
      const uint8_t* kr = raw + 2 * (tile & 1) * Cfg::kRawTileBytes;
      const uint8_t* vr = kr + Cfg::kRawTileBytes;
      bf16* kc = tiles;
      bf16* vc = tiles + kTileElems;
#pragma unroll
      for (int it = 0; it < kBN * kRawChunks / kThreads; ++it) {
        const int i = tid + it * kThreads;
        const int j = i / kRawChunks;
        const int c = i - j * kRawChunks;
#pragma unroll
        for (int which = 0; which < 2; ++which) {
          const uint4 codes =
              *reinterpret_cast<const uint4*>((which == 0 ? kr : vr) + j * D + c * 16);
          const unsigned short* pairs = reinterpret_cast<const unsigned short*>(&codes);
          uint4 lo_half, hi_half;
          lo_half.x = Fp8x2ToBf16x2<kKind>(pairs[0]);
          lo_half.y = Fp8x2ToBf16x2<kKind>(pairs[1]);
          lo_half.z = Fp8x2ToBf16x2<kKind>(pairs[2]);
          lo_half.w = Fp8x2ToBf16x2<kKind>(pairs[3]);
          hi_half.x = Fp8x2ToBf16x2<kKind>(pairs[4]);
          hi_half.y = Fp8x2ToBf16x2<kKind>(pairs[5]);
          hi_half.z = Fp8x2ToBf16x2<kKind>(pairs[6]);
          hi_half.w = Fp8x2ToBf16x2<kKind>(pairs[7]);
          bf16* dst = (which == 0 ? kc : vc) + j * kStride + c * 16;
          *reinterpret_cast<uint4*>(dst) = lo_half;
          *reinterpret_cast<uint4*>(dst + 8) = hi_half;
        }
      }
      __syncthreads();  // the converted tile is complete
      ks = kc;
      vs = vc;
    } else {
      ks = tiles + 2 * (tile & 1) * kTileElems;
      vs = ks + kTileElems;
    }
    const int tile_start = tile * kBN;

    // ---- S = Q K^T: 16 rows x 64 keys per warp ----
    float sc[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
    {
      const int i = lane >> 3, rr = lane & 7;
      const bf16* base = ks + ((i >> 1) * 8 + rr) * kStride + (i & 1) * 8;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int jp = 0; jp < kSTiles / 2; ++jp) {
          uint32_t kb[4];
          LdMatrixX4(kb, base + jp * 16 * kStride + kk * 16);
          Mma16816<kF16>(sc[2 * jp], qa[kk], kb[0], kb[1]);
          Mma16816<kF16>(sc[2 * jp + 1], qa[kk], kb[2], kb[3]);
        }
      }
    }

    // ---- mask, online softmax; sc becomes p ----
    const bool need_mask = tile_start + kBN > full_end;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = tile_start + 8 * j + 2 * tig + e;
          float x = sc[j][2 * h + e] * p.score_scale;
          if (need_mask && key >= row_len[h]) x = -INFINITY;
          sc[j][2 * h + e] = x;
          tile_max = fmaxf(tile_max, x);
        }
      }
      // The 4 lanes of a quad hold the row's 64 keys.
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      const float m_new = fmaxf(m[h], tile_max);
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(m[h] - m_ref);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = exp2f(sc[j][2 * h + e] - m_ref);
          sc[j][2 * h + e] = pr;
          sum += pr;
        }
      }
      l[h] = l[h] * alpha + sum;
      m[h] = m_new;
#pragma unroll
      for (int n = 0; n < kOTiles; ++n) {
        o[n][2 * h] *= alpha;
        o[n][2 * h + 1] *= alpha;
      }
    }

    // ---- O += P V ----
    {
      const int i = lane >> 3, rr = lane & 7;
      const bf16* base = vs + ((i & 1) * 8 + rr) * kStride + (i >> 1) * 8;
#pragma unroll
      for (int kk2 = 0; kk2 < kBN / 16; ++kk2) {
        const uint32_t pa[4] = {Pack2<kF16>(sc[2 * kk2][0], sc[2 * kk2][1]),
                                Pack2<kF16>(sc[2 * kk2][2], sc[2 * kk2][3]),
                                Pack2<kF16>(sc[2 * kk2 + 1][0], sc[2 * kk2 + 1][1]),
                                Pack2<kF16>(sc[2 * kk2 + 1][2], sc[2 * kk2 + 1][3])};
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t vb[4];
          LdMatrixX4Trans(vb, base + kk2 * 16 * kStride + np * 16);
          Mma16816<kF16>(o[2 * np], pa, vb[0], vb[1]);
          Mma16816<kF16>(o[2 * np + 1], pa, vb[2], vb[3]);
        }
      }
    }
  }

  // ---- epilogue: O / l, bf16, through shared memory (the first tile buffer) ----
  __syncthreads();  // every warp is done with the K/V buffers; no copy is in flight
  float inv[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = l[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[h] = sum > 0.0f ? p.out_scale / sum : 0.0f;
  }
  bf16* os = tiles;  // [kBM, kStride]; warp w writes and reads only its rows 16w..16w+15
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      *reinterpret_cast<uint32_t*>(os + (warp * 16 + gid + 8 * h) * kStride + 8 * n + 2 * tig) =
          Pack2<false>(o[n][2 * h] * inv[h], o[n][2 * h + 1] * inv[h]);
    }
  }
  __syncwarp();
  for (int i = lane; i < 16 * kChunks; i += 32) {
    const int r = warp * 16 + i / kChunks;
    const int c = i % kChunks;
    if (r < nrows) {
      *reinterpret_cast<uint4*>(p.out + (tok0 + r / gc) * row_stride + (head_base + r % gc) * D +
                                c * 8) = *reinterpret_cast<const uint4*>(os + r * kStride + c * 8);
    }
  }
}

int TcKindOf(DType t) {
  switch (t) {
    case DType::kBF16:
      return kTcBF16;
    case DType::kF16:
      return kTcF16;
    case DType::kF8E4M3:
      return kTcE4M3;
    case DType::kF8E5M2:
      return kTcE5M2;
    default:
      return -1;
  }
}

bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <int kKind, int D>
absl::Status LaunchTc(const TcParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int kSmem = TcConfig<kKind, D>::kSmemBytes;
  auto* kernel = PagedPrefillTcKernel<kKind, D>;
  if (kSmem > 48 * 1024) {
    QSHARD_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  }
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckPagedPrefillAttentionTc(const PagedAttentionArgs& a) {
  constexpr const char* kWho = "LaunchPagedPrefillAttentionTc: ";
  if (a.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(kWho, "activation dtype ",
                                                   std::string(DTypeName(a.dtype)),
                                                   " unsupported (bfloat16 only)"));
  }
  if (TcKindOf(a.cache_dtype) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWho, "cache dtype ", std::string(DTypeName(a.cache_dtype)),
                     " unsupported (bfloat16, float16, float8_e4m3fn, float8_e5m2)"));
  }
  if (a.head_dim != 64 && a.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWho, "head_dim ", a.head_dim, " unsupported (64, 128)"));
  }
  if (a.num_heads <= 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0 ||
      a.block_size <= 0 || a.num_tokens < 0 || a.num_seqs < 0 || a.max_blocks_per_seq < 0 ||
      a.num_tokens > INT32_MAX / 2 || a.num_seqs > INT32_MAX / 4 ||
      a.num_heads * a.head_dim > INT32_MAX / 2 || a.block_size > INT32_MAX / 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWho, "bad shape heads=", a.num_heads, " kv_heads=", a.num_kv_heads,
                     " block_size=", a.block_size, " T=", a.num_tokens, " S=", a.num_seqs));
  }
  if ((a.cache_dtype == DType::kF8E4M3 || a.cache_dtype == DType::kF8E5M2) &&
      !(a.k_scale > 0.0f && a.v_scale > 0.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(kWho, "fp8 scales must be > 0"));
  }
  const int64_t group = a.num_heads / a.num_kv_heads;
  const int64_t subgroups = (group + kBM - 1) / kBM;  // heads_per_cta = min(group, kBM)
  if (a.num_kv_heads * subgroups > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWho, "kv_heads=", a.num_kv_heads, " over the grid's y limit"));
  }
  // 16-byte copies of q rows, cache rows and output rows.
  if (!Aligned16(a.q) || !Aligned16(a.out) || !Aligned16(a.k_cache) || !Aligned16(a.v_cache)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWho, "q, out, k_cache and v_cache must be 16-byte aligned"));
  }
  return absl::OkStatus();
}

absl::Status LaunchPagedPrefillAttentionTc(const PagedAttentionArgs& a, cudaStream_t stream) {
  QSHARD_RETURN_IF_ERROR(CheckPagedPrefillAttentionTc(a));
  if (a.num_tokens == 0 || a.num_seqs == 0 || a.max_query_len <= 0 || a.max_context_len <= 0) {
    return absl::OkStatus();
  }
  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  TcParams p{};
  p.q = static_cast<const bf16*>(a.q);
  p.out = static_cast<bf16*>(a.out);
  p.k_cache = static_cast<const uint8_t*>(a.k_cache);
  p.v_cache = static_cast<const uint8_t*>(a.v_cache);
  const bool fp8 = a.cache_dtype == DType::kF8E4M3 || a.cache_dtype == DType::kF8E5M2;
  p.score_scale = a.softmax_scale * kLog2e * (fp8 ? a.k_scale : 1.0f);
  p.out_scale = fp8 ? a.v_scale : 1.0f;
  p.num_seqs = static_cast<int>(a.num_seqs);
  p.num_heads = static_cast<int>(a.num_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = group;
  p.block_size = static_cast<int>(a.block_size);
  p.block_shift = -1;
  if ((a.block_size & (a.block_size - 1)) == 0) {
    p.block_shift = 0;
    while ((int64_t{1} << p.block_shift) < a.block_size) ++p.block_shift;
  }
  p.positions = a.positions;
  p.query_start = a.query_start;
  p.block_tables = a.block_tables;
  p.max_blocks_per_seq = static_cast<int>(a.max_blocks_per_seq);
  p.heads_per_cta = std::min(group, kBM);
  p.tile_tokens = kBM / p.heads_per_cta;
  p.subgroups = (group + p.heads_per_cta - 1) / p.heads_per_cta;
  // F(S) = S + T / tile_tokens query tiles (file comment; < 2^31 by the checks on S and T);
  // KV heads x subgroups on y (checked <= 65535).
  const int64_t tiles = a.num_seqs + a.num_tokens / p.tile_tokens;
  const int64_t heads = a.num_kv_heads * p.subgroups;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(heads));
  const int kind = TcKindOf(a.cache_dtype);
  const bool d64 = a.head_dim == 64;
  switch (kind) {
    case kTcBF16:
      return d64 ? LaunchTc<kTcBF16, 64>(p, grid, stream) : LaunchTc<kTcBF16, 128>(p, grid, stream);
    case kTcF16:
      return d64 ? LaunchTc<kTcF16, 64>(p, grid, stream) : LaunchTc<kTcF16, 128>(p, grid, stream);
    case kTcE4M3:
      return d64 ? LaunchTc<kTcE4M3, 64>(p, grid, stream) : LaunchTc<kTcE4M3, 128>(p, grid, stream);
    default:
      return d64 ? LaunchTc<kTcE5M2, 64>(p, grid, stream) : LaunchTc<kTcE5M2, 128>(p, grid, stream);
  }
}

}  // namespace qshard::cuda
