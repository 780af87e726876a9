// Batched sampling kernel: one 512-thread block per row, the whole pipeline in one launch.
//
// Layout: the row lives in a global workspace (per row: a float copy of the logits that
// becomes the penalized row, then the weights; and an int32 count per id for the
// penalties), padded to 32 entries. A 128k-vocab row is 512 KB, so it stays in L2 across
// the passes below; no pass sorts the vocabulary.
//
// Passes over the row, in order. The dense ones are coalesced (a warp reads 512
// contiguous bytes as float4, kUnroll loads in flight per thread); the ordered ones
// (ties, draw) give each thread a contiguous chunk of ids. Plain temperature sampling is
// 4 passes (copy, argmax, weights, draw); top_k, top_p and logprobs add 4 radix rounds
// each (plus an ordered pass for top_p's ties; a dense and an ordered one for logprobs):
//   copy      logits -> work, raw max and a per-thread online sum of exp for the raw
//             log-sum-exp; zeroes the counts when the row has penalties.
//   penalties one thread per history position: counts via atomics (prompt presence as a
//             high bit, output occurrences as the count), then each distinct id is claimed
//             by exactly one thread (atomicExch to 0) which applies repetition, frequency
//             and presence in the CPU's order with the CPU's unfused float operations;
//             then the blocked ids are set to -inf (the same result as blocking first:
//             the penalties keep -inf at -inf).
//   argmax    (value, lowest id) block reduction: greedy's answer, and the max for the
//             weights.
//   top_k     radix select (4 rounds of 8 bits over an order-preserving key of the value)
//             for the k-th largest live value; kept: value >= it.
//   weights   w = exp((work - max) / T) for candidates, 0 otherwise, written in place.
//   top_p     radix select over the weight bits (positive floats order like their bits),
//             histogramming mass instead of counts, finds the threshold weight W*: the
//             mass above W* is short of the target and W*'s bucket reaches it. Among the
//             ids tied at W*, the lowest ids are kept until the target is reached (the
//             CPU's weight-descending, id-ascending order), found by an ordered count.
//   draw      kept = candidate && top_p && weight >= min_w. Thread t owns a contiguous
//             chunk of ids; an exclusive scan of the per-thread kept mass gives each chunk
//             its offset, and the thread whose chunk contains u * mass walks it.
//   logprobs  radix select on the raw logits for the n-th largest, the (< n) larger ones
//             collected and sorted in shared memory, ties (or -inf / NaN padding) taken in
//             id order by an ordered count.
//
// Determinism: every mass is a sum of weights in 2^-40 fixed point (uint64), so the
// sums are exact and independent of the order atomics or reductions run in; the weights
// themselves are computed identically in every pass, and the raw log-sum-exp is reduced
// in a fixed order. (The fixed point drops weights below 2^-41 of the max from the draw;
// the CPU would pick such a token with probability < 1e-12.) A row's result therefore depends
// only on its logits, its parameters and its history, never on the batch or the launch.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/sampling.h"

namespace qshard::cuda {
namespace {

// 16 warps per row: with the 128-register budget this allows, each thread keeps kUnroll
// 16-byte loads in flight, which is what covers the L2 latency of the row passes.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;
constexpr int kBins = 256;  // radix digit of 8 bits, 4 rounds for a 32-bit key
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxLp = kSamplingMaxLogprobs;
constexpr int32_t kPromptBit = 1 << 30;  // counts: set when the id occurs in the prompt
constexpr int kRowPad = 32;
// The CPU's cut-offs (runtime/engine/sampling.cc).
constexpr float kGreedyTemperature = 1e-5f;
constexpr float kExpFloor = -87.0f;           // exp below this is taken as 0, like the CPU
constexpr float kFxScale = 1099511627776.0f;  // 2^40

int64_t RowStride(int64_t vocab) { return (vocab + kRowPad - 1) / kRowPad * kRowPad; }

__host__ __device__ inline uint64_t Mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__host__ __device__ inline double UniformFor(uint64_t seed, uint64_t step) {
  const uint64_t h = Mix64(Mix64(seed ^ Mix64(step)) ^ 0x6A09E667F3BCC909ull);
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

struct SampleShared {
  unsigned int hist_cnt[kBins];
  unsigned long long hist_mass[kBins];
  unsigned long long stage[kWarps][32];  // per-warp staging for the mass histogram
  unsigned long long red_u64[kWarps];
  double red_d[kWarps];
  float red_f[kWarps];
  int red_i[kWarps];
  unsigned long long sel_above;
  unsigned int sel_bin;
  int sel_found;
  int id_star;
  int drawn;
  int top_count;
  float top_val[kMaxLp];
  int top_id[kMaxLp];
};

__device__ __forceinline__ int Lane() { return static_cast<int>(threadIdx.x & 31); }
__device__ __forceinline__ int Warp() { return static_cast<int>(threadIdx.x >> 5); }

// Order-preserving key of a non-NaN float (-0 must be canonicalized to +0 by the caller
// so that the two zeros, equal as floats, get one key).
__device__ __forceinline__ uint32_t OrderKey(float v) {
  const uint32_t b = __float_as_uint(v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float KeyToFloat(uint32_t k) {
  return (k & 0x80000000u) ? __uint_as_float(k & 0x7fffffffu) : __uint_as_float(~k);
}

// Weight in 2^-40 fixed point; w in [0, 1] so at most 2^40.
__device__ __forceinline__ unsigned long long Fx(float w) { return __float2ull_rn(w * kFxScale); }

// exp((v - max) * inv_t) with the CPU's conventions: exactly 1 at the max, 0 below the
// floor and for NaN. Unfused on purpose: the same float x as the CPU's (v - max) * inv_t.
__device__ __forceinline__ float Weight(float v, float max_v, float inv_t) {
  const float x = __fmul_rn(__fsub_rn(v, max_v), inv_t);
  if (x == 0.0f) return 1.0f;
  return x >= kExpFloor ? expf(x) : 0.0f;
}

// --- block collectives (all threads must call; each ends with a barrier so the shared
// --- scratch can be reused at once) ---

__device__ float BlockMax(float v, SampleShared& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  if (Lane() == 0) sm.red_f[Warp()] = v;
  __syncthreads();
  float m = sm.red_f[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, sm.red_f[w]);
  __syncthreads();
  return m;
}

// Fixed reduction order: the same inputs give the same bits.
__device__ double BlockSumDouble(double v, SampleShared& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (Lane() == 0) sm.red_d[Warp()] = v;
  __syncthreads();
  double s = 0.0;
  for (int w = 0; w < kWarps; ++w) s += sm.red_d[w];
  __syncthreads();
  return s;
}

__device__ unsigned long long BlockSumU64(unsigned long long v, SampleShared& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  if (Lane() == 0) sm.red_u64[Warp()] = v;
  __syncthreads();
  unsigned long long s = 0;
  for (int w = 0; w < kWarps; ++w) s += sm.red_u64[w];
  __syncthreads();
  return s;
}

// Largest value, lowest id among equals. Inputs are never NaN (callers start from -inf
// and only take non-NaN values).
__device__ void BlockArgMax(float& v, int& id, SampleShared& sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(kFull, v, o);
    const int oi = __shfl_xor_sync(kFull, id, o);
    if (ov > v || (ov == v && oi < id)) {
      v = ov;
      id = oi;
    }
  }
  if (Lane() == 0) {
    sm.red_f[Warp()] = v;
    sm.red_i[Warp()] = id;
  }
  __syncthreads();
  v = sm.red_f[0];
  id = sm.red_i[0];
  for (int w = 1; w < kWarps; ++w) {
    const float ov = sm.red_f[w];
    const int oi = sm.red_i[w];
    if (ov > v || (ov == v && oi < id)) {
      v = ov;
      id = oi;
    }
  }
  __syncthreads();
}

// Exclusive prefix of v over the threads in order; *total gets the sum of all.
__device__ unsigned long long BlockExclusiveScan(unsigned long long v, SampleShared& sm,
                                                 unsigned long long* total) {
  unsigned long long x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long y = __shfl_up_sync(kFull, x, o);
    if (Lane() >= o) x += y;
  }
  if (Lane() == 31) sm.red_u64[Warp()] = x;
  __syncthreads();
  unsigned long long before = 0;
  unsigned long long all = 0;
  for (int w = 0; w < kWarps; ++w) {
    const unsigned long long s = sm.red_u64[w];
    if (w < Warp()) before += s;
    all += s;
  }
  __syncthreads();
  *total = all;
  return before + x - v;
}

// Calls f(i, x[i]) for every i in [0, n) (each i by one thread). Threads take 16-byte
// vectors strided by the block, so a warp reads 512 contiguous bytes, and load kUnroll of
// them before using any, so enough loads are in flight to cover the L2 latency. When
// kStore, out[i] = the value f returns (out may be x: every element is read and written
// by the same thread); otherwise f's result is ignored. Unaligned rows (a vocab that is
// not a multiple of 4) take scalar accesses.
template <bool kStore, typename F>
__device__ __forceinline__ void ForEachElement(const float* x, float* out, int n, F&& f) {
  const int tid = static_cast<int>(threadIdx.x);
  int scalar_from = 0;
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
      (!kStore || reinterpret_cast<uintptr_t>(out) % 16 == 0)) {
    const int nv = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* o4 = reinterpret_cast<float4*>(out);
    const auto one = [&](int v, const float4& a) {
      const int i = 4 * v;
      float4 r;
      r.x = f(i, a.x);
      r.y = f(i + 1, a.y);
      r.z = f(i + 2, a.z);
      r.w = f(i + 3, a.w);
      if constexpr (kStore) o4[v] = r;
    };
    int v = tid;
    for (; v + (kUnroll - 1) * kThreads < nv; v += kUnroll * kThreads) {
      float4 a[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) a[u] = x4[v + u * kThreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) one(v + u * kThreads, a[u]);
    }
    for (; v < nv; v += kThreads) one(v, x4[v]);
    scalar_from = nv * 4;
  }
  for (int i = scalar_from + tid; i < n; i += kThreads) {
    const float r = f(i, x[i]);
    if constexpr (kStore) out[i] = r;
  }
}

// Radix select, descending. Each live element of x[0, n) has a 32-bit key and an amount:
//   kMass = false: live = value > -inf (NaN is not), key = OrderKey(value), amount 1;
//   kMass = true:  x holds weights, live = weight > 0, key = the weight's bits, amount
//                  = Fx(weight).
// Finds the largest key K with amount(key > K) < target <= amount(key >= K), i.e. the key
// of the element where the descending cumulative amount reaches target (the target-th
// largest in count mode). Returns false when the total live amount is below target.
// *above gets amount(key > K).
//
// Each round histograms the next 8 bits of the elements that match the digits found so
// far. Elements in a warp that fall in the same bin are combined first (match_any) so a
// peaked row does not serialize 32 atomics on one shared word.
template <bool kMass>
__device__ bool RadixSelect(const float* x, int n, unsigned long long target, SampleShared& sm,
                            uint32_t* key_out, unsigned long long* above_out) {
  const int lane = Lane();
  const int warp = Warp();
  uint32_t prefix = 0;
  uint32_t mask = 0;
  unsigned long long above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    if (threadIdx.x < kBins) {
      if (kMass) {
        sm.hist_mass[threadIdx.x] = 0;
      } else {
        sm.hist_cnt[threadIdx.x] = 0;
      }
    }
    __syncthreads();
    // Adds one element to the histogram; called by whole warps together (match_any).
    const auto add = [&](bool valid, float v) {
      uint32_t key = 0;
      unsigned long long amount = 0;
      bool match = false;
      if (valid) {
        if (kMass) {
          if (v > 0.0f) {
            key = __float_as_uint(v);
            amount = Fx(v);
            match = true;
          }
        } else if (v > -INFINITY) {
          key = OrderKey(v == 0.0f ? 0.0f : v);
          amount = 1;
          match = true;
        }
        match = match && (key & mask) == prefix;
      }
      const uint32_t bin = (key >> shift) & (kBins - 1);
      const unsigned peers = __match_any_sync(kFull, match ? bin : 0xffffffffu);
      const bool leader = match && lane == __ffs(peers) - 1;
      if constexpr (kMass) {
        sm.stage[warp][lane] = amount;
        __syncwarp();
        if (leader) {
          unsigned long long s = 0;
          for (unsigned m = peers; m != 0; m &= m - 1) s += sm.stage[warp][__ffs(m) - 1];
          atomicAdd(&sm.hist_mass[bin], s);
        }
        __syncwarp();
      } else {
        if (leader) atomicAdd(&sm.hist_cnt[bin], static_cast<unsigned>(__popc(peers)));
      }
    };
    // Loop bases are warp-uniform, so whole warps run every iteration together.
    if (reinterpret_cast<uintptr_t>(x) % 16 == 0) {
      const int nv = n / 4;
      const float4* x4 = reinterpret_cast<const float4*>(x);
      for (int vb = warp * 32; vb < nv; vb += kUnroll * kThreads) {
        float4 a[kUnroll];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int v = vb + u * kThreads + lane;
          ok[u] = v < nv;
          a[u] = ok[u] ? x4[v] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          add(ok[u], a[u].x);
          add(ok[u], a[u].y);
          add(ok[u], a[u].z);
          add(ok[u], a[u].w);
        }
      }
      if (warp == 0) {  // the last n % 4 elements
        const int i = nv * 4 + lane;
        add(i < n, i < n ? x[i] : 0.0f);
      }
    } else {
      for (int base = warp * 32; base < n; base += kThreads) {
        const int i = base + lane;
        add(i < n, i < n ? x[i] : 0.0f);
      }
    }
    __syncthreads();
    if (warp == 0) {
      // Lane l scans bins 255 - 8l down to 248 - 8l, so lanes in order walk the bins from
      // the top.
      unsigned long long h[8];
      unsigned long long s = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int b = kBins - 1 - 8 * lane - j;
        h[j] = kMass ? sm.hist_mass[b] : static_cast<unsigned long long>(sm.hist_cnt[b]);
        s += h[j];
      }
      unsigned long long incl = s;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long y = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += y;
      }
      const unsigned hit = __ballot_sync(kFull, above + incl >= target);
      if (hit == 0) {
        if (lane == 0) sm.sel_found = 0;
      } else if (lane == __ffs(hit) - 1) {
        unsigned long long cum = above + incl - s;
        int bin = kBins - 1 - 8 * lane - 7;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (cum + h[j] >= target) {
            bin = kBins - 1 - 8 * lane - j;
            break;
          }
          cum += h[j];
        }
        sm.sel_bin = static_cast<unsigned>(bin);
        sm.sel_above = cum;
        sm.sel_found = 1;
      }
    }
    __syncthreads();
    // The next writes to sel_* and the histogram come after at least one more barrier,
    // which every thread reaches only after these reads.
    if (!sm.sel_found) return false;
    prefix |= sm.sel_bin << shift;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    above = sm.sel_above;
  }
  *key_out = prefix;
  *above_out = above;
  return true;
}

// The contiguous chunk of ids thread t owns in the ordered (id-ascending) passes.
struct Chunk {
  int lo, hi;
};
__device__ __forceinline__ Chunk MyChunk(int n) {
  const int len = (n + kThreads - 1) / kThreads;
  const int lo = min(n, static_cast<int>(threadIdx.x) * len);
  return {lo, min(n, lo + len)};
}

__device__ __forceinline__ bool TopPKept(float w, int i, uint32_t wkey, int id_star) {
  const uint32_t k = __float_as_uint(w);
  return k > wkey || (k == wkey && i <= id_star);
}

__device__ void WriteInvalidRow(int64_t row, int32_t* token_ids, float* chosen_logprob,
                                int32_t* top_ids, float* top_logprobs) {
  const float nan = __int_as_float(0x7fc00000);
  if (threadIdx.x == 0) {
    token_ids[row] = -1;
    chosen_logprob[row] = nan;
  }
  if (threadIdx.x < kMaxLp) {
    top_ids[row * kMaxLp + threadIdx.x] = -1;
    top_logprobs[row * kMaxLp + threadIdx.x] = nan;
  }
}

// grid: [rows], block: kThreads. See the file comment for the passes.
__global__ void __launch_bounds__(kThreads, 1)
    SampleKernel(const float* __restrict__ logits, int n, int64_t stride,
                 const DeviceSamplingRow* __restrict__ row_params,
                 const int32_t* __restrict__ history, const int32_t* __restrict__ blocked,
                 float* __restrict__ workspace, int32_t* __restrict__ token_ids,
                 float* __restrict__ chosen_logprob, int32_t* __restrict__ top_ids,
                 float* __restrict__ top_logprobs) {
  __shared__ SampleShared sm;
  const int64_t row = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const DeviceSamplingRow p = row_params[row];  // same values in every thread: uniform
  const float* raw = logits + row * static_cast<int64_t>(n);
  float* work = workspace + row * 2 * stride;
  int32_t* counts = reinterpret_cast<int32_t*>(work + stride);

  if (p.top_k < 0 || p.num_logprobs < 0 || p.num_logprobs > kMaxLp || p.history_offset < 0 ||
      p.prompt_len < 0 || p.output_len < 0 || p.output_len >= kPromptBit || p.blocked_offset < 0 ||
      p.blocked_len < 0) {
    WriteInvalidRow(row, token_ids, chosen_logprob, top_ids, top_logprobs);
    return;
  }

  const float rep = p.repetition_penalty;
  const bool rep_on = rep != 1.0f && rep > 0.0f && p.prompt_len + p.output_len > 0;
  const bool freq_on =
      (p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) && p.output_len > 0;
  const bool pen_on = rep_on || freq_on;

  // --- copy + raw log-sum-exp ---
  float raw_max = -INFINITY;  // ignoring NaN, +-inf included
  float fin_max = -INFINITY;  // finite values only
  double fin_sum = 0.0;       // sum of exp(v - fin_max) over this thread's finite values
  ForEachElement<true>(raw, work, n, [&](int, float v) {
    raw_max = fmaxf(raw_max, v);
    if (v > -INFINITY && v < INFINITY) {
      if (v > fin_max) {
        fin_sum =
            (fin_max > -INFINITY ? fin_sum * exp(static_cast<double>(fin_max) - v) : 0.0) + 1.0;
        fin_max = v;
      } else {
        fin_sum += static_cast<double>(expf(__fsub_rn(v, fin_max)));
      }
    }
    return v;
  });
  if (pen_on) {
    int4* c4 = reinterpret_cast<int4*>(counts);  // stride is a multiple of 32: aligned
    for (int64_t v = tid; v < stride / 4; v += kThreads) c4[v] = make_int4(0, 0, 0, 0);
  }
  raw_max = BlockMax(raw_max, sm);
  const float block_fin_max = BlockMax(fin_max, sm);
  const double scaled =
      fin_max > -INFINITY ? fin_sum * exp(static_cast<double>(fin_max) - block_fin_max) : 0.0;
  const double fin_total = BlockSumDouble(scaled, sm);  // its barriers publish work / counts
  double lse;
  if (raw_max == INFINITY || !(block_fin_max > -INFINITY)) {
    lse = raw_max;  // +inf dominates, or nothing finite (-inf)
  } else {
    lse = static_cast<double>(block_fin_max) + log(fin_total);
  }

  // --- penalties and blocked ids ---
  if (pen_on) {
    const int32_t* hist = history + p.history_offset;
    const int len = p.prompt_len + p.output_len;
    for (int j = tid; j < len; j += kThreads) {
      const int32_t id = hist[j];
      if (id < 0 || id >= n) continue;
      if (j < p.prompt_len) {
        atomicOr(&counts[id], kPromptBit);
      } else {
        atomicAdd(&counts[id], 1);
      }
    }
    __syncthreads();
    for (int j = tid; j < len; j += kThreads) {
      const int32_t id = hist[j];
      if (id < 0 || id >= n) continue;
      const int32_t c = atomicExch(&counts[id], 0);  // exactly one thread per distinct id
      if (c == 0) continue;
      float v = work[id];
      if (rep_on) v = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
      const int32_t occurrences = c & (kPromptBit - 1);
      if (freq_on && occurrences > 0) {
        v = __fsub_rn(v, __fadd_rn(__fmul_rn(p.frequency_penalty, static_cast<float>(occurrences)),
                                   p.presence_penalty));
      }
      work[id] = v;
    }
    __syncthreads();
  }
  if (p.blocked_len > 0) {
    const int32_t* blk = blocked + p.blocked_offset;
    for (int j = tid; j < p.blocked_len; j += kThreads) {
      const int32_t id = blk[j];
      if (id >= 0 && id < n) work[id] = -INFINITY;
    }
    __syncthreads();
  }

  // --- argmax (greedy, and the max for the weights) ---
  float max_v = -INFINITY;
  int arg = INT_MAX;
  ForEachElement<false>(work, nullptr, n, [&](int i, float v) {
    if (v > max_v || (v == max_v && i < arg)) {
      max_v = v;
      arg = i;
    }
    return 0.0f;
  });
  BlockArgMax(max_v, arg, sm);
  if (arg == INT_MAX) arg = 0;  // every value NaN

  int token = arg;
  const bool sample =
      !(p.temperature < kGreedyTemperature) && max_v > -INFINITY && max_v < INFINITY;
  if (sample) {
    // top_k on the values (temperature does not change the order); ties with the k-th
    // value are kept. Fewer than k live values: everything live is kept.
    float kth = -INFINITY;
    if (p.top_k > 0 && p.top_k < n) {
      uint32_t key;
      unsigned long long above;
      if (RadixSelect<false>(work, n, static_cast<unsigned long long>(p.top_k), sm, &key, &above)) {
        kth = KeyToFloat(key);
      }
    }
    const float inv_t = __fdiv_rn(1.0f, p.temperature);
    unsigned long long mass = 0;
    ForEachElement<true>(work, work, n, [&](int, float v) {
      const float w = (v >= kth && v > -INFINITY) ? Weight(v, max_v, inv_t) : 0.0f;
      mass += Fx(w);
      return w;
    });
    const unsigned long long total = BlockSumU64(mass, sm);  // also publishes the weights

    if (total > 0) {
      // top_p: keep key > wkey, and the ids tied at wkey up to id_star.
      uint32_t wkey = 0;
      int id_star = INT_MAX;
      if (p.top_p < 1.0f) {
        double want = ceil(static_cast<double>(p.top_p) * static_cast<double>(total));
        unsigned long long target = want < 1.0 ? 1ull : static_cast<unsigned long long>(want);
        if (target > total) target = total;
        uint32_t key;
        unsigned long long above;
        if (RadixSelect<true>(work, n, target, sm, &key, &above)) {
          const unsigned long long fxw = Fx(__uint_as_float(key));
          const unsigned long long need =
              fxw == 0 ? 1ull : (target - above + fxw - 1) / fxw;  // >= 1: above < target
          // The need-th lowest id whose weight is exactly W*.
          const Chunk c = MyChunk(n);
          unsigned long long mine = 0;
          for (int i = c.lo; i < c.hi; ++i) mine += __float_as_uint(work[i]) == key;
          if (tid == 0) sm.id_star = INT_MAX;
          unsigned long long ties;
          const unsigned long long before = BlockExclusiveScan(mine, sm, &ties);
          if (before < need && need <= before + mine) {
            unsigned long long seen = before;
            for (int i = c.lo; i < c.hi; ++i) {
              if (__float_as_uint(work[i]) == key && ++seen == need) {
                sm.id_star = i;
                break;
              }
            }
          }
          __syncthreads();
          wkey = key;
          id_star = sm.id_star;
        }
      }
      const float min_w = p.min_p > 0.0f ? fminf(p.min_p, 1.0f) : 0.0f;

      // The draw, in id order over contiguous chunks.
      const Chunk c = MyChunk(n);
      unsigned long long mine = 0;
      for (int i = c.lo; i < c.hi; ++i) {
        const float w = work[i];
        if (w > 0.0f && w >= min_w && TopPKept(w, i, wkey, id_star)) mine += Fx(w);
      }
      if (tid == 0) sm.drawn = arg;
      unsigned long long kept;
      const unsigned long long before = BlockExclusiveScan(mine, sm, &kept);
      if (kept > 0) {
        unsigned long long u =
            static_cast<unsigned long long>(UniformFor(p.seed, p.step) * static_cast<double>(kept));
        if (u >= kept) u = kept - 1;
        if (before <= u && u < before + mine) {
          unsigned long long cum = before;
          for (int i = c.lo; i < c.hi; ++i) {
            const float w = work[i];
            if (w > 0.0f && w >= min_w && TopPKept(w, i, wkey, id_star)) {
              cum += Fx(w);
              if (u < cum) {
                sm.drawn = i;
                break;
              }
            }
          }
        }
      }
      __syncthreads();
      token = sm.drawn;
    }
  }

  // --- logprobs of the raw logits ---
  if (tid == 0) {
    token_ids[row] = token;
    chosen_logprob[row] = static_cast<float>(static_cast<double>(raw[token]) - lse);
  }
  const int n_top = min(p.num_logprobs, n);
  if (tid >= n_top && tid < kMaxLp) {
    top_ids[row * kMaxLp + tid] = -1;
    top_logprobs[row * kMaxLp + tid] = -INFINITY;
  }
  if (n_top == 0) return;  // uniform

  uint32_t tkey = 0;
  unsigned long long above = 0;
  const bool found =
      RadixSelect<false>(raw, n, static_cast<unsigned long long>(n_top), sm, &tkey, &above);
  // Larger than the n-th value (all live values when fewer than n exist): < n of them.
  const float t = found ? KeyToFloat(tkey) : -INFINITY;
  if (tid == 0) sm.top_count = 0;
  __syncthreads();
  ForEachElement<false>(raw, nullptr, n, [&](int i, float v) {
    if (v > t) {
      const int slot = atomicAdd(&sm.top_count, 1);
      if (slot < kMaxLp) {
        sm.top_val[slot] = v;
        sm.top_id[slot] = i;
      }
    }
    return 0.0f;
  });
  __syncthreads();
  const int g = min(sm.top_count, n_top);
  if (tid == 0) {
    // Insertion sort of < 20 entries: value descending, id ascending.
    for (int a = 1; a < g; ++a) {
      const float v = sm.top_val[a];
      const int id = sm.top_id[a];
      int b = a - 1;
      while (b >= 0 && (sm.top_val[b] < v || (sm.top_val[b] == v && sm.top_id[b] > id))) {
        sm.top_val[b + 1] = sm.top_val[b];
        sm.top_id[b + 1] = sm.top_id[b];
        --b;
      }
      sm.top_val[b + 1] = v;
      sm.top_id[b + 1] = id;
    }
  }
  // The remaining slots: ids equal to the n-th value (or, with fewer live values than n,
  // the -inf / NaN ids, reported as -inf), lowest ids first.
  const unsigned long long need = static_cast<unsigned long long>(n_top - g);
  const Chunk c = MyChunk(n);
  unsigned long long mine = 0;
  for (int i = c.lo; i < c.hi; ++i) {
    const float v = raw[i];
    mine += found ? (v == t) : !(v > -INFINITY);
  }
  unsigned long long matches;
  const unsigned long long before = BlockExclusiveScan(mine, sm, &matches);
  if (before < need) {
    unsigned long long slot = before;
    for (int i = c.lo; i < c.hi && slot < need; ++i) {
      const float v = raw[i];
      if (found ? (v == t) : !(v > -INFINITY)) {
        sm.top_val[g + slot] = t;
        sm.top_id[g + slot] = i;
        ++slot;
      }
    }
  }
  __syncthreads();
  if (tid < n_top) {
    top_ids[row * kMaxLp + tid] = sm.top_id[tid];
    top_logprobs[row * kMaxLp + tid] =
        static_cast<float>(static_cast<double>(sm.top_val[tid]) - lse);
  }
}

absl::Status RangeError(const char* field, const char* range, double got) {
  return absl::InvalidArgumentError(absl::StrCat(field, " must be in ", range, ", got ", got));
}

}  // namespace

absl::Status ValidateSamplingRow(const DeviceSamplingRow& r, int64_t vocab, int64_t history_len,
                                 int64_t blocked_len) {
  // Written as !(in range) so NaN fails every check.
  if (!(r.temperature >= 0.0f && r.temperature <= 100.0f)) {
    return RangeError("temperature", "[0, 100]", r.temperature);
  }
  if (!(r.top_p > 0.0f && r.top_p <= 1.0f)) return RangeError("top_p", "(0, 1]", r.top_p);
  if (!(r.min_p >= 0.0f && r.min_p <= 1.0f)) return RangeError("min_p", "[0, 1]", r.min_p);
  if (!(r.repetition_penalty > 0.0f && r.repetition_penalty <= 2.0f)) {
    return RangeError("repetition_penalty", "(0, 2]", r.repetition_penalty);
  }
  if (!(r.presence_penalty >= -2.0f && r.presence_penalty <= 2.0f)) {
    return RangeError("presence_penalty", "[-2, 2]", r.presence_penalty);
  }
  if (!(r.frequency_penalty >= -2.0f && r.frequency_penalty <= 2.0f)) {
    return RangeError("frequency_penalty", "[-2, 2]", r.frequency_penalty);
  }
  if (r.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be >= 0 (0 = off; map SamplingParams' -1 to 0), got ", r.top_k));
  }
  if (r.num_logprobs < 0 || r.num_logprobs > kSamplingMaxLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_logprobs must be in [0, ", kSamplingMaxLogprobs, "], got ", r.num_logprobs));
  }
  if (vocab <= 0 || vocab > kSamplingMaxVocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("vocab must be in [1, ", kSamplingMaxVocab, "], got ", vocab));
  }
  if (r.history_offset < 0 || r.prompt_len < 0 || r.output_len < 0 ||
      int64_t{r.history_offset} + r.prompt_len + r.output_len > history_len ||
      r.output_len >= kPromptBit) {
    return absl::InvalidArgumentError(
        absl::StrCat("history range [", r.history_offset, ", +", r.prompt_len, " + ", r.output_len,
                     ") must lie inside the ", history_len, "-id history array"));
  }
  if (r.blocked_offset < 0 || r.blocked_len < 0 ||
      int64_t{r.blocked_offset} + r.blocked_len > blocked_len) {
    return absl::InvalidArgumentError(absl::StrCat("blocked range [", r.blocked_offset, ", +",
                                                   r.blocked_len, ") must lie inside the ",
                                                   blocked_len, "-id blocked array"));
  }
  return absl::OkStatus();
}

double SamplingUniform(uint64_t seed, uint64_t step) { return UniformFor(seed, step); }

int64_t SamplingWorkspaceBytes(int64_t rows, int64_t vocab) {
  if (rows <= 0 || vocab <= 0) return 0;
  return rows * RowStride(vocab) * 2 * static_cast<int64_t>(sizeof(float));
}

absl::Status LaunchSample(const float* logits, int64_t rows, int64_t vocab,
                          const DeviceSamplingRow* row_params, const int32_t* history,
                          const int32_t* blocked, void* workspace, int64_t workspace_bytes,
                          int32_t* token_ids, float* chosen_logprob, int32_t* top_ids,
                          float* top_logprobs, cudaStream_t stream) {
  if (vocab <= 0 || vocab > kSamplingMaxVocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchSample: vocab must be in [1, ", kSamplingMaxVocab, "], got ", vocab));
  }
  if (rows < 0 || rows > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("LaunchSample: bad rows ", rows));
  }
  if (rows == 0) return absl::OkStatus();
  if (logits == nullptr || row_params == nullptr || workspace == nullptr || token_ids == nullptr ||
      chosen_logprob == nullptr || top_ids == nullptr || top_logprobs == nullptr) {
    return absl::InvalidArgumentError("LaunchSample: null logits / params / workspace / output");
  }
  const int64_t need = SamplingWorkspaceBytes(rows, vocab);
  if (workspace_bytes < need) {
    return absl::InvalidArgumentError(
        absl::StrCat("LaunchSample: workspace of ", workspace_bytes, " bytes, need ", need));
  }
  if (reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return absl::InvalidArgumentError("LaunchSample: workspace must be 16-byte aligned");
  }
  SampleKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      logits, static_cast<int>(vocab), RowStride(vocab), row_params, history, blocked,
      static_cast<float*>(workspace), token_ids, chosen_logprob, top_ids, top_logprobs);
  QSHARD_CUDA_RETURN_IF_LAUNCH_ERROR();
  return absl::OkStatus();
}

}  // namespace qshard::cuda
