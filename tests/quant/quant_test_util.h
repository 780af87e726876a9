// File: quant_test_util.h
// Random data shared by the quantizer tests (GPTQ, AWQ).
#ifndef QSHARD_TESTS_QUANT_QUANT_TEST_UTIL_H_
#define QSHARD_TESTS_QUANT_QUANT_TEST_UTIL_H_

#include <cstdint>
#include <random>
#include <vector>

namespace qshard::testing {

// w [n, k] ~ N(0, 0.02), the scale of trained Llama linears.
inline std::vector<float> RandomWeights(int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<float> w(static_cast<size_t>(n * k));
  for (float& v : w) v = d(rng);
  return w;
}

}  // namespace qshard::testing

#endif  // QSHARD_TESTS_QUANT_QUANT_TEST_UTIL_H_
