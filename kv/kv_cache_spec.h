// File: kv_cache_spec.h
// The shape and element type of a paged KV cache.
//
// Storage per layer, separately for K and V: [num_blocks, num_kv_heads, block_size, head_dim].
// A token at position p of a sequence lives in block block_table[p / block_size], slot
// p % block_size; its "slot id" is block * block_size + p % block_size.
#ifndef QSHARD_KV_KV_CACHE_SPEC_H_
#define QSHARD_KV_KV_CACHE_SPEC_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "runtime/base/dtype.h"

namespace qshard {

// Values the user can ask for with --kv-cache-dtype.
enum class KvCacheDType { kAuto, kF32, kBF16, kF16, kFp8E4M3, kFp8E5M2 };
absl::StatusOr<KvCacheDType> ParseKvCacheDType(const std::string& s);
std::string KvCacheDTypeName(KvCacheDType d);
// The storage dtype: kAuto resolves to `model_dtype`.
DType ResolveKvCacheDType(KvCacheDType requested, DType model_dtype);

struct KvCacheSpec {
  int64_t num_layers = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t block_size = 16;  // tokens per block
  int64_t num_blocks = 0;
  DType dtype = DType::kF32;

  // 2 (K and V) x layers x kv_heads x head_dim x bytes per value.
  int64_t BytesPerToken() const;
  int64_t BytesPerBlock() const { return BytesPerToken() * block_size; }
  int64_t TotalBytes() const { return BytesPerBlock() * num_blocks; }
  // Elements of one layer's K (or V) cache.
  int64_t ElementsPerLayer() const { return num_blocks * num_kv_heads * block_size * head_dim; }
  std::string DebugString() const;
};

}  // namespace qshard

#endif  // QSHARD_KV_KV_CACHE_SPEC_H_
