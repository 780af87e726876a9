#include "quant/int_quant_matrix.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/base/half.h"

namespace qshard::quant_internal {

float FloatAt(const Tensor& t, int64_t i) {
  switch (t.dtype()) {
    case DType::kF32:
      return t.data<float>()[i];
    case DType::kF16:
      return F16ToF32(t.data<uint16_t>()[i]);
    case DType::kBF16:
      return Bf16ToF32(t.data<uint16_t>()[i]);
    default:
      return 0.0f;  // CheckTensor rejects other dtypes before any read
  }
}

absl::Status CheckTensor(const std::string& layer, const char* name, const Tensor& t,
                         std::initializer_list<DType> dtypes, const Shape& shape) {
  if (t.empty() && t.numel() != 0) {
    return absl::NotFoundError(
        absl::StrCat(layer, ".", name, ": missing (expected shape ", ShapeToString(shape), ")"));
  }
  bool ok = false;
  std::vector<std::string> names;
  for (DType d : dtypes) {
    ok |= d == t.dtype();
    names.push_back(std::string(DTypeName(d)));
  }
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(layer, ".", name, ": dtype ",
                                                   std::string(DTypeName(t.dtype())), ", expected ",
                                                   absl::StrJoin(names, " or ")));
  }
  if (t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(layer, ".", name, ": shape ",
                                                   ShapeToString(t.shape()), ", expected ",
                                                   ShapeToString(shape)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> GroupIndex(const std::string& layer, const Tensor& g_idx,
                                                int64_t k, int64_t group_size, int64_t num_groups) {
  std::vector<int32_t> out(k);
  if (g_idx.empty()) {
    for (int64_t i = 0; i < k; ++i) out[i] = static_cast<int32_t>(i / group_size);
    return out;
  }
  if (absl::Status st = CheckTensor(layer, "g_idx", g_idx, {DType::kI32}, {k}); !st.ok()) {
    return st;
  }
  const int32_t* g = g_idx.data<int32_t>();
  for (int64_t i = 0; i < k; ++i) {
    if (g[i] < 0 || g[i] >= num_groups) {
      return absl::InvalidArgumentError(
          absl::StrCat(layer, ".g_idx[", i, "] = ", g[i], " is outside [0, ", num_groups, ")"));
    }
    out[i] = g[i];
  }
  return out;
}

}  // namespace qshard::quant_internal
