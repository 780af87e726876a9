#include "runtime/base/dtype.h"

#include <array>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

namespace qshard {
namespace {

struct DTypeInfo {
  DType type;
  size_t size;
  std::string_view name;
  std::string_view safetensors;
};

constexpr std::array<DTypeInfo, 15> kInfos = {{
    {DType::kF32, 4, "float32", "F32"},
    {DType::kF16, 2, "float16", "F16"},
    {DType::kBF16, 2, "bfloat16", "BF16"},
    {DType::kF64, 8, "float64", "F64"},
    {DType::kF8E4M3, 1, "float8_e4m3fn", "F8_E4M3"},
    {DType::kF8E5M2, 1, "float8_e5m2", "F8_E5M2"},
    {DType::kI8, 1, "int8", "I8"},
    {DType::kU8, 1, "uint8", "U8"},
    {DType::kI16, 2, "int16", "I16"},
    {DType::kU16, 2, "uint16", "U16"},
    {DType::kI32, 4, "int32", "I32"},
    {DType::kU32, 4, "uint32", "U32"},
    {DType::kI64, 8, "int64", "I64"},
    {DType::kU64, 8, "uint64", "U64"},
    {DType::kBool, 1, "bool", "BOOL"},
}};

const DTypeInfo& Info(DType t) { return kInfos[static_cast<size_t>(t)]; }

}  // namespace

size_t DTypeSize(DType t) { return Info(t).size; }
std::string_view DTypeName(DType t) { return Info(t).name; }
std::string_view SafetensorsDTypeName(DType t) { return Info(t).safetensors; }

absl::StatusOr<DType> ParseSafetensorsDType(std::string_view s) {
  for (const auto& info : kInfos) {
    if (info.safetensors == s) return info.type;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unsupported safetensors dtype '", std::string(s),
      "'; expected one of BF16, F16, F32, F64, F8_E4M3, F8_E5M2, I8, U8, I16, U16, I32, U32, "
      "I64, U64, BOOL"));
}

absl::StatusOr<DType> ParseTorchDType(std::string_view s) {
  std::string v = absl::AsciiStrToLower(std::string(s));
  if (v.rfind("torch.", 0) == 0) v = v.substr(6);
  if (v == "bfloat16" || v == "bf16") return DType::kBF16;
  if (v == "float16" || v == "fp16" || v == "half") return DType::kF16;
  if (v == "float32" || v == "fp32" || v == "float") return DType::kF32;
  if (v == "float64" || v == "double") return DType::kF64;
  if (v == "float8_e4m3fn" || v == "fp8_e4m3" || v == "fp8" || v == "float8_e4m3") {
    return DType::kF8E4M3;
  }
  if (v == "float8_e5m2" || v == "fp8_e5m2") return DType::kF8E5M2;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype '", std::string(s),
                   "'; expected bfloat16, float16, float32, float8_e4m3fn or float8_e5m2"));
}

bool IsFloatingPoint(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kF16:
    case DType::kBF16:
    case DType::kF64:
    case DType::kF8E4M3:
    case DType::kF8E5M2:
      return true;
    default:
      return false;
  }
}

}  // namespace qshard
