// File: cuda_test_util.h
// Assertion helpers shared by the GPU op tests (tests/backend/cuda/*_test.cc).
#ifndef QSHARD_TESTS_BACKEND_CUDA_CUDA_TEST_UTIL_H_
#define QSHARD_TESTS_BACKEND_CUDA_CUDA_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"
#include "runtime/base/status_macros.h"

// Fails the test (and returns from it) when `expr` is not OK, printing the status.
#define QSHARD_ASSERT_OK(expr)                  \
  do {                                          \
    const ::absl::Status qshard_st_ = (expr);   \
    ASSERT_TRUE(qshard_st_.ok()) << qshard_st_; \
  } while (0)

// lhs = value of the StatusOr `expr`, or fail the test with its status.
#define QSHARD_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  QSHARD_ASSERT_OK_AND_ASSIGN_IMPL_(QSHARD_CONCAT_(qshard_test_or_, __LINE__), lhs, expr)
#define QSHARD_ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                      \
  ASSERT_TRUE(tmp.ok()) << tmp.status();                  \
  lhs = std::move(tmp).value()

namespace qshard::cuda::testing {

// "float32", "bfloat16", ... for test names and messages.
inline std::string Name(DType t) { return std::string(DTypeName(t)); }

// Base fixture of the GPU op tests: skips the test without a CUDA device (CI has none;
// scripts/device-check.sh runs them on a GPU machine) and gives it a stream.
class CudaStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!CudaDeviceAvailable()) {
      GTEST_SKIP() << "no CUDA device or driver on this machine: GPU op test skipped";
    }
    auto s = CudaStream::Create();
    ASSERT_TRUE(s.ok()) << s.status();
    stream_ = std::move(s).value();
  }
  cudaStream_t stream() const { return stream_.get(); }

  CudaStream stream_;
};

}  // namespace qshard::cuda::testing

#endif  // QSHARD_TESTS_BACKEND_CUDA_CUDA_TEST_UTIL_H_
