#include "runtime/base/tensor.h"

#include <cassert>
#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/base/half.h"

namespace qshard {

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeToString(const Shape& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::vector<float> ToFloatVector(const Tensor& t) {
  std::vector<float> out;
  const int64_t n = t.numel();
  switch (t.dtype()) {
    case DType::kBF16:
      out.resize(n);
      for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToF32(t.data<uint16_t>()[i]);
      break;
    case DType::kF16:
      out.resize(n);
      for (int64_t i = 0; i < n; ++i) out[i] = F16ToF32(t.data<uint16_t>()[i]);
      break;
    case DType::kF32:
      out.assign(t.data<float>(), t.data<float>() + n);
      break;
    default:
      break;
  }
  return out;
}

void ReleaseFreedHostMemory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

Tensor Tensor::Empty(DType dtype, Shape shape, bool zero) {
  size_t bytes = static_cast<size_t>(NumElements(shape)) * DTypeSize(dtype);
  // 64-byte alignment so SIMD loads never straddle cache lines needlessly.
  size_t alloc = (bytes + 63) / 64 * 64;
  void* p = alloc == 0 ? nullptr : std::aligned_alloc(64, alloc);
  if (p != nullptr && zero) std::memset(p, 0, alloc);
  std::shared_ptr<const void> owner(p, [](const void* q) { std::free(const_cast<void*>(q)); });
  return Tensor(dtype, std::move(shape), p, std::move(owner));
}

Tensor Tensor::Rows(int64_t begin, int64_t end) const {
  assert(!shape_.empty() && begin >= 0 && begin <= end && end <= shape_[0]);
  Shape s = shape_;
  s[0] = end - begin;
  size_t row_bytes = s.size() > 1 ? static_cast<size_t>(NumElements(Shape(s.begin() + 1, s.end())))
                                  : 1;
  row_bytes *= DTypeSize(dtype_);
  return Tensor(dtype_, std::move(s), static_cast<uint8_t*>(data_) + begin * row_bytes, owner_,
                device_);
}

Tensor Tensor::Reshape(Shape shape) const {
  assert(NumElements(shape) == numel());
  return Tensor(dtype_, std::move(shape), data_, owner_, device_);
}

}  // namespace qshard
