// Round-to-nearest quantization and the checkpoint packers of quant/quantize_weights.h.
// QuantizeRtn is checked against a float64 reimplementation of the documented formulas
// (docs/reference/quant-formats-and-anchors.md sec. D); every packer is read back with the
// existing readers (UnpackGptq / UnpackAwq / UnpackInt8 / Fp8Scales), which must reproduce
// the packed matrix exactly.
#include "quant/quantize_weights.h"

#include <cfloat>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "quant/awq_format.h"
#include "quant/compressed_tensors.h"
#include "quant/fp8.h"
#include "quant/gptq_format.h"
#include "runtime/base/half.h"

namespace qshard {
namespace {

std::vector<float> RandomWeights(int64_t n, int64_t k, uint32_t seed, float std = 0.02f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, std);
  std::vector<float> w(static_cast<size_t>(n * k));
  for (float& v : w) v = d(rng);
  return w;
}

// Every field equal (scales are f16-representable, so the packers must not change them).
void ExpectSameMatrix(const IntQuantMatrix& got, const IntQuantMatrix& want) {
  ASSERT_EQ(got.in_features, want.in_features);
  ASSERT_EQ(got.out_features, want.out_features);
  ASSERT_EQ(got.num_groups, want.num_groups);
  ASSERT_EQ(got.bits, want.bits);
  EXPECT_EQ(got.codes, want.codes);
  EXPECT_EQ(got.scales, want.scales);
  EXPECT_EQ(got.zeros, want.zeros);
  EXPECT_EQ(got.g_idx, want.g_idx);
  int64_t bad = 0;
  for (int64_t n = 0; n < want.out_features; ++n) {
    for (int64_t k = 0; k < want.in_features; ++k) bad += got.Dequant(n, k) != want.Dequant(n, k);
  }
  EXPECT_EQ(bad, 0);
}

struct RtnCase {
  int bits;
  int64_t group;
  bool sym;
  bool clip;
};

TEST(QuantizeRtnTest, MatchesFloat64Reference) {
  const int64_t N = 24, K = 256;
  for (const RtnCase& c :
       {RtnCase{4, 128, true, false}, RtnCase{4, 128, false, false}, RtnCase{4, 32, false, true},
        RtnCase{4, -1, true, false}, RtnCase{8, 64, false, false}, RtnCase{8, 128, true, true},
        RtnCase{2, 64, false, false}, RtnCase{3, 32, true, false}}) {
    SCOPED_TRACE(::testing::Message() << "bits " << c.bits << " group " << c.group << " sym "
                                      << c.sym << " clip " << c.clip);
    std::vector<float> w = RandomWeights(N, K, 11 + c.bits);
    for (int64_t k = 0; k < 32; ++k) w[3 * K + k] = 0.0f;  // an all-zero group (g32)
    for (int64_t k = 0; k < K; ++k) w[5 * K + k] = std::fabs(w[5 * K + k]);  // all positive
    const int64_t gs = c.group > 0 ? c.group : K, G = (K + gs - 1) / gs;
    std::vector<float> clip;
    if (c.clip) {
      clip.resize(N * G);
      for (size_t i = 0; i < clip.size(); ++i) clip[i] = 0.01f + 0.001f * (i % 7);
    }
    const IntQuantMatrix m =
        QuantizeRtn(w.data(), N, K, {c.bits, c.group, c.sym}, c.clip ? clip.data() : nullptr);
    ASSERT_EQ(m.num_groups, G);
    const double maxq = (1 << c.bits) - 1;
    int64_t code_mismatch = 0;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const double lim = c.clip ? clip[n * G + g] : INFINITY;
        double xmin = 0, xmax = 0;
        for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) {
          const double v = std::clamp<double>(w[n * K + k], -lim, lim);
          xmin = std::min(xmin, v);
          xmax = std::max(xmax, v);
        }
        if (c.sym) {
          xmax = std::max(-xmin, xmax);
          xmin = -xmax;
        }
        if (xmin == 0 && xmax == 0) xmin = -1, xmax = 1;
        // The scale is stored as f16: the reference rounds it the same way.
        const double scale = F16ToF32(F32ToF16(static_cast<float>((xmax - xmin) / maxq)));
        const double zero =
            c.sym ? (maxq + 1) / 2 : std::clamp(std::nearbyint(-xmin / scale), 0.0, maxq);
        EXPECT_EQ(m.scales[g * N + n], scale) << "n " << n << " g " << g;
        EXPECT_EQ(m.zeros[g * N + n], zero) << "n " << n << " g " << g;
        for (int64_t k = g * gs; k < std::min(K, (g + 1) * gs); ++k) {
          EXPECT_EQ(m.g_idx[k], g);
          const double v = std::clamp<double>(w[n * K + k], -lim, lim) / scale;
          const double want = std::clamp(std::nearbyint(v) + zero, 0.0, maxq);
          if (m.codes[n * K + k] != want) {
            // Tolerance: float vs double division may only disagree right at a .5 tie.
            ++code_mismatch;
            EXPECT_LT(std::fabs(std::fabs(v - std::trunc(v)) - 0.5), 1e-5) << v;
          }
        }
      }
    }
    EXPECT_LE(code_mismatch, 2);
  }
}

TEST(QuantizeRtnTest, ZeroWeightsQuantizeToZero) {
  std::vector<float> w(8 * 64, 0.0f);
  for (bool sym : {true, false}) {
    const IntQuantMatrix m = QuantizeRtn(w.data(), 8, 64, {4, 32, sym});
    for (int64_t n = 0; n < 8; ++n) {
      for (int64_t k = 0; k < 64; ++k) EXPECT_EQ(m.Dequant(n, k), 0.0f);
    }
  }
}

struct PackCase {
  int bits;
  int64_t group;
  bool sym, v1, shuffle;
};

TEST(PackGptqTest, RoundTripsThroughTheReader) {
  const int64_t N = 64, K = 256;
  for (const PackCase& c :
       {PackCase{4, 128, true, true, false}, PackCase{4, 128, true, false, false},
        PackCase{4, 32, false, false, false}, PackCase{4, 64, false, true, false},
        PackCase{4, -1, false, false, false}, PackCase{4, -1, true, true, false},
        PackCase{8, 128, true, true, false}, PackCase{8, 32, false, false, false},
        PackCase{8, 64, false, true, false}, PackCase{8, -1, true, false, false},
        PackCase{4, 64, false, false, true}, PackCase{8, 32, true, true, true}}) {
    SCOPED_TRACE(::testing::Message() << "bits " << c.bits << " group " << c.group << " sym "
                                      << c.sym << " v1 " << c.v1 << " act-order " << c.shuffle);
    std::vector<float> w = RandomWeights(N, K, 5 + c.bits);
    IntQuantMatrix m = QuantizeRtn(w.data(), N, K, {c.bits, c.group, c.sym});
    if (c.shuffle) {  // act-order: a non-monotone g_idx (groups keep their sizes)
      std::mt19937 rng(3);
      std::shuffle(m.g_idx.begin(), m.g_idx.end(), rng);
    }
    if (c.v1 && !c.sym) {  // v1 cannot store an asymmetric zero of 0
      for (float& z : m.zeros) z = std::max(z, 1.0f);
    }
    auto lw = PackGptq(m, "layer.q", c.sym, c.v1);
    ASSERT_TRUE(lw.ok()) << lw.status();
    EXPECT_EQ(lw->format, WeightFormat::kGptq);
    EXPECT_EQ(lw->group_size, c.group > 0 && c.group < K ? c.group : -1);
    EXPECT_EQ(lw->gptq_zeros_minus_one, c.v1);
    EXPECT_EQ(lw->has_zero_point, !c.sym);
    EXPECT_EQ(lw->scales.dtype(), DType::kF16);
    EXPECT_EQ(lw->g_idx.shape(), Shape({K}));
    auto back = UnpackGptq(*lw);
    ASSERT_TRUE(back.ok()) << back.status();
    ExpectSameMatrix(*back, m);
  }
}

TEST(PackGptqTest, SymmetricV1ZerosAreAllSevens) {
  std::vector<float> w = RandomWeights(16, 128, 1);
  auto lw = PackGptq(QuantizeRtn(w.data(), 16, 128, {4, 128, true}), "l", true, true);
  ASSERT_TRUE(lw.ok());
  for (int64_t i = 0; i < lw->qzeros.numel(); ++i) {
    EXPECT_EQ(lw->qzeros.data<uint32_t>()[i], 0x77777777u);
  }
}

TEST(PackGptqTest, Errors) {
  std::vector<float> w = RandomWeights(16, 128, 2);
  for (int64_t k = 0; k < 128; ++k) w[k] = std::fabs(w[k]);  // row 0: zero point 0 (asym)
  const IntQuantMatrix asym = QuantizeRtn(w.data(), 16, 128, {4, 64, false});
  ASSERT_EQ(asym.zeros[0], 0.0f);
  auto v1 = PackGptq(asym, "model.layers.3.mlp.up_proj", false, true);
  ASSERT_FALSE(v1.ok());
  EXPECT_NE(v1.status().message().find("model.layers.3.mlp.up_proj"), std::string::npos);
  EXPECT_NE(v1.status().message().find("gptq_v2"), std::string::npos);
  EXPECT_TRUE(PackGptq(asym, "l", false, false).ok());  // v2 stores it
  // A symmetric pack of asymmetric zeros is inconsistent.
  EXPECT_FALSE(PackGptq(asym, "l", true, false).ok());

  const IntQuantMatrix b3 = QuantizeRtn(w.data(), 16, 128, {3, 64, true});
  auto e3 = PackGptq(b3, "layer.x", true, false);
  ASSERT_FALSE(e3.ok());
  EXPECT_NE(e3.status().message().find("layer.x"), std::string::npos);

  std::vector<float> w12 = RandomWeights(12, 128, 3);  // N = 12: not a multiple of 8
  EXPECT_FALSE(PackGptq(QuantizeRtn(w12.data(), 12, 128, {4, 64, true}), "l", true, true).ok());
  std::vector<float> k36 = RandomWeights(16, 36, 4);  // K = 36: not a multiple of 8
  EXPECT_FALSE(PackGptq(QuantizeRtn(k36.data(), 16, 36, {4, -1, true}), "l", true, true).ok());
}

TEST(PackAwqTest, RoundTripsThroughTheReader) {
  const int64_t N = 48, K = 256;
  for (int64_t group : {int64_t{128}, int64_t{64}, int64_t{32}, int64_t{-1}}) {
    for (bool sym : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "group " << group << " sym " << sym);
      std::vector<float> w = RandomWeights(N, K, 9);
      const IntQuantMatrix m = QuantizeRtn(w.data(), N, K, {4, group, sym});
      auto lw = PackAwq(m, "layer.awq");
      ASSERT_TRUE(lw.ok()) << lw.status();
      EXPECT_EQ(lw->format, WeightFormat::kAwq);
      EXPECT_EQ(lw->qweight.shape(), Shape({K, N / 8}));
      auto back = UnpackAwq(*lw);
      ASSERT_TRUE(back.ok()) << back.status();
      ExpectSameMatrix(*back, m);
    }
  }
}

TEST(PackAwqTest, Errors) {
  std::vector<float> w = RandomWeights(16, 128, 2);
  IntQuantMatrix m = QuantizeRtn(w.data(), 16, 128, {4, 32, false});
  EXPECT_TRUE(PackAwq(m, "l").ok());
  IntQuantMatrix shuffled = m;
  std::swap(shuffled.g_idx[0], shuffled.g_idx[100]);
  auto e = PackAwq(shuffled, "layer.7.v");
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("layer.7.v"), std::string::npos);
  EXPECT_FALSE(PackAwq(QuantizeRtn(w.data(), 16, 128, {8, 32, false}), "l").ok());
  std::vector<float> w12 = RandomWeights(12, 128, 3);
  EXPECT_FALSE(PackAwq(QuantizeRtn(w12.data(), 12, 128, {4, 32, false}), "l").ok());
}

TEST(PerChannelTest, Fp8RoundTrips) {
  const int64_t N = 16, K = 96;
  std::vector<float> w = RandomWeights(N, K, 21);
  for (int64_t k = 0; k < K; ++k) w[2 * K + k] = 0.0f;  // a zero row
  w[5 * K + 7] = 3.0f;                                  // an outlier
  LinearWeights lw = QuantizeFp8PerChannel(w.data(), N, K, "l.fp8", /*dynamic_act=*/true);
  EXPECT_EQ(lw.format, WeightFormat::kFp8);
  EXPECT_EQ(lw.act_quant, ActQuant::kFp8PerToken);
  EXPECT_EQ(QuantizeFp8PerChannel(w.data(), N, K, "l", false).act_quant, ActQuant::kNone);
  auto grid = Fp8Scales(lw);
  ASSERT_TRUE(grid.ok()) << grid.status();
  for (int64_t n = 0; n < N; ++n) {
    float amax = 0;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(w[n * K + k]));
    const float s = grid->at(n, 0);
    EXPECT_GT(s, 0.0f);
    EXPECT_FLOAT_EQ(s, std::max(amax / 448.0f, FLT_EPSILON));
    for (int64_t k = 0; k < K; ++k) {
      const float deq = E4M3ToFloat(lw.weight.data<uint8_t>()[n * K + k]) * s;
      // e4m3: 3 mantissa bits -> relative error <= 2^-4; subnormals: absolute 2^-10 * s.
      EXPECT_LE(std::fabs(deq - w[n * K + k]), std::fabs(w[n * K + k]) / 16 + s / 1024 + 1e-12);
    }
  }
}

TEST(PerChannelTest, Int8RoundTrips) {
  const int64_t N = 16, K = 96;
  std::vector<float> w = RandomWeights(N, K, 22);
  for (int64_t k = 0; k < K; ++k) w[k] = 0.0f;
  LinearWeights lw = QuantizeInt8PerChannel(w.data(), N, K, "l.int8", /*dynamic_act=*/true);
  EXPECT_EQ(lw.format, WeightFormat::kInt8);
  EXPECT_EQ(lw.act_quant, ActQuant::kInt8PerToken);
  auto m = UnpackInt8(lw);
  ASSERT_TRUE(m.ok()) << m.status();
  for (int64_t n = 0; n < N; ++n) {
    const float s = lw.weight_scale.data<float>()[n];
    EXPECT_GT(s, 0.0f);
    for (int64_t k = 0; k < K; ++k) {
      const int8_t q = lw.weight.data<int8_t>()[n * K + k];
      EXPECT_GE(q, -127);
      EXPECT_EQ(q, static_cast<int8_t>(std::nearbyint(w[n * K + k] / s)));
      EXPECT_LE(std::fabs(m->Dequant(n, k) - w[n * K + k]), s / 2 * (1 + 1e-6));
    }
  }
}

TEST(CheckpointTensorsTest, NamesPerFormat) {
  std::vector<float> w = RandomWeights(16, 64, 1);
  auto names = [](const LinearWeights& lw) {
    std::vector<std::string> out;
    for (const auto& [name, t] : CheckpointTensors(lw)) out.push_back(name);
    return out;
  };
  auto g = PackGptq(QuantizeRtn(w.data(), 16, 64, {4, 32, true}), "m.q", true, true);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(names(*g),
            (std::vector<std::string>{"m.q.qweight", "m.q.qzeros", "m.q.scales", "m.q.g_idx"}));
  auto a = PackAwq(QuantizeRtn(w.data(), 16, 64, {4, 32, false}), "m.a");
  ASSERT_TRUE(a.ok());
  a->bias = Tensor::Empty(DType::kF16, {16});
  EXPECT_EQ(names(*a),
            (std::vector<std::string>{"m.a.qweight", "m.a.qzeros", "m.a.scales", "m.a.bias"}));
  EXPECT_EQ(names(QuantizeFp8PerChannel(w.data(), 16, 64, "m.f", true)),
            (std::vector<std::string>{"m.f.weight", "m.f.weight_scale"}));
  EXPECT_EQ(names(QuantizeInt8PerChannel(w.data(), 16, 64, "m.i", true)),
            (std::vector<std::string>{"m.i.weight", "m.i.weight_scale"}));
  LinearWeights dense;
  dense.name = "m.d";
  dense.weight = Tensor::Empty(DType::kBF16, {16, 64});
  EXPECT_EQ(names(dense), (std::vector<std::string>{"m.d.weight"}));
}

}  // namespace
}  // namespace qshard
