// CPU quantized linear kernels (runtime/backend/cpu/quant_linear) against a double-precision
// product with the dequantized weights: every integer path (4/8-bit, group sizes, act-order
// permutation, padding of K, bias, int8 W8A8) and every fp8 scale / activation scheme, for
// decode (m <= 4, int16-activation pmaddwd / AVX-512 VNNI kernels) and prefill (m > 4,
// packed fp32 GEMM) sizes, on every ISA path the CPU has (scalar, AVX2, AVX-512; a missing
// one is skipped).
#include "runtime/backend/cpu/quant_linear.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "quant/fp8.h"
#include "quant/gptq_format.h"
#include "runtime/backend/cpu/isa.h"
#include "runtime/backend/cpu/ops.h"
#include "runtime/base/half.h"

namespace qshard {
namespace {

// A GPTQ layer with random codes (AutoGPTQ layout, gptq_v2 zeros) and optional act-order.
LinearWeights RandomGptq(int64_t K, int64_t N, int bits, int64_t group, bool desc_act, bool bias,
                         uint32_t seed) {
  std::mt19937 rng(seed);
  const int per = 32 / bits;
  const int64_t gs = group > 0 ? group : K;
  const int64_t G = (K + gs - 1) / gs;
  LinearWeights w;
  w.name = "test.layer";
  w.format = WeightFormat::kGptq;
  w.in_features = K;
  w.out_features = N;
  w.bits = bits;
  w.group_size = group;
  w.gptq_zeros_minus_one = false;
  w.qweight = Tensor::Empty(DType::kI32, {K / per, N});
  w.qzeros = Tensor::Empty(DType::kI32, {G, N / per});
  w.scales = Tensor::Empty(DType::kF16, {G, N});
  for (int64_t i = 0; i < w.qweight.numel(); ++i) w.qweight.data<uint32_t>()[i] = rng();
  for (int64_t i = 0; i < w.qzeros.numel(); ++i) w.qzeros.data<uint32_t>()[i] = rng();
  std::uniform_real_distribution<float> sd(1e-3f, 2e-2f);
  for (int64_t i = 0; i < w.scales.numel(); ++i) w.scales.data<uint16_t>()[i] = F32ToF16(sd(rng));
  if (desc_act) {
    w.g_idx = Tensor::Empty(DType::kI32, {K});
    std::vector<int32_t> g(K);
    for (int64_t k = 0; k < K; ++k) g[k] = static_cast<int32_t>(k / gs);
    std::shuffle(g.begin(), g.end(), rng);
    std::copy(g.begin(), g.end(), w.g_idx.data<int32_t>());
  }
  if (bias) {
    w.bias = Tensor::Empty(DType::kF32, {N});
    for (int64_t n = 0; n < N; ++n) w.bias.data<float>()[n] = sd(rng) * 10;
  }
  return w;
}

std::vector<float> RandomX(int64_t m, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(m * k);
  for (float& v : x) v = d(rng);
  x[k / 2] = 25.0f;  // an outlier channel, as real activations have
  return x;
}

// max |y - y_ref| / max |y_ref| over the whole output.
double RelErr(const std::vector<float>& y, const std::vector<double>& ref) {
  double err = 0, mag = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    err = std::max(err, std::abs(y[i] - ref[i]));
    mag = std::max(mag, std::abs(ref[i]));
  }
  return err / mag;
}

std::vector<float> RunOp(const LinearWeights& w, const std::vector<float>& x, int64_t m) {
  auto op = cpu::PrepareQuantLinear(w);
  EXPECT_TRUE(op.ok()) << op.status();
  std::vector<float> y(m * w.out_features, -1.0f);
  if (op.ok()) static_cast<const cpu::CpuQuantLinear&>(**op).Run(x.data(), m, y.data());
  return y;
}

class SimdParam : public ::testing::TestWithParam<cpu::Isa> {
 protected:
  bool Simd() const { return GetParam() != cpu::Isa::kScalar; }
  // The decode kernels (SIMD, m <= 4) round each activation chunk of <= 128 inputs to int16
  // with the chunk's own scale: error <= 0.5 / 32767 of the chunk's largest |x|, so a 25-sigma
  // outlier costs ~1e-4 of the output range. Everything else is fp32 (~1e-6).
  double Bound(int64_t m) const { return Simd() && m <= 4 ? 3e-4 : 1e-5; }
  void SetUp() override {
    if (!cpu::CpuSupportsIsa(GetParam())) {
      GTEST_SKIP() << "this CPU lacks " << cpu::IsaName(GetParam());
    }
    ASSERT_TRUE(cpu::SetIsa(GetParam()));
  }
  void TearDown() override { cpu::SetIsa(cpu::DefaultIsa()); }
};

TEST_P(SimdParam, GptqVariantsMatchDoubleReference) {
  struct V {
    int64_t K, N;
    int bits;
    int64_t group;
    bool desc_act, bias;
  };
  for (const V& v :
       {V{256, 48, 4, 128, false, false}, V{256, 40, 4, 32, false, true},
        V{384, 24, 4, 64, true, false}, V{512, 16, 4, -1, false, false},
        V{200, 24, 4, 128, false, true},  // K not a multiple of 32: padding
        V{600, 40, 4, 128, false, true},  // > 2 GEMM K blocks, N not a tile multiple
        V{328, 72, 4, 32, true, false},   // g32 chunks, act-order, N not a tile multiple
        V{256, 32, 8, 128, false, false}, V{320, 8, 8, -1, true, true}}) {
    for (int64_t m : {1, 2, 3, 4, 5, 17, 64}) {
      SCOPED_TRACE(::testing::Message()
                   << "K " << v.K << " N " << v.N << " bits " << v.bits << " group " << v.group
                   << " desc_act " << v.desc_act << " m " << m);
      LinearWeights w = RandomGptq(v.K, v.N, v.bits, v.group, v.desc_act, v.bias, 42);
      auto q = UnpackGptq(w);
      ASSERT_TRUE(q.ok()) << q.status();
      std::vector<float> x = RandomX(m, v.K, 9);
      std::vector<double> ref(m * v.N);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t n = 0; n < v.N; ++n) {
          double s = v.bias ? w.bias.data<float>()[n] : 0.0;
          for (int64_t k = 0; k < v.K; ++k)
            s += static_cast<double>(x[r * v.K + k]) * q->Dequant(n, k);
          ref[r * v.N + n] = s;
        }
      }
      EXPECT_LT(RelErr(RunOp(w, x, m), ref), Bound(m));
    }
  }
}

TEST_P(SimdParam, Int8W8A8MatchesQuantizedActivationReference) {
  for (const auto& [K, N] : {std::pair<int64_t, int64_t>{256, 24}, {200, 37}, {608, 70}}) {
    SCOPED_TRACE(::testing::Message() << "K " << K << " N " << N);
    std::mt19937 rng(3);
    LinearWeights w;
    w.name = "test.int8";
    w.format = WeightFormat::kInt8;
    w.in_features = K;
    w.out_features = N;
    w.weight = Tensor::Empty(DType::kI8, {N, K});
    w.weight_scale = Tensor::Empty(DType::kF32, {N, 1});
    for (int64_t i = 0; i < N * K; ++i)
      w.weight.data<int8_t>()[i] = static_cast<int8_t>(rng() % 255 - 127);
    for (int64_t n = 0; n < N; ++n) w.weight_scale.data<float>()[n] = 1e-3f * (1 + n % 5);
    for (bool w8a8 : {false, true}) {
      w.act_quant = w8a8 ? ActQuant::kInt8PerToken : ActQuant::kNone;
      for (int64_t m : {1, 2, 3, 4, 5, 9, 17, 64}) {
        std::vector<float> x = RandomX(m, K, 5);
        std::vector<double> ref(m * N);
        for (int64_t r = 0; r < m; ++r) {
          std::vector<double> xq(x.begin() + r * K, x.begin() + (r + 1) * K);
          if (w8a8) {
            double amax = 0;
            for (double v : xq) amax = std::max(amax, std::abs(v));
            const float s = static_cast<float>(amax) / 127.0f;
            for (double& v : xq) v = std::nearbyint(static_cast<float>(v) / s) * s;
          }
          for (int64_t n = 0; n < N; ++n) {
            double acc = 0;
            for (int64_t k = 0; k < K; ++k) {
              acc += xq[k] * w.weight.data<int8_t>()[n * K + k] * w.weight_scale.data<float>()[n];
            }
            ref[r * N + n] = acc;
          }
        }
        EXPECT_LT(RelErr(RunOp(w, x, m), ref), w8a8 ? 1e-5 : Bound(m))
            << "w8a8 " << w8a8 << " m " << m;
      }
    }
  }
}

TEST_P(SimdParam, Fp8ScalesAndActivationSchemes) {
  const int64_t K = 272, N = 40;  // K not a multiple of 16 or of the block: tails
  std::mt19937 rng(8);
  LinearWeights w;
  w.name = "test.fp8";
  w.format = WeightFormat::kFp8;
  w.in_features = K;
  w.out_features = N;
  w.weight = Tensor::Empty(DType::kF8E4M3, {N, K});
  for (int64_t i = 0; i < N * K; ++i) {
    uint8_t c = static_cast<uint8_t>(rng());
    if (IsE4M3NaN(c)) c = 0;
    w.weight.data<uint8_t>()[i] = c;
  }
  struct V {
    const char* name;
    Shape scale_shape;
    std::vector<int64_t> block;
    ActQuant act;
  };
  for (const V& v :
       {V{"tensor", {1}, {}, ActQuant::kNone}, V{"channel", {N, 1}, {}, ActQuant::kFp8PerToken},
        V{"block", {(N + 15) / 16, (K + 127) / 128}, {16, 128}, ActQuant::kFp8PerTokenGroup},
        V{"static", {1}, {}, ActQuant::kFp8Static}}) {
    w.weight_scale = Tensor::Empty(DType::kF32, v.scale_shape);
    for (int64_t i = 0; i < w.weight_scale.numel(); ++i) {
      w.weight_scale.data<float>()[i] = 1e-3f * (1 + i % 7);
    }
    w.block_size = v.block;
    w.act_quant = v.act;
    w.act_group_size = 128;
    w.input_scale = Tensor();
    if (v.act == ActQuant::kFp8Static) {
      w.input_scale = Tensor::Empty(DType::kF32, {1});
      w.input_scale.data<float>()[0] = 0.05f;
    }
    for (int64_t m : {1, 2, 5, 17, 64}) {
      SCOPED_TRACE(::testing::Message() << v.name << " m " << m);
      std::vector<float> x = RandomX(m, K, 12);
      std::vector<double> ref(m * N);
      for (int64_t r = 0; r < m; ++r) {
        std::vector<float> xq(x.begin() + r * K, x.begin() + (r + 1) * K);
        const int64_t group = v.act == ActQuant::kFp8PerTokenGroup ? 128 : K;
        for (int64_t g0 = 0; v.act != ActQuant::kNone && g0 < K; g0 += group) {
          const int64_t g1 = std::min(K, g0 + group);
          float amax = 0;
          for (int64_t i = g0; i < g1; ++i) amax = std::max(amax, std::abs(xq[i]));
          const float s = v.act == ActQuant::kFp8Static ? 0.05f : amax / 448.0f;
          for (int64_t i = g0; i < g1; ++i) xq[i] = E4M3ToFloat(FloatToE4M3(xq[i] / s)) * s;
        }
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0;
          for (int64_t k = 0; k < K; ++k) {
            const int64_t si = v.block.empty() ? (w.weight_scale.numel() == 1 ? 0 : n)
                                               : (n / 16) * ((K + 127) / 128) + k / 128;
            acc += static_cast<double>(xq[k]) * E4M3ToFloat(w.weight.data<uint8_t>()[n * K + k]) *
                   w.weight_scale.data<float>()[si];
          }
          ref[r * N + n] = acc;
        }
      }
      EXPECT_LT(RelErr(RunOp(w, x, m), ref), 1e-5);
    }
  }
}

TEST(QuantLinearTest, KernelNamesAndPackedBytes) {
  LinearWeights w = RandomGptq(256, 64, 4, 128, false, false, 1);
  auto op = cpu::PrepareQuantLinear(w);
  ASSERT_TRUE(op.ok()) << op.status();
  // The suffix names the ISA the kernels run with now ("-avx512", "-avx2", "-scalar").
  const std::string suffix = std::string("-") + cpu::IsaName(cpu::ActiveIsa());
  EXPECT_EQ((*op)->kernel_name(), "cpu-gptq-w4g128" + suffix);
  // Codes 4 bits + fp32 scale and scale*zero per 128 inputs: near the packed size.
  const int64_t packed = w.qweight.nbytes() + w.qzeros.nbytes() + w.scales.nbytes();
  EXPECT_LE((*op)->weight_bytes(), packed * 12 / 10);
  LinearWeights bad = w;
  bad.scales = Tensor::Empty(DType::kF16, {3, 64});
  auto err = cpu::PrepareQuantLinear(bad);
  ASSERT_FALSE(err.ok());
  EXPECT_NE(err.status().message().find("test.layer.scales: shape [3, 64], expected [2, 64]"),
            std::string::npos)
      << err.status();
}

INSTANTIATE_TEST_SUITE_P(Simd, SimdParam,
                         ::testing::Values(cpu::Isa::kAvx512, cpu::Isa::kAvx2, cpu::Isa::kScalar),
                         [](const ::testing::TestParamInfo<cpu::Isa>& i) {
                           return std::string(cpu::IsaName(i.param));
                         });

}  // namespace
}  // namespace qshard

namespace qshard {
namespace {

TEST(QuantLinearTest, Fp8ActivationRoundingMatchesCodecOnEveryBinade) {
  // W = identity (e4m3 1.0 = 0x38, scale 1): y is the fake-quantized x itself, so the
  // vectorized rounding must agree exactly with FloatToE4M3 / E4M3ToFloat, including
  // subnormals, ties, and values that saturate.
  const int64_t K = 64;
  LinearWeights w;
  w.name = "test.eye";
  w.format = WeightFormat::kFp8;
  w.in_features = K;
  w.out_features = K;
  w.weight = Tensor::Empty(DType::kF8E4M3, {K, K});
  for (int64_t i = 0; i < K; ++i) w.weight.data<uint8_t>()[i * K + i] = 0x38;
  w.weight_scale = Tensor::Empty(DType::kF32, {1});
  w.weight_scale.data<float>()[0] = 1.0f;
  w.act_quant = ActQuant::kFp8Static;
  w.input_scale = Tensor::Empty(DType::kF32, {1});
  w.input_scale.data<float>()[0] = 1.0f;
  auto op = cpu::PrepareQuantLinear(w);
  ASSERT_TRUE(op.ok()) << op.status();
  std::mt19937 rng(4);
  for (int simd = 0; simd < 2; ++simd) {
    cpu::SetSimdEnabled(simd == 1);
    for (int rep = 0; rep < 2000; ++rep) {
      std::vector<float> x(K), y(K);
      for (float& v : x) {
        // Exact ties and values on either side of them, over 2^-12 .. 2^10.
        const float mant = 1.0f + static_cast<float>(rng() % 129) / 128.0f;
        v = std::ldexp(mant, static_cast<int>(rng() % 23) - 12) * ((rng() & 1) ? -1.0f : 1.0f);
      }
      static_cast<const cpu::CpuQuantLinear&>(**op).Run(x.data(), 1, y.data());
      for (int64_t i = 0; i < K; ++i) {
        ASSERT_EQ(y[i], E4M3ToFloat(FloatToE4M3(x[i]))) << "x = " << x[i] << " simd " << simd;
      }
    }
  }
  cpu::SetSimdEnabled(true);
}

}  // namespace
}  // namespace qshard
