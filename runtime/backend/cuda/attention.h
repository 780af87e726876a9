// File: attention.h
// Host launchers for the paged KV cache: writing a step's K/V into cache slots and causal
// grouped-query attention over the paged cache (prefill, decode and mixed steps). Plain C++
// (no device code); the kernels live in attention.cu and attention_prefill.cu.
//
// Cache layout per layer (same as the CPU backend): [num_blocks, num_kv_heads, block_size,
// head_dim] in the cache dtype: f32, bf16, f16, or fp8 e4m3 / e5m2 with one fp32 scale per
// layer for K and one for V (value = code * scale; stores round value * (1 / scale) to
// nearest even and saturate at the format's max, exactly like cpu::StoreKvRow).
// Activations (k, v, q, out) are fp32 or bf16. All pointers are device memory; launchers
// only enqueue on `stream` (no allocation, no host synchronization).
//
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchKvWrite(k, v, DType::kBF16, T, 8, 128, slot_mapping,
//                                              k_cache, v_cache, DType::kBF16, 16, 1.f, 1.f,
//                                              stream));
//   cuda::PagedAttentionArgs a;  ... fill ...
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchPagedAttention(a, stream));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_ATTENTION_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "runtime/base/dtype.h"

namespace qshard::cuda {

// Writes k, v [T, kv_heads * head_dim] (act_dtype f32/bf16) into the cache:
// token t goes to slot slot_mapping[t] = block * block_size + offset; a negative slot skips
// the token (padding). k_scale / v_scale are used by fp8 caches only (must be > 0 then).
absl::Status LaunchKvWrite(const void* k, const void* v, DType act_dtype, int64_t T,
                           int64_t kv_heads, int64_t head_dim, const int32_t* slot_mapping,
                           void* k_cache, void* v_cache, DType cache_dtype, int64_t block_size,
                           float k_scale, float v_scale, cudaStream_t stream);

// The fused q|k|v Linear's output to attention's inputs in one launch, for decode and
// prefill steps alike: the same bits as LaunchSplitColumns(qkv -> q, k, v), LaunchRope(q, k)
// and LaunchKvWrite(k, v) in turn. act_dtype f32 or bf16 for every activation; cache and
// scales as LaunchKvWrite.
struct QkvRopeKvWriteArgs {
  const void* qkv = nullptr;  // [T, (q_heads + 2 kv_heads) * head_dim]: q | k | v per row
  void* q = nullptr;          // [T, q_heads * head_dim], rotated
  void* k = nullptr;          // [T, kv_heads * head_dim], rotated
  void* v = nullptr;          // [T, kv_heads * head_dim]
  DType act_dtype = DType::kBF16;
  int64_t num_tokens = 0;  // T
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;                   // even
  const int32_t* positions = nullptr;     // [T]
  const float* inv_freq = nullptr;        // [head_dim / 2] (RopeInvFrequencies)
  const int32_t* slot_mapping = nullptr;  // [T]; a negative slot skips the token's K/V
  void* k_cache = nullptr;                // this layer's [num_blocks, kv_heads, block_size, D]
  void* v_cache = nullptr;
  DType cache_dtype = DType::kBF16;
  int64_t block_size = 0;
  float k_scale = 1.0f;  // fp8 caches only (> 0)
  float v_scale = 1.0f;
};
absl::Status LaunchQkvRopeKvWrite(const QkvRopeKvWriteArgs& args, cudaStream_t stream);

// Split-K decode: the fewest cache positions one split covers (default 128; a multiple of
// 32 in [32, 4096], else InvalidArgument). Fewer positions per split give small batches
// more CTAs. A tuning knob for benchmarks (qshard_cuda_bench --sweep-splits): workspace
// sizes and split plans follow it from the next launch, and CUDA graphs captured before
// keep the plan they were captured with, so change it only while no graphs are held.
absl::Status SetAttentionMinSplitLen(int64_t positions);
int64_t AttentionMinSplitLen();

// Process-wide switch for the in-kernel split combine of LaunchPagedAttention (see
// PagedAttentionArgs::split_counters). Off by default until a GPU run has verified it (the
// op test compares it bit for bit with the separate combine); QSHARD_CUDA_FUSED_COMBINE=1
// in the environment at first use turns it on. Thread-safe; read at every launch.
void SetFusedSplitCombine(bool on);
bool FusedSplitCombineEnabled();

// Process-wide switch for the CUDA backend's use of LaunchQkvRopeKvWrite (Backend::
// SplitQkvRope). Off by default until a GPU run has verified it (the op test compares it
// bit for bit with the three separate launches); QSHARD_CUDA_FUSED_ROPE_KV=1 in the
// environment at first use turns it on. Thread-safe; read at every step.
void SetFusedRopeKvWrite(bool on);
bool FusedRopeKvWriteEnabled();

struct PagedAttentionArgs {
  const void* q = nullptr;  // [num_tokens, num_heads * head_dim] in dtype
  void* out = nullptr;      // [num_tokens, num_heads * head_dim] in dtype (must not alias q)
  DType dtype = DType::kF32;  // activations: f32 or bf16

  const void* k_cache = nullptr;  // this layer's [num_blocks, num_kv_heads, block_size, D]
  const void* v_cache = nullptr;
  DType cache_dtype = DType::kBF16;
  float k_scale = 1.0f;  // fp8 caches only: value = code * scale
  float v_scale = 1.0f;

  int64_t num_tokens = 0;  // T
  int64_t num_seqs = 0;    // S
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // divides num_heads
  int64_t head_dim = 0;      // 64 or 128
  int64_t block_size = 0;
  float softmax_scale = 1.0f;  // usually 1 / sqrt(head_dim)

  // Device arrays (StepMetadata uploaded). Tokens of sequence s are the contiguous range
  // [query_start[s], query_start[s + 1]); token t attends to cache positions
  // 0..positions[t] (its own K/V already written by LaunchKvWrite).
  const int32_t* positions = nullptr;     // [T]
  const int32_t* token_seq = nullptr;     // [T] sequence of each token (not read by the
                                          // current kernels, which walk query_start)
  const int32_t* query_start = nullptr;   // [S + 1]
  const int32_t* context_lens = nullptr;  // [S] (not read: positions bound each token)
  const int32_t* block_tables = nullptr;  // [S, max_blocks_per_seq], -1 padded
  int64_t max_blocks_per_seq = 0;

  // Host-known bounds: every positions[t] + 1 <= max_context_len, every sequence's query
  // length <= max_query_len (1 means a pure decode step, which takes the split-K path).
  int64_t max_context_len = 0;
  int64_t max_query_len = 0;

  // Scratch for split-K decode (partial max / sum / unnormalized output per split), at
  // least PagedAttentionWorkspaceBytes(num_tokens, num_heads, head_dim, max_context_len)
  // bytes, 16-byte aligned. May be null with 0 bytes: the launcher then runs unsplit.
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;

  // Optional: tickets that let the split-K decode combine its splits inside the attention
  // kernel (one launch instead of two; used when FusedSplitCombineEnabled()). Device int32
  // array, all zero on entry (the kernel leaves it zero), at least
  // PagedAttentionSplitTickets(num_seqs, num_heads) entries; else the combine is a second
  // launch. Launches that share tickets must be ordered (one stream).
  int32_t* split_counters = nullptr;
  int64_t split_counters_len = 0;
};

// Tickets a decode step of num_seqs sequences may need (see split_counters).
int64_t PagedAttentionSplitTickets(int64_t num_seqs, int64_t num_heads);

// Bytes of workspace that LaunchPagedAttention may use for a step with these sizes (an upper
// bound: the split count is chosen at launch from the batch size and the GPU's SM count).
int64_t PagedAttentionWorkspaceBytes(int64_t num_tokens, int64_t num_heads, int64_t head_dim,
                                     int64_t max_context_len);

// out = softmax(q K^T * softmax_scale, causal) V per query head, K/V of head h / (H / KVH).
// Steps with max_query_len > 1 go to LaunchPagedPrefillAttentionTc when it is enabled
// (TensorCorePrefillAttentionEnabled) and supports the arguments, else to the CUDA-core
// kernel; decode steps always take the split-K CUDA-core path.
absl::Status LaunchPagedAttention(const PagedAttentionArgs& args, cudaStream_t stream);

// The tensor-core (mma.sync m16n8k16, FlashAttention-2 style) kernel for prefill and mixed
// steps (attention_prefill.cu): same semantics and outputs as LaunchPagedAttention for bf16
// activations, bf16 / f16 / fp8 e4m3 / e5m2 caches, head_dim 64 or 128, any block_size,
// any query lengths (1 included). Scores and the softmax statistics are fp32; the softmax
// weights are rounded to bf16 (f16 for an f16 cache) for the P.V product, as FlashAttention
// does (<= 2^-8 relative per weight). Does not use the workspace.
// CheckPagedPrefillAttentionTc: OK, or InvalidArgument naming what is unsupported (f32
// activations, other cache dtypes or head dims, pointers not 16-byte aligned, bad shapes).
absl::Status CheckPagedPrefillAttentionTc(const PagedAttentionArgs& args);
absl::Status LaunchPagedPrefillAttentionTc(const PagedAttentionArgs& args, cudaStream_t stream);

// Process-wide switch for the tensor-core prefill kernel in LaunchPagedAttention. On by
// default; QSHARD_CUDA_TC_ATTENTION=0 in the environment at first use turns it off.
// Thread-safe; read at every launch.
void SetTensorCorePrefillAttention(bool on);
bool TensorCorePrefillAttentionEnabled();

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_ATTENTION_H_
