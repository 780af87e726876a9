// File: dtype.h
// Element types of tensors in checkpoints, activations and the KV cache.
//
//   DType t = ParseSafetensorsDType("BF16").value();   // DType::kBF16
//   size_t n = DTypeSize(t) * num_elements;
#ifndef QSHARD_RUNTIME_BASE_DTYPE_H_
#define QSHARD_RUNTIME_BASE_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace qshard {

enum class DType : uint8_t {
  kF32,
  kF16,
  kBF16,
  kF64,
  kF8E4M3,  // float8 e4m3fn (max 448, no infinities)
  kF8E5M2,  // float8 e5m2 (IEEE-like, max 57344)
  kI8,
  kU8,
  kI16,
  kU16,
  kI32,
  kU32,
  kI64,
  kU64,
  kBool,
};

// Bytes per element.
size_t DTypeSize(DType t);
// Lower-case human name ("bfloat16", "float8_e4m3fn", ...), as torch spells it.
std::string_view DTypeName(DType t);
// The safetensors header spelling ("BF16", "F8_E4M3", ...).
std::string_view SafetensorsDTypeName(DType t);
// Parses a safetensors dtype string; the error lists the supported spellings.
absl::StatusOr<DType> ParseSafetensorsDType(std::string_view s);
// Parses a torch/HF dtype name ("bfloat16", "float16", "float32", "fp8_e4m3", "half", ...).
absl::StatusOr<DType> ParseTorchDType(std::string_view s);
bool IsFloatingPoint(DType t);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BASE_DTYPE_H_
