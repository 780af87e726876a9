// Pack / unpack of every integer and fp8 checkpoint layout. Each test packs random codes
// with a packer written here straight from the documented layout
// (docs/reference/quant-formats-and-anchors.md), unpacks with the library, and compares
// every weight against an independent dequantization in double.
#include <cstdint>
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

struct Reference {
  int64_t K, N, G;
  int bits;
  std::vector<int> q;          // [K][N] codes
  std::vector<int> zero;       // [G][N] true zero point (code units)
  std::vector<double> scale;   // [G][N], already rounded to f16
  std::vector<int32_t> g_idx;  // [K]
  double W(int64_t k, int64_t n) const {
    const int64_t g = g_idx[k];
    return scale[g * N + n] * (q[k * N + n] - zero[g * N + n]);
  }
};

Reference MakeReference(int64_t K, int64_t N, int64_t group, int bits, bool shuffle_groups,
                        bool sym, uint32_t seed) {
  std::mt19937 rng(seed);
  Reference r;
  r.K = K;
  r.N = N;
  r.bits = bits;
  const int64_t gs = group > 0 ? group : K;
  r.G = (K + gs - 1) / gs;
  const int maxq = (1 << bits) - 1;
  r.q.resize(K * N);
  for (int& v : r.q) v = static_cast<int>(rng() % (maxq + 1));
  r.zero.resize(r.G * N);
  // Asymmetric zeros include 0 and maxq, the edge cases of GPTQ v1's "minus one".
  for (int& z : r.zero) z = sym ? (maxq + 1) / 2 : static_cast<int>(rng() % (maxq + 1));
  r.scale.resize(r.G * N);
  std::uniform_real_distribution<float> sd(1e-3f, 2e-2f);
  for (double& s : r.scale) s = F16ToF32(F32ToF16(sd(rng)));
  r.g_idx.resize(K);
  for (int64_t k = 0; k < K; ++k) r.g_idx[k] = static_cast<int32_t>(k / gs);
  if (shuffle_groups) std::shuffle(r.g_idx.begin(), r.g_idx.end(), rng);  // act-order
  return r;
}

Tensor I32(int64_t rows, int64_t cols, const std::vector<uint32_t>& v) {
  Tensor t = Tensor::Empty(DType::kI32, {rows, cols});
  std::copy(v.begin(), v.end(), t.data<uint32_t>());
  return t;
}

Tensor F16(const Shape& shape, const std::vector<double>& v) {
  Tensor t = Tensor::Empty(DType::kF16, shape);
  for (size_t i = 0; i < v.size(); ++i) t.data<uint16_t>()[i] = F32ToF16(static_cast<float>(v[i]));
  return t;
}

void ExpectMatches(const IntQuantMatrix& m, const Reference& r) {
  ASSERT_EQ(m.in_features, r.K);
  ASSERT_EQ(m.out_features, r.N);
  int64_t bad = 0;
  for (int64_t k = 0; k < r.K; ++k) {
    for (int64_t n = 0; n < r.N; ++n) {
      const double want = r.W(k, n);
      if (std::abs(m.Dequant(n, k) - want) > 1e-6 * std::max(1.0, std::abs(want))) {
        if (++bad < 5)
          ADD_FAILURE() << "W[" << k << ", " << n << "] = " << m.Dequant(n, k) << ", want " << want;
      }
      if (m.codes[n * r.K + k] != r.q[k * r.N + n]) ++bad;
    }
  }
  EXPECT_EQ(bad, 0);
}

// AutoGPTQ pack(): qweight along K, qzeros along N, v1 stores zero - 1 (wrapped in the field).
LinearWeights PackGptq(const Reference& r, int64_t group, bool v1, bool with_g_idx) {
  const int per = 32 / r.bits;
  const uint32_t mask = (1u << r.bits) - 1;
  std::vector<uint32_t> qw((r.K / per) * r.N, 0);
  for (int64_t k = 0; k < r.K; ++k) {
    for (int64_t n = 0; n < r.N; ++n) {
      qw[(k / per) * r.N + n] |= static_cast<uint32_t>(r.q[k * r.N + n]) << (r.bits * (k % per));
    }
  }
  std::vector<uint32_t> qz(r.G * (r.N / per), 0);
  for (int64_t g = 0; g < r.G; ++g) {
    for (int64_t n = 0; n < r.N; ++n) {
      const uint32_t z = static_cast<uint32_t>(r.zero[g * r.N + n] - (v1 ? 1 : 0)) & mask;
      qz[g * (r.N / per) + n / per] |= z << (r.bits * (n % per));
    }
  }
  LinearWeights w;
  w.name = "test.gptq";
  w.format = WeightFormat::kGptq;
  w.in_features = r.K;
  w.out_features = r.N;
  w.bits = r.bits;
  w.group_size = group;
  w.gptq_zeros_minus_one = v1;
  w.qweight = I32(r.K / per, r.N, qw);
  w.qzeros = I32(r.G, r.N / per, qz);
  w.scales = F16({r.G, r.N}, r.scale);
  if (with_g_idx) {
    w.g_idx = Tensor::Empty(DType::kI32, {r.K});
    std::copy(r.g_idx.begin(), r.g_idx.end(), w.g_idx.data<int32_t>());
  }
  return w;
}

TEST(GptqFormatTest, UnpacksEveryVariant) {
  struct V {
    int bits;
    int64_t group;
    bool sym, v1, desc_act;
  };
  for (const V& v :
       {V{4, 128, true, true, false}, V{4, 32, false, true, false}, V{4, 64, false, false, false},
        V{4, -1, false, false, false}, V{8, 128, true, true, false}, V{8, 32, false, false, false},
        V{4, 128, false, false, true}, V{8, 64, true, true, true}}) {
    SCOPED_TRACE(::testing::Message() << "bits " << v.bits << " group " << v.group << " sym "
                                      << v.sym << " v1 " << v.v1 << " desc_act " << v.desc_act);
    Reference r = MakeReference(256, 64, v.group, v.bits, v.desc_act, v.sym, 7 + v.bits);
    // Asymmetric v1 zeros of 0 are stored as -1 (all ones in the field): the reader's
    // "+1 within the field" recovers them.
    auto m = UnpackGptq(PackGptq(r, v.group, v.v1, /*with_g_idx=*/v.desc_act || v.bits == 8));
    ASSERT_TRUE(m.ok()) << m.status();
    ExpectMatches(*m, r);
  }
}

TEST(GptqFormatTest, SymmetricV1ZerosAreAllSevens) {
  Reference r = MakeReference(64, 16, 32, 4, false, true, 3);
  LinearWeights w = PackGptq(r, 32, true, false);
  for (int64_t i = 0; i < w.qzeros.numel(); ++i)
    EXPECT_EQ(w.qzeros.data<uint32_t>()[i], 0x77777777u);
  auto m = UnpackGptq(w);
  ASSERT_TRUE(m.ok());
  for (float z : m->zeros) EXPECT_EQ(z, 8.0f);
}

TEST(GptqFormatTest, ShapeAndIndexErrors) {
  Reference r = MakeReference(64, 16, 32, 4, false, true, 5);
  LinearWeights w = PackGptq(r, 32, true, true);
  w.out_features = 24;
  auto bad = UnpackGptq(w);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("test.gptq.qweight: shape [8, 16], expected [8, 24]"),
            std::string::npos)
      << bad.status();
  w = PackGptq(r, 32, true, true);
  w.g_idx.data<int32_t>()[3] = 9;
  bad = UnpackGptq(w);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("g_idx[3] = 9 is outside [0, 2)"), std::string::npos);
}

// AutoAWQ WQLinear_GEMM: qweight [K, N/8], nibble i of a word holds column 8c + order[i].
TEST(AwqFormatTest, UnpacksInterleavedNibbles) {
  const int order[8] = {0, 2, 4, 6, 1, 3, 5, 7};
  for (int64_t group : {64, 128}) {
    Reference r = MakeReference(256, 48, group, 4, false, false, 11);
    std::vector<uint32_t> qw(r.K * (r.N / 8), 0), qz(r.G * (r.N / 8), 0);
    for (int64_t k = 0; k < r.K; ++k) {
      for (int64_t c = 0; c < r.N / 8; ++c) {
        for (int i = 0; i < 8; ++i) {
          qw[k * (r.N / 8) + c] |= static_cast<uint32_t>(r.q[k * r.N + 8 * c + order[i]])
                                   << (4 * i);
        }
      }
    }
    for (int64_t g = 0; g < r.G; ++g) {
      for (int64_t c = 0; c < r.N / 8; ++c) {
        for (int i = 0; i < 8; ++i) {
          qz[g * (r.N / 8) + c] |= static_cast<uint32_t>(r.zero[g * r.N + 8 * c + order[i]])
                                   << (4 * i);
        }
      }
    }
    LinearWeights w;
    w.name = "test.awq";
    w.format = WeightFormat::kAwq;
    w.in_features = r.K;
    w.out_features = r.N;
    w.bits = 4;
    w.group_size = group;
    w.qweight = I32(r.K, r.N / 8, qw);
    w.qzeros = I32(r.G, r.N / 8, qz);
    w.scales = F16({r.G, r.N}, r.scale);
    auto m = UnpackAwq(w);
    ASSERT_TRUE(m.ok()) << m.status();
    ExpectMatches(*m, r);
  }
  // The documented reverse order: nibble i holds column kAwqOrder[i].
  EXPECT_EQ(kAwqOrder[1], 2);
  EXPECT_EQ(kAwqOrder[4], 1);
}

// compressed-tensors pack-quantized: weight_packed [N, K/8] natural order along K, signed
// values offset by 8; zero point packed along N.
TEST(CompressedTensorsTest, PackQuantizedSymmetricAndAsymmetric) {
  for (bool sym : {true, false}) {
    for (int64_t group : {32, 128}) {
      Reference r = MakeReference(256, 40, group, 4, false, sym, 13);
      std::vector<uint32_t> wp(r.N * (r.K / 8), 0);
      for (int64_t n = 0; n < r.N; ++n) {
        for (int64_t k = 0; k < r.K; ++k) {
          // The quantizer's signed value q - 8 is stored as (q - 8) + 8.
          const int signed_q = r.q[k * r.N + n] - 8;
          wp[n * (r.K / 8) + k / 8] |= static_cast<uint32_t>(signed_q + 8) << (4 * (k % 8));
        }
      }
      std::vector<double> scale_ng(r.N * r.G);
      for (int64_t g = 0; g < r.G; ++g) {
        for (int64_t n = 0; n < r.N; ++n) scale_ng[n * r.G + g] = r.scale[g * r.N + n];
      }
      LinearWeights w;
      w.name = "test.packed";
      w.format = WeightFormat::kPacked;
      w.in_features = r.K;
      w.out_features = r.N;
      w.bits = 4;
      w.group_size = group;
      w.qweight = I32(r.N, r.K / 8, wp);
      w.scales = F16({r.N, r.G}, scale_ng);
      if (!sym) {
        std::vector<uint32_t> zp(r.N / 8 * r.G, 0);
        for (int64_t n = 0; n < r.N; ++n) {
          for (int64_t g = 0; g < r.G; ++g) {
            zp[(n / 8) * r.G + g] |= static_cast<uint32_t>(r.zero[g * r.N + n]) << (4 * (n % 8));
          }
        }
        w.qzeros = I32(r.N / 8, r.G, zp);
      }
      auto m = UnpackPackQuantized(w);
      ASSERT_TRUE(m.ok()) << m.status();
      ExpectMatches(*m, r);
    }
  }
}

TEST(CompressedTensorsTest, Int8ChannelScales) {
  const int64_t N = 8, K = 32;
  LinearWeights w;
  w.name = "test.int8";
  w.format = WeightFormat::kInt8;
  w.in_features = K;
  w.out_features = N;
  w.weight = Tensor::Empty(DType::kI8, {N, K});
  w.weight_scale = Tensor::Empty(DType::kF32, {N, 1});
  std::mt19937 rng(1);
  for (int64_t i = 0; i < N * K; ++i)
    w.weight.data<int8_t>()[i] = static_cast<int8_t>(rng() % 256 - 128);
  for (int64_t n = 0; n < N; ++n) w.weight_scale.data<float>()[n] = 0.01f * (n + 1);
  auto m = UnpackInt8(w);
  ASSERT_TRUE(m.ok()) << m.status();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      EXPECT_FLOAT_EQ(m->Dequant(n, k),
                      static_cast<double>(w.weight.data<int8_t>()[n * K + k]) * 0.01f * (n + 1));
    }
  }
}

TEST(CompressedTensorsTest, Fp8ScaleGrids) {
  const int64_t N = 300, K = 260;
  LinearWeights w;
  w.name = "test.fp8";
  w.format = WeightFormat::kFp8;
  w.in_features = K;
  w.out_features = N;
  w.weight = Tensor::Empty(DType::kF8E4M3, {N, K});
  // Per tensor.
  w.weight_scale = Tensor::Empty(DType::kF32, {1});
  w.weight_scale.data<float>()[0] = 0.5f;
  auto t = Fp8Scales(w);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->at(299, 259), 0.5f);
  // Per channel.
  w.weight_scale = Tensor::Empty(DType::kF32, {N, 1});
  for (int64_t n = 0; n < N; ++n) w.weight_scale.data<float>()[n] = static_cast<float>(n);
  auto c = Fp8Scales(w);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->at(17, 200), 17.0f);
  // Block [128, 128] with partial edge blocks: [3, 3].
  w.block_size = {128, 128};
  w.weight_scale = Tensor::Empty(DType::kF32, {3, 3});
  for (int i = 0; i < 9; ++i) w.weight_scale.data<float>()[i] = static_cast<float>(i);
  auto b = Fp8Scales(w);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->at(0, 0), 0.0f);
  EXPECT_EQ(b->at(129, 5), 3.0f);
  EXPECT_EQ(b->at(299, 259), 8.0f);
  w.weight_scale = Tensor::Empty(DType::kF32, {2, 2});
  auto bad = Fp8Scales(w);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("weight_scale: shape [2, 2], expected [3, 3]"),
            std::string::npos)
      << bad.status();
}

}  // namespace
}  // namespace qshard
