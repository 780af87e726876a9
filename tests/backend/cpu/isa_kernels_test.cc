// The CPU linear kernels on every instruction-set path (scalar, AVX2+FMA, AVX-512) against
// float64 references, on ragged sizes: K not a multiple of 8/16/32/64 or of the GEMM's K
// block (256), N not a multiple of the microkernel widths (16 / 32), m across the decode
// (<= 4 rows: GEMV) and prefill (packed GEMM: 6- or 12-row tiles plus tails) paths.
// A path the CPU lacks is skipped (GTEST_SKIP), never failed.
//
// Tolerances: every path computes fp32 sums of exact products (bf16/f16/f32 weights are
// exact in fp32), so |got - want| <= 1e-5 * sum_i |x_i w_i| + 1e-6 (+ 1e-6 |bias|), the
// bound of ops_test's Linear test: sequential fp32 accumulation of K <= 1100 terms stays
// well inside it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "runtime/backend/cpu/gemm.h"
#include "runtime/backend/cpu/isa.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/base/half.h"
#include "runtime/base/tensor.h"

namespace qshard {
namespace {

using cpu::Isa;

class IsaTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!cpu::CpuSupportsIsa(GetParam())) {
      GTEST_SKIP() << "this CPU lacks " << cpu::IsaName(GetParam());
    }
    ASSERT_TRUE(cpu::SetIsa(GetParam()));
  }
  void TearDown() override { cpu::SetIsa(cpu::DefaultIsa()); }
};

INSTANTIATE_TEST_SUITE_P(Isas, IsaTest, ::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512),
                         [](const ::testing::TestParamInfo<Isa>& info) {
                           return std::string(cpu::IsaName(info.param));
                         });

TEST(IsaSelection, NamesParseAndDefaultIsSupported) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    Isa parsed;
    ASSERT_TRUE(cpu::ParseIsa(cpu::IsaName(isa), &parsed));
    EXPECT_EQ(parsed, isa);
  }
  Isa unused;
  EXPECT_FALSE(cpu::ParseIsa("sse2", &unused));
  EXPECT_TRUE(cpu::CpuSupportsIsa(cpu::DefaultIsa()));
  EXPECT_TRUE(cpu::CpuSupportsIsa(Isa::kScalar));
  EXPECT_EQ(cpu::ActiveIsa(), cpu::DefaultIsa());
  // SetSimdEnabled maps onto the ISA switch.
  cpu::SetSimdEnabled(false);
  EXPECT_EQ(cpu::ActiveIsa(), Isa::kScalar);
  EXPECT_FALSE(cpu::HasAvx2());
  cpu::SetSimdEnabled(true);
  EXPECT_EQ(cpu::ActiveIsa(), cpu::DefaultIsa());
  if (!cpu::CpuSupportsIsa(Isa::kAvx512)) {
    EXPECT_FALSE(cpu::SetIsa(Isa::kAvx512));
  }
}

// Stored weight values: bf16/f16 rounding applied, as doubles.
std::vector<double> FillWeights(Tensor& t, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) {
    const float f = dist(rng);
    if (t.dtype() == DType::kBF16) {
      t.data<uint16_t>()[i] = F32ToBf16(f);
      v[i] = Bf16ToF32(t.data<uint16_t>()[i]);
    } else if (t.dtype() == DType::kF16) {
      t.data<uint16_t>()[i] = F32ToF16(f);
      v[i] = F16ToF32(t.data<uint16_t>()[i]);
    } else {
      t.data<float>()[i] = f;
      v[i] = f;
    }
  }
  return v;
}

// Checks y[m, n] (row stride ldy) against x . w^T + bias in float64.
::testing::AssertionResult MatchesReference(const std::vector<float>& x, int64_t m, int64_t k,
                                            const std::vector<double>& w, int64_t n,
                                            const std::vector<float>& bias, const float* y,
                                            int64_t ldy) {
  int bad = 0;
  ::testing::AssertionResult result = ::testing::AssertionFailure();
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      double s = bias.empty() ? 0.0 : bias[j], mag = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        const double p = static_cast<double>(x[r * k + i]) * w[j * k + i];
        s += p;
        mag += std::fabs(p);
      }
      const double tol = 1e-5 * mag + 1e-6 + (bias.empty() ? 0.0 : 1e-6 * std::fabs(bias[j]));
      const double got = y[r * ldy + j];
      if (!(std::fabs(got - s) <= tol)) {
        if (bad++ < 5) {
          result << "\n  y[" << r << ", " << j << "] = " << got << ", want " << s << " (tol " << tol
                 << ")";
        }
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return result << "\n  " << bad << " of " << m * n << " out of tolerance";
}

TEST_P(IsaTest, DenseLinearRaggedShapes) {
  const int64_t ms[] = {1, 2, 3, 4, 5, 17, 64};
  const int64_t ks[] = {1, 37, 100, 255, 257, 600};
  const int64_t ns[] = {1, 15, 33, 70, 130};
  std::mt19937 rng(21);
  int shape = 0;
  for (DType dt : {DType::kBF16, DType::kF16, DType::kF32}) {
    for (int64_t k : ks) {
      for (int64_t m : ms) {
        const int64_t n = ns[shape++ % 5];
        SCOPED_TRACE(::testing::Message()
                     << "m=" << m << " k=" << k << " n=" << n << " w=" << DTypeName(dt).data());
        Tensor w = Tensor::Empty(dt, {n, k});
        const std::vector<double> wv = FillWeights(w, rng);
        std::vector<float> x(m * k);
        std::uniform_real_distribution<float> xd(-2.0f, 2.0f);
        for (float& v : x) v = xd(rng);
        const bool with_bias = shape % 2 == 0;
        Tensor bias_t = Tensor::Empty(DType::kF32, {n});
        std::vector<float> bias;
        if (with_bias) {
          for (int64_t j = 0; j < n; ++j) bias.push_back(bias_t.data<float>()[j] = xd(rng));
        }
        // Guard elements after the output catch writes past the last tile.
        const int64_t ldy = n;
        std::vector<float> y(m * ldy + 4, 12345.0f);
        cpu::Linear(x.data(), m, w, with_bias ? &bias_t : nullptr, y.data());
        ASSERT_TRUE(MatchesReference(x, m, k, wv, n, bias, y.data(), ldy));
        for (int g = 0; g < 4; ++g) ASSERT_EQ(y[m * ldy + g], 12345.0f) << "guard " << g;
      }
    }
  }
}

TEST_P(IsaTest, GroupedAttentionHelpers) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (int64_t rows : {1, 3, 8, 9, 17}) {
    for (int64_t dim : {8, 64, 67, 128}) {
      SCOPED_TRACE(::testing::Message() << "rows=" << rows << " d=" << dim);
      std::vector<float> q(rows * dim), k(dim), p(rows * 2), acc(rows * dim), out(rows + 1, 5.0f);
      for (float& v : q) v = d(rng);
      for (float& v : k) v = d(rng);
      for (float& v : p) v = d(rng);
      for (float& v : acc) v = d(rng);
      const std::vector<float> acc0 = acc;
      cpu::DotRows(q.data(), rows, k.data(), dim, 0.125f, out.data());
      cpu::AxpyRows(p.data(), 2, k.data(), rows, dim, acc.data());
      for (int64_t r = 0; r < rows; ++r) {
        double s = 0.0, mag = 0.0;
        for (int64_t i = 0; i < dim; ++i) {
          s += static_cast<double>(q[r * dim + i]) * k[i];
          mag += std::fabs(static_cast<double>(q[r * dim + i]) * k[i]);
        }
        EXPECT_NEAR(out[r], s * 0.125, 0.125 * (1e-5 * mag + 1e-6)) << "row " << r;
        for (int64_t i = 0; i < dim; ++i) {
          const double want = acc0[r * dim + i] + static_cast<double>(p[r * 2]) * k[i];
          EXPECT_NEAR(acc[r * dim + i], want, 2e-7 * (std::fabs(want) + 1.0));
        }
      }
      EXPECT_EQ(out[rows], 5.0f) << "wrote past the end";
    }
  }
}

// A plain fp32 [N, K] matrix as a GEMM weight source.
class F32Source : public cpu::WeightPanelSource {
 public:
  F32Source(const std::vector<float>& w, int64_t k) : w_(w), k_(k) {}
  void Dequant(int64_t n0, int64_t count, int64_t k0, int64_t k1, float* out,
               int64_t ldo) const override {
    EXPECT_EQ(k0 % cpu::kGemmKBlock, 0);
    EXPECT_TRUE(k1 == k0 + cpu::kGemmKBlock || k1 == k_) << k0 << " " << k1;
    for (int64_t j = 0; j < count; ++j) {
      std::copy(w_.begin() + (n0 + j) * k_ + k0, w_.begin() + (n0 + j) * k_ + k1, out + j * ldo);
    }
  }

 private:
  const std::vector<float>& w_;
  int64_t k_;
};

TEST_P(IsaTest, PackedGemmStridesAndBlocks) {
  if (GetParam() == Isa::kScalar) GTEST_SKIP() << "PackedGemm is the SIMD path only";
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  struct S {
    int64_t m, k, n;
  };
  for (const S& s : {S{5, 513, 47}, S{13, 256, 32}, S{25, 1100, 97}, S{64, 31, 300}, S{7, 768, 16},
                     S{1, 300, 65}}) {
    SCOPED_TRACE(::testing::Message() << "m=" << s.m << " k=" << s.k << " n=" << s.n);
    // x and y are views with row strides larger than their widths.
    const int64_t ldx = s.k + 3, ldy = s.n + 5;
    std::vector<float> xs(s.m * ldx), w(s.n * s.k), bias(s.n);
    for (float& v : xs) v = d(rng);
    for (float& v : w) v = d(rng);
    for (float& v : bias) v = d(rng);
    std::vector<float> x(s.m * s.k);
    for (int64_t r = 0; r < s.m; ++r) {
      std::copy(xs.begin() + r * ldx, xs.begin() + r * ldx + s.k, x.begin() + r * s.k);
    }
    const std::vector<double> wd(w.begin(), w.end());
    std::vector<float> y(s.m * ldy, 777.0f);
    cpu::PackedGemm(F32Source(w, s.k), xs.data(), ldx, s.m, s.k, s.n, bias.data(), y.data(), ldy);
    ASSERT_TRUE(MatchesReference(x, s.m, s.k, wd, s.n, bias, y.data(), ldy));
    for (int64_t r = 0; r < s.m; ++r) {
      for (int64_t j = s.n; j < ldy; ++j) ASSERT_EQ(y[r * ldy + j], 777.0f) << r << " " << j;
    }
  }
}

}  // namespace
}  // namespace qshard
