// KV cache write and paged causal GQA attention.
//
// KV write: one thread per (token, kv head, element) for K and V; a negative slot skips the
// token. fp8 stores use the hardware/CUDA conversion with round-to-nearest-even and
// __NV_SATFINITE, of value * (1 / scale) formed in fp32, which is bit-for-bit what
// cpu::StoreKvRow does.
//
// Attention: one kernel for decode, prefill and mixed steps. A CTA owns a set of "query
// rows" (token, query head) that share one KV head: `tile_tokens` consecutive tokens of one
// sequence times `heads_per_cta` heads of one GQA group. It streams that sequence's K/V
// through shared memory in tiles of kTile = 32 positions (converted from the cache dtype to
// fp32 once per tile, shared by every query row of the CTA: that is the GQA sharing), and
// each warp owns RPW query rows:
//   - scores: lane j takes key j of the tile and computes its dot product with each of the
//     warp's rows (K row from shared memory as float4, conflict-free thanks to a 4-float row
//     pad; q rows are broadcast reads);
//   - causal mask per row (key position < positions[t] + 1), online softmax in fp32 (running
//     max m and sum l per row, rescale by exp(m_old - m_new));
//   - P.V: lane owns output dims lane + 32c; p_j is broadcast with a shuffle and the V row
//     is read once per warp for all its rows.
// Global loads of K/V are 16-byte vectors (row = head_dim * elem_size bytes, a multiple of
// 16 for head_dim 64/128 in every cache dtype), coalesced along the row, and the next tile's
// vectors are requested into registers before the current tile is computed (a register
// double buffer), so the load latency overlaps the math without a second shared buffer.
//
// Decode (every sequence has one query token): RPW = 1, 4..8 warps = the GQA group, and the
// context is split over gridDim.z (split-K) when (seq, kv head) CTAs alone would not fill
// the GPU; each split writes an unnormalized partial (m, l, acc) to the workspace and a
// second kernel combines them: out = sum_z acc_z e^(m_z - M) / sum_z l_z e^(m_z - M).
// Prefill / mixed: RPW = 4, 8 warps = 32 query rows per CTA, no split.
//
// Shapes: q/out [T, H * D]; caches [blocks, KVH, block_size, D]; block_tables [S, max_blocks].
// This is a CUDA-core (fp32 FMA) implementation: correct for every dtype. Prefill and mixed
// steps with bf16 activations can take the tensor-core kernel of attention_prefill.cu
// instead (the default; SetTensorCorePrefillAttention / QSHARD_CUDA_TC_ATTENTION=0).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/attention.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/device_convert.cuh"
#include "runtime/backend/cuda/pdl.cuh"
#include "runtime/backend/cuda/rope.cuh"
#include "runtime/base/status_macros.h"

namespace qshard::cuda {
namespace {

using bf16 = __nv_bfloat16;

enum CacheKind : int { kCacheF32, kCacheBF16, kCacheF16, kCacheE4M3, kCacheE5M2 };

// Keys per shared-memory tile: one per lane in the score step.
constexpr int kTile = 32;
// Floats of padding per shared K/V row: lane j reads row j as float4, and a row stride of
// D + 4 floats shifts consecutive rows by 4 banks, so each 8-lane phase hits 32 distinct banks.
constexpr int kRowPad = 4;
// Split-K bounds for decode: every split covers at least AttentionMinSplitLen() positions
// (default 4 tiles), and there are at most kMaxSplits of them.
constexpr int64_t kDefaultMinSplitLen = 128;
constexpr int64_t kMaxSplits = 32;
std::atomic<int64_t> g_min_split_len{kDefaultMinSplitLen};
// Decode split boundaries are planned for the context rounded up to this (the CUDA
// backend's graph context bucket, kGraphContextBucket in cuda_backend.cc).
constexpr int64_t kSplitPlanBucket = 256;

template <int kKind>
struct CacheTraits;
template <>
struct CacheTraits<kCacheF32> {
  static constexpr int kBytes = 4;
};
template <>
struct CacheTraits<kCacheBF16> {
  static constexpr int kBytes = 2;
};
template <>
struct CacheTraits<kCacheF16> {
  static constexpr int kBytes = 2;
};
template <>
struct CacheTraits<kCacheE4M3> {
  static constexpr int kBytes = 1;
};
template <>
struct CacheTraits<kCacheE5M2> {
  static constexpr int kBytes = 1;
};

__device__ __forceinline__ float Fp8PairLo(unsigned short pair, __nv_fp8_interpretation_t kind,
                                           float* hi) {
  const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(pair, kind);
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&raw));
  *hi = f.y;
  return f.x;
}

// 16 raw cache bytes -> 16 / kBytes floats (fp8: times scale), in memory order.
template <int kKind>
__device__ __forceinline__ void DecodeVec(const uint4& raw, float scale,
                                          float (&out)[16 / CacheTraits<kKind>::kBytes]) {
  if constexpr (kKind == kCacheF32) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  } else if constexpr (kKind == kCacheBF16) {
    const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(p[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else if constexpr (kKind == kCacheF16) {
    const __half2* p = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(p[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  } else {
    constexpr __nv_fp8_interpretation_t kInterp = kKind == kCacheE4M3 ? __NV_E4M3 : __NV_E5M2;
    const unsigned short* p = reinterpret_cast<const unsigned short*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float hi;
      const float lo = Fp8PairLo(p[i], kInterp, &hi);  // low byte = lower address
      out[2 * i] = lo * scale;
      out[2 * i + 1] = hi * scale;
    }
  }
}

// One value into the cache at element index `idx`.
template <int kKind>
__device__ __forceinline__ void StoreCacheValue(void* base, int64_t idx, float v, float inv_scale) {
  if constexpr (kKind == kCacheF32) {
    static_cast<float*>(base)[idx] = v;
  } else if constexpr (kKind == kCacheBF16) {
    static_cast<bf16*>(base)[idx] = __float2bfloat16_rn(v);
  } else if constexpr (kKind == kCacheF16) {
    static_cast<__half*>(base)[idx] = __float2half_rn(v);
  } else {
    constexpr __nv_fp8_interpretation_t kInterp = kKind == kCacheE4M3 ? __NV_E4M3 : __NV_E5M2;
    static_cast<__nv_fp8_storage_t*>(base)[idx] =
        __nv_cvt_float_to_fp8(v * inv_scale, __NV_SATFINITE, kInterp);
  }
}

__device__ __forceinline__ float LoadAct(const void* p, int64_t idx, bool is_bf16) {
  return is_bf16 ? __bfloat162float(static_cast<const bf16*>(p)[idx])
                 : static_cast<const float*>(p)[idx];
}
__device__ __forceinline__ void StoreAct(void* p, int64_t idx, float v, bool is_bf16) {
  if (is_bf16) {
    static_cast<bf16*>(p)[idx] = __float2bfloat16_rn(v);
  } else {
    static_cast<float*>(p)[idx] = v;
  }
}

// ---------------------------------------------------------------------------
// KV write
// ---------------------------------------------------------------------------

// grid-stride over T * kv_heads * head_dim elements; each thread writes the K and the V
// element at the same index.
template <int kKind>
__global__ void KvWriteKernel(const void* __restrict__ k, const void* __restrict__ v,
                              bool act_bf16, int64_t T, int kv_heads, int head_dim,
                              const int32_t* __restrict__ slot_mapping, void* k_cache,
                              void* v_cache, int block_size, float k_inv_scale,
                              float v_inv_scale) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int64_t row_len = static_cast<int64_t>(kv_heads) * head_dim;
  const int64_t total = T * row_len;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / row_len;
    const int64_t hd = idx - t * row_len;  // h * head_dim + d
    const int32_t slot = slot_mapping[t];
    if (slot < 0) continue;
    const int64_t block = slot / block_size;
    const int64_t off = slot - block * block_size;
    const int64_t h = hd / head_dim;
    const int64_t d = hd - h * head_dim;
    const int64_t dst = ((block * kv_heads + h) * block_size + off) * head_dim + d;
    StoreCacheValue<kKind>(k_cache, dst, LoadAct(k, idx, act_bf16), k_inv_scale);
    StoreCacheValue<kKind>(v_cache, dst, LoadAct(v, idx, act_bf16), v_inv_scale);
  }
}

// The fused q|k|v Linear's output straight to attention's inputs (LaunchQkvRopeKvWrite):
// one thread per (token, head, pair i < half) over the q_heads + 2 * kv_heads heads of a
// qkv row (q's, then k's, then v's). It reads the pair (x[i], x[i + half]) of its head,
// rotates q and k pairs exactly as RopeKernel does (rope.cuh), rounds them to the
// activation type E and writes them to q / k / v, and for k and v heads also stores those
// rounded values into the cache slot, as KvWriteKernel would after reading them back: the
// same bits as SplitColumns + Rope + KvWrite, in one launch instead of three.
template <typename E, int kKind>
__global__ void QkvRopeKvWriteKernel(const E* __restrict__ qkv, E* __restrict__ q,
                                     E* __restrict__ k, E* __restrict__ v, int64_t T, int q_heads,
                                     int kv_heads, int half, const int32_t* __restrict__ positions,
                                     const float* __restrict__ inv_freq,
                                     const int32_t* __restrict__ slot_mapping, void* k_cache,
                                     void* v_cache, int block_size, float k_inv_scale,
                                     float v_inv_scale) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int heads = q_heads + 2 * kv_heads;
  const int head_dim = 2 * half;
  const int64_t total = T * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const auto [t, h, i] = SplitRopePairIndex(idx, heads, half);
    const E* src = qkv + (t * heads + h) * head_dim;
    E e1 = src[i], e2 = src[i + half];
    if (h < q_heads + kv_heads) {  // q or k: rotate
      float y1, y2;
      RopeRotatePair(positions[t], inv_freq[i], ToF32(e1), ToF32(e2), &y1, &y2);
      e1 = FromF32<E>(y1);
      e2 = FromF32<E>(y2);
    }
    if (h < q_heads) {
      E* dst = q + (t * q_heads + h) * head_dim;
      dst[i] = e1;
      dst[i + half] = e2;
      continue;
    }
    const bool is_k = h < q_heads + kv_heads;
    const int kh = is_k ? h - q_heads : h - q_heads - kv_heads;  // kv head
    E* dst = (is_k ? k : v) + (t * kv_heads + kh) * head_dim;
    dst[i] = e1;
    dst[i + half] = e2;
    const int32_t slot = slot_mapping[t];
    if (slot < 0) continue;
    const int64_t block = slot / block_size;
    const int64_t off = slot - block * block_size;
    const int64_t base = ((block * kv_heads + kh) * block_size + off) * head_dim;
    void* cache = is_k ? k_cache : v_cache;
    const float inv = is_k ? k_inv_scale : v_inv_scale;
    StoreCacheValue<kKind>(cache, base + i, ToF32(e1), inv);
    StoreCacheValue<kKind>(cache, base + i + half, ToF32(e2), inv);
  }
}

// ---------------------------------------------------------------------------
// Paged attention
// ---------------------------------------------------------------------------

struct AttnParams {
  const void* q;
  void* out;
  bool act_bf16;
  const void* k_cache;
  const void* v_cache;
  float k_scale, v_scale;
  int num_tokens, num_heads, num_kv_heads, group, block_size;
  float softmax_scale;
  const int32_t* positions;
  const int32_t* query_start;
  const int32_t* block_tables;
  int max_blocks_per_seq;
  // Work decomposition (see the file comment).
  int q_tiles;        // CTAs along the query tokens of one sequence
  int tile_tokens;    // tokens per CTA
  int heads_per_cta;  // query heads of one group per CTA
  int subgroups;      // ceil(group / heads_per_cta)
  int num_splits;     // gridDim.z
  int split_len;      // positions per split (multiple of kTile)
  float* ws_acc;      // [splits, T, H, D] unnormalized partial outputs
  float* ws_ml;       // [splits, T, H, 2] running max, sum
  // Non-null: the splits of a CTA column are combined by the last of them to finish (one
  // ticket per (blockIdx.x, blockIdx.y), zero on entry and left zero), not by
  // SplitCombineKernel.
  int* split_counters;
};

// Output element d of row `row` (= t * H + h) from the splits' partials:
// out = sum_z acc_z e^(m_z - M) / sum_z l_z e^(m_z - M), M = max_z m_z, in split order (so
// the result does not depend on which split finished first). Reads through L2 (__ldcg):
// the in-kernel combine reads partials that other CTAs wrote during the same launch.
__device__ __forceinline__ float CombineSplits(const float* ws_acc, const float* ws_ml,
                                               int num_splits, int64_t rows, int64_t row, int D,
                                               int d) {
  float M = -INFINITY;
  for (int z = 0; z < num_splits; ++z) M = fmaxf(M, __ldcg(ws_ml + 2 * (z * rows + row)));
  float L = 0.0f, a = 0.0f;
  for (int z = 0; z < num_splits; ++z) {
    const float mz = __ldcg(ws_ml + 2 * (z * rows + row));
    if (mz == -INFINITY) continue;  // an empty split (past this token's context)
    const float w = expf(mz - M);
    L = fmaf(__ldcg(ws_ml + 2 * (z * rows + row) + 1), w, L);
    a = fmaf(__ldcg(ws_acc + (z * rows + row) * D + d), w, a);
  }
  return a / L;
}

// Register budget via __launch_bounds__(256, min blocks): decode kernels (RPW = 1) are small
// and latency-bound, so they are held to ~80 registers (3 x 256 threads per SM) for
// occupancy, except with an fp32 cache whose register-prefetched tile is twice as large
// (128); prefill kernels (RPW = 4) keep 4 rows of state per warp and get what they need
// (ptxas then picks 120-170 with no spills).
template <int kKind, int RPW>
inline constexpr int kMinBlocks = RPW != 1 ? 1 : (kKind == kCacheF32 ? 2 : 3);

// grid: (S * q_tiles, KVH * subgroups, num_splits); block: 32 * warps; dynamic shared memory:
// K and V tiles [kTile, D + kRowPad] and q rows [warps * RPW, D], all fp32.
template <int kKind, int D, int RPW>
__global__ void __launch_bounds__(256, kMinBlocks<kKind, RPW>) PagedAttentionKernel(const AttnParams p) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  constexpr int kBytes = CacheTraits<kKind>::kBytes;
  constexpr int kElemsPerVec = 16 / kBytes;
  constexpr int kVecsPerRow = D * kBytes / 16;
  constexpr int kStride = D + kRowPad;
  constexpr int kDimsPerLane = D / 32;
  static_assert(D % 32 == 0 && (D * kBytes) % 16 == 0, "head_dim");

  extern __shared__ float4 smem4[];
  float* ks = reinterpret_cast<float*>(smem4);
  float* vs = ks + kTile * kStride;
  float* qs = vs + kTile * kStride;

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int rows_per_cta = (blockDim.x >> 5) * RPW;

  const int s = blockIdx.x / p.q_tiles;
  const int q_tile = blockIdx.x - s * p.q_tiles;
  const int kvh = blockIdx.y / p.subgroups;
  const int sub = blockIdx.y - kvh * p.subgroups;
  const int split = blockIdx.z;

  const int q_end = p.query_start[s + 1];
  const int tok0 = p.query_start[s] + q_tile * p.tile_tokens;
  if (tok0 >= q_end) return;  // this sequence has fewer query tiles (whole CTA leaves)
  const int ntok = min(p.tile_tokens, q_end - tok0);
  const int g0 = sub * p.heads_per_cta;
  const int gc = min(p.heads_per_cta, p.group - g0);
  const int nrows = ntok * gc;  // valid query rows of this CTA; row r = (token r / gc, head r % gc)
  const int head_base = kvh * p.group + g0;
  const int row_stride = p.num_heads * D;  // elements per token in q / out

  // Stage the q rows (fp32) and find how far this CTA's tokens see.
  for (int i = threadIdx.x; i < rows_per_cta * D; i += blockDim.x) {
    const int r = i / D;
    const int d = i - r * D;
    float val = 0.0f;
    if (r < nrows) {
      const int t = tok0 + r / gc;
      const int h = head_base + r % gc;
      val = LoadAct(p.q, static_cast<int64_t>(t) * row_stride + h * D + d, p.act_bf16);
    }
    qs[i] = val;
  }
  int kv_end = 0;
  for (int i = 0; i < ntok; ++i) kv_end = max(kv_end, p.positions[tok0 + i] + 1);

  // Per-row state: causal length (0 for a padding row), running max / sum, output dims.
  int len[RPW];
  float m[RPW], l[RPW], acc[RPW][kDimsPerLane];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp * RPW + i;
    len[i] = r < nrows ? p.positions[tok0 + r / gc] + 1 : 0;
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] = 0.0f;
  }

  const int begin = split * p.split_len;
  const int end = min(begin + p.split_len, kv_end);
  const int32_t* table = p.block_tables + static_cast<int64_t>(s) * p.max_blocks_per_seq;
  const uint8_t* k_base = static_cast<const uint8_t*>(p.k_cache);
  const uint8_t* v_base = static_cast<const uint8_t*>(p.v_cache);

  // K/V tiles are double-buffered through registers: the raw 16-byte vectors of tile n+1
  // are requested before tile n is computed, so their latency overlaps the math. A thread
  // holds kLoads vectors of K and of V (blockDim.x >= kMinThreads by construction: decode
  // uses 4..8 warps, prefill 8). Slots past the tile (or behind a -1 table entry) stay zero, which decodes
  // to 0.0 in every cache format: p = 0 times V stays 0, never NaN.
  constexpr int kVecsPerTile = kTile * kVecsPerRow;
  constexpr int kMinThreads = RPW == 1 ? 128 : 256;
  constexpr int kLoads = (kVecsPerTile + kMinThreads - 1) / kMinThreads;
  uint4 kraw[kLoads], vraw[kLoads];
  auto fetch = [&](int tile_start) {
    const int tile_n = min(kTile, end - tile_start);
#pragma unroll
    for (int it = 0; it < kLoads; ++it) {
      kraw[it] = make_uint4(0, 0, 0, 0);
      vraw[it] = make_uint4(0, 0, 0, 0);
      const int i = threadIdx.x + it * blockDim.x;
      const int j = i / kVecsPerRow;
      if (i < kVecsPerTile && j < tile_n) {
        const int pos = tile_start + j;
        const int32_t block = table[pos / p.block_size];
        if (block >= 0) {
          const int64_t row =
              (static_cast<int64_t>(block) * p.num_kv_heads + kvh) * p.block_size +
              (pos % p.block_size);
          const int64_t byte_off = row * (D * kBytes) + (i - j * kVecsPerRow) * 16;
          kraw[it] = __ldg(reinterpret_cast<const uint4*>(k_base + byte_off));
          vraw[it] = __ldg(reinterpret_cast<const uint4*>(v_base + byte_off));
        }
      }
    }
  };
  if (begin < end) fetch(begin);

  for (int tile_start = begin; tile_start < end; tile_start += kTile) {
    const int tile_n = min(kTile, end - tile_start);
    __syncthreads();  // every warp is done reading the previous tile
#pragma unroll
    for (int it = 0; it < kLoads; ++it) {
      const int i = threadIdx.x + it * blockDim.x;
      if (i < kVecsPerTile) {
        const int j = i / kVecsPerRow;
        const int col = (i - j * kVecsPerRow) * kElemsPerVec;
        float kf[kElemsPerVec], vf[kElemsPerVec];
        DecodeVec<kKind>(kraw[it], p.k_scale, kf);
        DecodeVec<kKind>(vraw[it], p.v_scale, vf);
        float4* kdst = reinterpret_cast<float4*>(ks + j * kStride + col);
        float4* vdst = reinterpret_cast<float4*>(vs + j * kStride + col);
#pragma unroll
        for (int e = 0; e < kElemsPerVec / 4; ++e) {
          kdst[e] = make_float4(kf[4 * e], kf[4 * e + 1], kf[4 * e + 2], kf[4 * e + 3]);
          vdst[e] = make_float4(vf[4 * e], vf[4 * e + 1], vf[4 * e + 2], vf[4 * e + 3]);
        }
      }
    }
    __syncthreads();
    if (tile_start + kTile < end) fetch(tile_start + kTile);

    // Scores of key `lane` against the warp's rows.
    float sc[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) sc[i] = 0.0f;
    const float4* krow = reinterpret_cast<const float4*>(ks + lane * kStride);
    const float4* qrow = reinterpret_cast<const float4*>(qs + warp * RPW * D);
#pragma unroll 8
    for (int d4 = 0; d4 < D / 4; ++d4) {
      const float4 kv = krow[d4];
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const float4 qv = qrow[i * (D / 4) + d4];
        sc[i] = fmaf(qv.x, kv.x, sc[i]);
        sc[i] = fmaf(qv.y, kv.y, sc[i]);
        sc[i] = fmaf(qv.z, kv.z, sc[i]);
        sc[i] = fmaf(qv.w, kv.w, sc[i]);
      }
    }
    const int key_pos = tile_start + lane;
    float pr[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const bool valid = lane < tile_n && key_pos < len[i];
      const float x = valid ? sc[i] * p.softmax_scale : -INFINITY;
      float tile_max = x;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      const float m_new = fmaxf(m[i], tile_max);
      // A row with no visible key yet keeps m = -inf; use 0 as the reference so every
      // exponent below is exp(-inf) = 0 instead of exp(-inf + inf) = NaN.
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[i] - m_ref);
      pr[i] = expf(x - m_ref);
      float psum = pr[i];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
      l[i] = l[i] * alpha + psum;
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] *= alpha;
    }
    // P.V: V rows beyond tile_n are zeros and their p is 0.
    for (int j = 0; j < tile_n; ++j) {
      float vv[kDimsPerLane];
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) vv[c] = vs[j * kStride + lane + 32 * c];
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const float pj = __shfl_sync(0xffffffffu, pr[i], j);
#pragma unroll
        for (int c = 0; c < kDimsPerLane; ++c) acc[i][c] = fmaf(pj, vv[c], acc[i][c]);
      }
    }
  }

  // Results. Query row r of this CTA is (token tok0 + r / gc, head head_base + r % gc).
  const auto row_token = [&](int r) { return tok0 + r / gc; };
  const auto row_head = [&](int r) { return head_base + r % gc; };
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp * RPW + i;
    if (r >= nrows) continue;
    const int t = row_token(r);
    const int h = row_head(r);
    if (p.num_splits == 1) {
      const float inv = 1.0f / l[i];
      const int64_t o = static_cast<int64_t>(t) * row_stride + h * D + lane;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) StoreAct(p.out, o + 32 * c, acc[i][c] * inv, p.act_bf16);
    } else {
      const int64_t prow = (static_cast<int64_t>(split) * p.num_tokens + t) * p.num_heads + h;
      float* wa = p.ws_acc + prow * D + lane;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) wa[32 * c] = acc[i][c];
      if (lane == 0) {
        p.ws_ml[2 * prow] = m[i];
        p.ws_ml[2 * prow + 1] = l[i];
      }
    }
  }
  if (p.num_splits == 1 || p.split_counters == nullptr) return;

  // In-kernel combine: the last split of this CTA column to finish combines the column's
  // rows (the other splits' partials are complete and visible once their tickets are in:
  // each fenced its stores before taking one) and puts the ticket back to zero for the
  // next launch. The same arithmetic in the same order as SplitCombineKernel: same bits.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int* ticket = p.split_counters + blockIdx.y * gridDim.x + blockIdx.x;
    is_last = atomicAdd(ticket, 1) == static_cast<int>(gridDim.z) - 1;
    if (is_last) *ticket = 0;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int64_t rows_total = static_cast<int64_t>(p.num_tokens) * p.num_heads;
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp * RPW + i;
    if (r >= nrows) continue;
    const int64_t row = static_cast<int64_t>(row_token(r)) * p.num_heads + row_head(r);
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) {
      const int d = lane + 32 * c;
      StoreAct(p.out, row * D + d,
               CombineSplits(p.ws_acc, p.ws_ml, p.num_splits, rows_total, row, D, d), p.act_bf16);
    }
  }
}

// grid: T * H; block: D threads (one output dim each). Combines the splits' partials.
__global__ void SplitCombineKernel(const float* __restrict__ ws_acc, const float* __restrict__ ws_ml,
                                   int num_splits, int64_t rows, int D, void* out, bool act_bf16) {
  PdlWait();  // launched with LaunchPdl: the inputs are ready after this (pdl.cuh)
  PdlLaunchDependents();
  const int64_t row = blockIdx.x;  // t * H + h
  const int d = threadIdx.x;
  StoreAct(out, row * D + d, CombineSplits(ws_acc, ws_ml, num_splits, rows, row, D, d), act_bf16);
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

int CacheKindOf(DType t) {
  switch (t) {
    case DType::kF32:
      return kCacheF32;
    case DType::kBF16:
      return kCacheBF16;
    case DType::kF16:
      return kCacheF16;
    case DType::kF8E4M3:
      return kCacheE4M3;
    case DType::kF8E5M2:
      return kCacheE5M2;
    default:
      return -1;
  }
}

bool IsFp8Kind(int kind) { return kind == kCacheE4M3 || kind == kCacheE5M2; }

template <int K>
struct KindTag {
  static constexpr int value = K;
};

template <typename F>
auto DispatchKind(int kind, F&& f) {
  switch (kind) {
    case kCacheBF16:
      return f(KindTag<kCacheBF16>{});
    case kCacheF16:
      return f(KindTag<kCacheF16>{});
    case kCacheE4M3:
      return f(KindTag<kCacheE4M3>{});
    case kCacheE5M2:
      return f(KindTag<kCacheE5M2>{});
    default:
      return f(KindTag<kCacheF32>{});
  }
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tensor-core prefill switch: on unless QSHARD_CUDA_TC_ATTENTION=0 at first use, then
// whatever SetTensorCorePrefillAttention stored.
EnvFlag& TensorCorePrefillFlag() {
  static EnvFlag flag("QSHARD_CUDA_TC_ATTENTION", /*default_on=*/true);
  return flag;
}

EnvFlag& FusedCombineFlag() {
  static EnvFlag flag("QSHARD_CUDA_FUSED_COMBINE", /*default_on=*/false);
  return flag;
}

EnvFlag& FusedRopeKvFlag() {
  static EnvFlag flag("QSHARD_CUDA_FUSED_ROPE_KV", /*default_on=*/false);
  return flag;
}

// The current device's SM count, asked of the driver once per device (not per launch).
absl::StatusOr<int> CurrentDeviceSms() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices] = {};
  int device = 0;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  if (device >= 0 && device < kMaxDevices) {
    if (const int v = cached[device].load(std::memory_order_relaxed); v > 0) return v;
  }
  int sms = 0;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) cached[device].store(sms, std::memory_order_relaxed);
  return sms;
}

int64_t MaxSplitsFor(int64_t max_context_len) {
  return std::clamp<int64_t>(max_context_len / AttentionMinSplitLen(), 1, kMaxSplits);
}

template <int kKind, int D, int RPW>
absl::Status LaunchAttentionKernel(const AttnParams& params, dim3 grid, int warps,
                                   cudaStream_t stream) {
  const int rows = warps * RPW;
  const size_t smem = (2 * kTile * (D + kRowPad) + rows * D) * sizeof(float);
  auto* kernel = PagedAttentionKernel<kKind, D, RPW>;
  if (smem > 48 * 1024) {
    QSHARD_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  (void)LaunchPdl(kernel, dim3(grid), dim3(warps * 32), smem, stream, params);
  QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace

absl::Status LaunchKvWrite(const void* k, const void* v, DType act_dtype, int64_t T,
                           int64_t kv_heads, int64_t head_dim, const int32_t* slot_mapping,
                           void* k_cache, void* v_cache, DType cache_dtype, int64_t block_size,
                           float k_scale, float v_scale, cudaStream_t stream) {
  if (act_dtype != DType::kF32 && act_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchKvWrite: activation dtype ", std::string(DTypeName(act_dtype))));
  }
  const int kind = CacheKindOf(cache_dtype);
  if (kind < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchKvWrite: cache dtype ", std::string(DTypeName(cache_dtype))));
  }
  if (T < 0 || kv_heads <= 0 || head_dim <= 0 || block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchKvWrite: bad shape T=", T, " kv_heads=",
                                                   kv_heads, " head_dim=", head_dim,
                                                   " block_size=", block_size));
  }
  if (IsFp8Kind(kind) && !(k_scale > 0.0f && v_scale > 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchKvWrite: fp8 scales must be > 0, got ", k_scale, ", ", v_scale));
  }
  const int64_t total = T * kv_heads * head_dim;
  if (total == 0) return absl::OkStatus();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(CeilDiv(total, kThreads), 8192);
  // 1 / scale on the host, as cpu::StoreKvRow passes it to QuantizeE4M3 / E5M2.
  const float k_inv = IsFp8Kind(kind) ? 1.0f / k_scale : 1.0f;
  const float v_inv = IsFp8Kind(kind) ? 1.0f / v_scale : 1.0f;
  return DispatchKind(kind, [&](auto tag) -> absl::Status {
    (void)LaunchPdl(KvWriteKernel<decltype(tag)::value>, dim3(blocks), dim3(kThreads), 0, stream, k,
                    v, act_dtype == DType::kBF16, T, static_cast<int>(kv_heads),
                    static_cast<int>(head_dim), slot_mapping, k_cache, v_cache,
                    static_cast<int>(block_size), k_inv, v_inv);
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status LaunchQkvRopeKvWrite(const QkvRopeKvWriteArgs& a, cudaStream_t stream) {
  if (a.act_dtype != DType::kF32 && a.act_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchQkvRopeKvWrite: activation dtype ",
                                                   std::string(DTypeName(a.act_dtype)),
                                                   " (expected float32 or bfloat16)"));
  }
  const int kind = CacheKindOf(a.cache_dtype);
  if (kind < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchQkvRopeKvWrite: cache dtype ", std::string(DTypeName(a.cache_dtype))));
  }
  if (a.num_tokens < 0 || a.q_heads <= 0 || a.kv_heads <= 0 || a.head_dim <= 0 ||
      a.head_dim % 2 != 0 || a.block_size <= 0 ||
      a.num_tokens * (a.q_heads + 2 * a.kv_heads) * a.head_dim > INT64_MAX / 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LaunchQkvRopeKvWrite: bad shape T=", a.num_tokens, " q_heads=", a.q_heads,
        " kv_heads=", a.kv_heads, " head_dim=", a.head_dim, " (even) block_size=", a.block_size));
  }
  if (IsFp8Kind(kind) && !(a.k_scale > 0.0f && a.v_scale > 0.0f)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LaunchQkvRopeKvWrite: fp8 scales must be > 0, got ", a.k_scale, ", ", a.v_scale));
  }
  const int64_t total = a.num_tokens * (a.q_heads + 2 * a.kv_heads) * (a.head_dim / 2);
  if (total == 0) return absl::OkStatus();
  if (a.qkv == nullptr || a.q == nullptr || a.k == nullptr || a.v == nullptr ||
      a.positions == nullptr || a.inv_freq == nullptr || a.slot_mapping == nullptr ||
      a.k_cache == nullptr || a.v_cache == nullptr) {
    return absl::InvalidArgumentError("LaunchQkvRopeKvWrite: a null pointer argument");
  }
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(CeilDiv(total, kThreads), 8192);
  // 1 / scale on the host, as LaunchKvWrite (and cpu::StoreKvRow) form it.
  const float k_inv = IsFp8Kind(kind) ? 1.0f / a.k_scale : 1.0f;
  const float v_inv = IsFp8Kind(kind) ? 1.0f / a.v_scale : 1.0f;
  return DispatchKind(kind, [&](auto tag) -> absl::Status {
    constexpr int kK = decltype(tag)::value;
    const auto launch = [&](auto* act) {  // act: a null E* naming the activation type
      using E = std::remove_pointer_t<decltype(act)>;
      (void)LaunchPdl(QkvRopeKvWriteKernel<E, kK>, dim3(blocks), dim3(kThreads), 0, stream,
                      static_cast<const E*>(a.qkv), static_cast<E*>(a.q), static_cast<E*>(a.k),
                      static_cast<E*>(a.v), a.num_tokens, static_cast<int>(a.q_heads),
                      static_cast<int>(a.kv_heads), static_cast<int>(a.head_dim / 2), a.positions,
                      a.inv_freq, a.slot_mapping, a.k_cache, a.v_cache,
                      static_cast<int>(a.block_size), k_inv, v_inv);
    };
    if (a.act_dtype == DType::kBF16) {
      launch(static_cast<bf16*>(nullptr));
    } else {
      launch(static_cast<float*>(nullptr));
    }
    QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
    return absl::OkStatus();
  });
}

absl::Status SetAttentionMinSplitLen(int64_t positions) {
  if (positions < kTile || positions > 4096 || positions % kTile != 0) {
    return absl::InvalidArgumentError(absl::StrCat("attention min split length ", positions,
                                                   ": expected a multiple of ", kTile, " in [",
                                                   kTile, ", 4096]"));
  }
  g_min_split_len.store(positions, std::memory_order_relaxed);
  return absl::OkStatus();
}
int64_t AttentionMinSplitLen() { return g_min_split_len.load(std::memory_order_relaxed); }

void SetFusedSplitCombine(bool on) { FusedCombineFlag().Set(on); }
bool FusedSplitCombineEnabled() { return FusedCombineFlag().Get(); }

void SetFusedRopeKvWrite(bool on) { FusedRopeKvFlag().Set(on); }
bool FusedRopeKvWriteEnabled() { return FusedRopeKvFlag().Get(); }

int64_t PagedAttentionSplitTickets(int64_t num_seqs, int64_t num_heads) {
  // Decode grids are (S, KVH * subgroups) with KVH * subgroups <= H (a subgroup holds at
  // least one query head).
  return std::max<int64_t>(num_seqs, 0) * std::max<int64_t>(num_heads, 0);
}

int64_t PagedAttentionWorkspaceBytes(int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                                     int64_t max_context_len) {
  // As LaunchPagedAttention plans them: for the context rounded up to kSplitPlanBucket.
  const int64_t splits =
      MaxSplitsFor(CeilDiv(max_context_len, kSplitPlanBucket) * kSplitPlanBucket);
  if (splits <= 1) return 0;
  return splits * num_tokens * num_heads * (head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

void SetTensorCorePrefillAttention(bool on) { TensorCorePrefillFlag().Set(on); }
bool TensorCorePrefillAttentionEnabled() { return TensorCorePrefillFlag().Get(); }

absl::Status LaunchPagedAttention(const PagedAttentionArgs& a, cudaStream_t stream) {
  if (a.max_query_len > 1 && TensorCorePrefillAttentionEnabled() &&
      CheckPagedPrefillAttentionTc(a).ok()) {
    return LaunchPagedPrefillAttentionTc(a, stream);
  }
  if (a.dtype != DType::kF32 && a.dtype != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchPagedAttention: activation dtype ", std::string(DTypeName(a.dtype))));
  }
  const int kind = CacheKindOf(a.cache_dtype);
  if (kind < 0) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchPagedAttention: cache dtype ",
                                                   std::string(DTypeName(a.cache_dtype))));
  }
  if (a.head_dim != 64 && a.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchPagedAttention: head_dim ", a.head_dim, " (supported: 64, 128)"));
  }
  if (a.num_heads <= 0 || a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0 ||
      a.block_size <= 0 || a.num_tokens < 0 || a.num_seqs < 0 || a.max_blocks_per_seq < 0 ||
      a.num_tokens > INT32_MAX / 2 || a.num_heads * a.head_dim > INT32_MAX / 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LaunchPagedAttention: bad shape heads=", a.num_heads, " kv_heads=", a.num_kv_heads,
        " block_size=", a.block_size, " T=", a.num_tokens, " S=", a.num_seqs));
  }
  if (IsFp8Kind(kind) && !(a.k_scale > 0.0f && a.v_scale > 0.0f)) {
    return absl::InvalidArgumentError("LaunchPagedAttention: fp8 scales must be > 0");
  }
  if (a.num_tokens == 0 || a.num_seqs == 0 || a.max_query_len <= 0 || a.max_context_len <= 0) {
    return absl::OkStatus();
  }

  const int group = static_cast<int>(a.num_heads / a.num_kv_heads);
  const bool decode = a.max_query_len == 1;
  const int rpw = decode ? 1 : 4;
  const int warps = decode ? std::clamp(group, 4, 8) : 8;
  const int rows_per_cta = warps * rpw;

  AttnParams p{};
  p.q = a.q;
  p.out = a.out;
  p.act_bf16 = a.dtype == DType::kBF16;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.k_scale = a.k_scale;
  p.v_scale = a.v_scale;
  p.num_tokens = static_cast<int>(a.num_tokens);
  p.num_heads = static_cast<int>(a.num_heads);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = group;
  p.block_size = static_cast<int>(a.block_size);
  p.softmax_scale = a.softmax_scale;
  p.positions = a.positions;
  p.query_start = a.query_start;
  p.block_tables = a.block_tables;
  p.max_blocks_per_seq = static_cast<int>(a.max_blocks_per_seq);
  p.heads_per_cta = std::min(group, rows_per_cta);
  p.tile_tokens = rows_per_cta / p.heads_per_cta;
  p.subgroups = static_cast<int>(CeilDiv(group, p.heads_per_cta));
  p.q_tiles = static_cast<int>(CeilDiv(a.max_query_len, p.tile_tokens));

  // Split-K (decode only): enough CTAs for ~2 per SM, each split >= AttentionMinSplitLen()
  // positions.
  // The split boundaries are planned for the context rounded up to kSplitPlanBucket, the
  // CUDA-graph context bucket: a step replayed from a graph (planned for the bucket) and
  // the same step run eagerly (planned for its exact context) then add the same positions
  // in the same order, so their outputs are bitwise equal (a different split changes the
  // fp32 sums' rounding, which now and then flips a bf16 activation).
  int64_t splits = 1;
  const int64_t base_ctas = a.num_seqs * p.q_tiles * a.num_kv_heads * p.subgroups;
  const int64_t plan_len = CeilDiv(a.max_context_len, kSplitPlanBucket) * kSplitPlanBucket;
  if (decode && a.workspace != nullptr) {
    QSHARD_ASSIGN_OR_RETURN(const int sms, CurrentDeviceSms());
    if (base_ctas < sms) {
      splits = std::min(MaxSplitsFor(plan_len), CeilDiv(2 * sms, base_ctas));
    }
  }
  int64_t split_len = CeilDiv(a.max_context_len, kTile) * kTile;
  if (splits > 1) {
    split_len = CeilDiv(CeilDiv(plan_len, splits), kTile) * kTile;
    // Splits past the context are launched too (they find no positions): an eager step of
    // 17 positions then takes the split + combine path like its graph, not the one-split
    // path, whose in-kernel normalization rounds differently.
    splits = CeilDiv(plan_len, split_len);
  }
  const int64_t ws_needed =
      splits > 1 ? splits * a.num_tokens * a.num_heads * (a.head_dim + 2) * 4 : 0;
  if (ws_needed > a.workspace_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LaunchPagedAttention: workspace of ", a.workspace_bytes, " bytes, need ", ws_needed,
        " (PagedAttentionWorkspaceBytes)"));
  }
  p.num_splits = static_cast<int>(splits);
  p.split_len = static_cast<int>(split_len);
  p.ws_acc = static_cast<float*>(a.workspace);
  p.ws_ml = p.ws_acc + (splits > 1 ? splits * a.num_tokens * a.num_heads * a.head_dim : 0);

  if (a.num_seqs * p.q_tiles > INT32_MAX || a.num_kv_heads * p.subgroups > 65535) {
    return absl::InvalidArgumentError("LaunchPagedAttention: grid too large");
  }
  const dim3 grid(static_cast<unsigned>(a.num_seqs * p.q_tiles),
                  static_cast<unsigned>(a.num_kv_heads * p.subgroups),
                  static_cast<unsigned>(splits));
  // The splits combined in the attention kernel itself when the caller gave enough tickets
  // (and the switch is on); else by SplitCombineKernel, a second launch.
  p.split_counters = nullptr;
  if (splits > 1 && FusedSplitCombineEnabled() && a.split_counters != nullptr &&
      a.split_counters_len >= static_cast<int64_t>(grid.x) * grid.y) {
    p.split_counters = a.split_counters;
  }
  const absl::Status st = DispatchKind(kind, [&](auto tag) -> absl::Status {
    constexpr int kK = decltype(tag)::value;
    if (a.head_dim == 64) {
      return decode ? LaunchAttentionKernel<kK, 64, 1>(p, grid, warps, stream)
                    : LaunchAttentionKernel<kK, 64, 4>(p, grid, warps, stream);
    }
    return decode ? LaunchAttentionKernel<kK, 128, 1>(p, grid, warps, stream)
                  : LaunchAttentionKernel<kK, 128, 4>(p, grid, warps, stream);
  });
  if (!st.ok() || splits == 1 || p.split_counters != nullptr) return st;
  (void)LaunchPdl(SplitCombineKernel, dim3(static_cast<unsigned>(a.num_tokens * a.num_heads)),
                  dim3(static_cast<unsigned>(a.head_dim)), 0, stream, p.ws_acc, p.ws_ml,
                  p.num_splits, a.num_tokens * a.num_heads, static_cast<int>(a.head_dim), a.out,
                  p.act_bf16);
  QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace qshard::cuda
