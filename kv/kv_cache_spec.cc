#include "kv/kv_cache_spec.h"

#include "absl/strings/str_cat.h"

namespace qshard {

absl::StatusOr<KvCacheDType> ParseKvCacheDType(const std::string& s) {
  if (s == "auto") return KvCacheDType::kAuto;
  if (s == "float32" || s == "fp32") return KvCacheDType::kF32;
  if (s == "bfloat16" || s == "bf16") return KvCacheDType::kBF16;
  if (s == "float16" || s == "fp16" || s == "half") return KvCacheDType::kF16;
  if (s == "fp8" || s == "fp8_e4m3") return KvCacheDType::kFp8E4M3;
  if (s == "fp8_e5m2") return KvCacheDType::kFp8E5M2;
  return absl::InvalidArgumentError(
      absl::StrCat("--kv-cache-dtype: unsupported value '", s,
                   "'; expected one of auto, float32, bfloat16, float16, fp8, fp8_e4m3, fp8_e5m2"));
}

std::string KvCacheDTypeName(KvCacheDType d) {
  switch (d) {
    case KvCacheDType::kAuto:
      return "auto";
    case KvCacheDType::kF32:
      return "float32";
    case KvCacheDType::kBF16:
      return "bfloat16";
    case KvCacheDType::kF16:
      return "float16";
    case KvCacheDType::kFp8E4M3:
      return "fp8_e4m3";
    case KvCacheDType::kFp8E5M2:
      return "fp8_e5m2";
  }
  return "?";
}

DType ResolveKvCacheDType(KvCacheDType requested, DType model_dtype) {
  switch (requested) {
    case KvCacheDType::kAuto:
      return model_dtype;
    case KvCacheDType::kF32:
      return DType::kF32;
    case KvCacheDType::kBF16:
      return DType::kBF16;
    case KvCacheDType::kF16:
      return DType::kF16;
    case KvCacheDType::kFp8E4M3:
      return DType::kF8E4M3;
    case KvCacheDType::kFp8E5M2:
      return DType::kF8E5M2;
  }
  return model_dtype;
}

int64_t KvCacheSpec::BytesPerToken() const {
  return 2 * num_layers * num_kv_heads * head_dim * static_cast<int64_t>(DTypeSize(dtype));
}

std::string KvCacheSpec::DebugString() const {
  return absl::StrCat("KvCacheSpec{layers=", num_layers, ", kv_heads=", num_kv_heads,
                      ", head_dim=", head_dim, ", block_size=", block_size,
                      ", num_blocks=", num_blocks, ", dtype=", std::string(DTypeName(dtype)),
                      ", bytes=", TotalBytes(), "}");
}

}  // namespace qshard
