// File: tensor.h
// A typed, shaped, row-major view of memory with an optional owner that keeps it alive
// (an mmap'd checkpoint shard, a host buffer, or device memory held by a backend).
//
//   Tensor t = Tensor::Empty(DType::kF32, {n, hidden});   // host, owning
//   float* p = t.data<float>();
#ifndef QSHARD_RUNTIME_BASE_TENSOR_H_
#define QSHARD_RUNTIME_BASE_TENSOR_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/base/dtype.h"

namespace qshard {

using Shape = std::vector<int64_t>;

enum class Device : uint8_t { kCpu, kCuda };

int64_t NumElements(const Shape& shape);
std::string ShapeToString(const Shape& shape);  // "[384, 1024]"

class Tensor;
// The elements of a host bf16 / f16 / f32 tensor as fp32 (other dtypes: empty vector).
std::vector<float> ToFloatVector(const Tensor& t);

// Returns the pages of freed host tensors to the OS. glibc keeps freed blocks inside its
// heap (resident) unless they sit at its top; after a load that frees many large temporary
// tensors between long-lived ones (weights built, concatenated or repacked, then dropped),
// those holes would stay in the resident set. Cheap; a no-op without glibc.
void ReleaseFreedHostMemory();

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape, void* data, std::shared_ptr<const void> owner,
         Device device = Device::kCpu)
      : dtype_(dtype),
        shape_(std::move(shape)),
        data_(data),
        owner_(std::move(owner)),
        device_(device) {}

  // New host tensor, zero-initialized unless `zero` is false (large caches: pages are
  // then only touched when written).
  static Tensor Empty(DType dtype, Shape shape, bool zero = true);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  Device device() const { return device_; }
  bool defined() const { return data_ != nullptr || numel() == 0; }
  bool empty() const { return data_ == nullptr; }

  void* raw() const { return data_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(data_);
  }
  const std::shared_ptr<const void>& owner() const { return owner_; }

  // A view of rows [begin, end) of the leading dimension, sharing ownership.
  Tensor Rows(int64_t begin, int64_t end) const;
  // The same memory under another shape with the same element count.
  Tensor Reshape(Shape shape) const;

 private:
  DType dtype_ = DType::kF32;
  Shape shape_;
  void* data_ = nullptr;
  std::shared_ptr<const void> owner_;
  Device device_ = Device::kCpu;
};

}  // namespace qshard

#endif  // QSHARD_RUNTIME_BASE_TENSOR_H_
