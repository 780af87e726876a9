// File: sampling.h
// Batched token sampling on the GPU: one decode step's fp32 logits [rows, vocab] stay on
// the device and only the chosen ids, their logprobs and the top-n logprobs come back.
// Plain C++ (no device code) so .cc files built by the host compiler can call it; the
// kernel lives in sampling.cu.
//
// The CPU sampler (runtime/engine/sampling.{h,cc}) is the specification and every step
// has the same semantics, in the same order:
//   1. work = logits; blocked ids -> -inf; repetition penalty once per distinct id of
//      prompt + output (positive values divided, others multiplied); frequency / presence
//      penalties once per distinct output id (work -= freq * count + presence). The float
//      operations are the CPU's, unfused, so the penalized row is bit-identical.
//   2. temperature < 1e-5: argmax of work (lowest id on ties, NaN skipped; first -inf id
//      when everything is blocked, 0 when everything is NaN); top_k / top_p / min_p unused.
//   3. otherwise weights = exp((work - max) / temperature) (exactly 1 at the max), kept by
//      top_k (0 or >= vocab: off; every id tied with the k-th largest work value is kept,
//      like the CPU / HF / vLLM), then top_p (the shortest prefix of the candidates sorted
//      by weight descending, then id ascending, whose mass reaches top_p * mass), then
//      min_p (weight >= min(min_p, 1)), then one draw from the kept weights.
//   4. chosen logprob and top-n logprobs = log-softmax of the RAW logits (not the
//      penalized / tempered row), top-n ordered by value descending then id ascending,
//      padded with the lowest -inf / NaN ids (reported as -inf) when fewer are finite.
// The one deliberate difference is the random stream: the draw uses u = SamplingUniform(
// seed, step), a counter-based hash, so a seeded request gives the same tokens on every
// run whatever the batch around it (rows never interact), and step advances the stream.
// The draw itself walks the kept ids in ascending id order: the token is the first id
// whose cumulative kept weight exceeds u * (kept mass).
//
//   std::vector<cuda::DeviceSamplingRow> params = ...;          // one per row
//   for (auto& p : params) QSHARD_RETURN_IF_ERROR(cuda::ValidateSamplingRow(p, vocab, ...));
//   // upload params, history, blocked; allocate SamplingWorkspaceBytes(rows, vocab)
//   QSHARD_RETURN_IF_ERROR(cuda::LaunchSample(logits, rows, vocab, d_params, d_history,
//       d_blocked, ws, ws_bytes, d_tokens, d_logprob, d_top_ids, d_top_logprobs, stream));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_SAMPLING_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_SAMPLING_H_

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"

namespace qshard::cuda {

// Top-n logprob slots per row in the outputs (SamplingParams::logprobs is at most 20).
inline constexpr int32_t kSamplingMaxLogprobs = 20;
// Largest vocabulary LaunchSample accepts (the kept mass is summed in 2^-40 fixed point
// in 64-bit integers, which holds 2^23 weights of at most 1).
inline constexpr int64_t kSamplingMaxVocab = int64_t{1} << 23;

// One row of the batch: built on the host, uploaded by the caller (the kernel reads the
// array in device memory). Field meanings and ranges as in SamplingParams.
struct DeviceSamplingRow {
  float temperature = 1.0f;         // < 1e-5: greedy
  float top_p = 1.0f;               // (0, 1]; 1 = off
  float min_p = 0.0f;               // [0, 1]; 0 = off
  float repetition_penalty = 1.0f;  // (0, 2]; 1 = off
  float presence_penalty = 0.0f;    // [-2, 2]
  float frequency_penalty = 0.0f;   // [-2, 2]
  int32_t top_k = 0;                // 0 (or >= vocab) = off; SamplingParams' -1 maps to 0
  uint64_t seed = 0;
  uint64_t step = 0;  // tokens generated so far: advances the stream
  // The row's history is history[history_offset, + prompt_len + output_len): the prompt
  // ids, then the generated ids. Ids outside [0, vocab) are ignored, like the CPU.
  int32_t history_offset = 0;
  int32_t prompt_len = 0;
  int32_t output_len = 0;
  // Ids that must not be chosen: blocked[blocked_offset, + blocked_len).
  int32_t blocked_offset = 0;
  int32_t blocked_len = 0;
  int32_t num_logprobs = 0;  // [0, kSamplingMaxLogprobs]
};
static_assert(std::is_trivially_copyable_v<DeviceSamplingRow>);
static_assert(sizeof(DeviceSamplingRow) == 72, "layout is shared with device code");

// Range-checks one row before upload (the kernel cannot report errors per row): the
// SamplingParams ranges (temperature [0, 100], top_p (0, 1], min_p [0, 1], repetition
// (0, 2], presence / frequency [-2, 2], NaN fails), top_k >= 0, num_logprobs in
// [0, kSamplingMaxLogprobs], and the history / blocked ranges inside arrays of
// history_len / blocked_len ids. The message names the field.
absl::Status ValidateSamplingRow(const DeviceSamplingRow& row, int64_t vocab, int64_t history_len,
                                 int64_t blocked_len);

// The uniform draw in [0, 1) that row (seed, step) uses: a SplitMix64-style hash of the
// pair, top 53 bits. Exposed so tests (and replay tools) can predict the token.
double SamplingUniform(uint64_t seed, uint64_t step);

// Device scratch LaunchSample needs for `rows` rows (0 for rows <= 0 or vocab <= 0):
// per row a float copy of the row and an int32 count per id, both padded to 32 entries.
int64_t SamplingWorkspaceBytes(int64_t rows, int64_t vocab);

// Samples one token per row.
//   logits: fp32 [rows, vocab], device, not modified.
//   row_params: DeviceSamplingRow [rows], device.
//   history / blocked: int32, device; may be null when every row's lengths are 0.
//   workspace: device, >= SamplingWorkspaceBytes(rows, vocab) bytes, 16-byte aligned;
//     contents need not be initialized and are garbage afterwards.
//   Outputs (device): token_ids int32 [rows]; chosen_logprob fp32 [rows];
//     top_ids int32 / top_logprobs fp32 [rows, kSamplingMaxLogprobs]: the first
//     min(num_logprobs, vocab) slots of a row are its top-n, the others hold id -1 and
//     -inf. A row whose parameters fail the kernel's own cheap checks (top_k < 0,
//     num_logprobs outside [0, 20], negative offsets / lengths) gets token -1 and NaN
//     logprobs rather than an out-of-bounds access; ValidateSamplingRow catches these
//     (and more) on the host first.
// Rejects vocab outside [1, kSamplingMaxVocab], rows < 0, null pointers and a workspace
// that is too small; rows == 0 enqueues nothing. Only enqueues work on `stream`.
absl::Status LaunchSample(const float* logits, int64_t rows, int64_t vocab,
                          const DeviceSamplingRow* row_params, const int32_t* history,
                          const int32_t* blocked, void* workspace, int64_t workspace_bytes,
                          int32_t* token_ids, float* chosen_logprob, int32_t* top_ids,
                          float* top_logprobs, cudaStream_t stream);

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_SAMPLING_H_
