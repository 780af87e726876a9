// ConcatLinearWeights: for every weight format, the concatenation of several Linears along N
// dequantizes (through the library's own readers: UnpackGptq / UnpackAwq /
// UnpackPackQuantized / UnpackInt8 / Fp8Scales) to exactly the row-wise concatenation of
// the parts' dequantized matrices, keeps every dtype, owns its memory; and every mismatch
// that would change the arithmetic is refused with an error naming the part and the field.
#include "quant/concat_weights.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "quant/awq_format.h"
#include "quant/compressed_tensors.h"
#include "quant/fp8.h"
#include "quant/gptq_format.h"
#include "quant/quantize_weights.h"
#include "runtime/base/half.h"
#include "tests/quant/quant_test_util.h"

namespace qshard {
namespace {

using ::qshard::testing::RandomWeights;

constexpr int64_t kK = 64;  // in_features of every test Linear

// The fp32 matrix [N, K] a LinearWeights stands for, read the way the backends read it.
std::vector<float> Dequant(const LinearWeights& w) {
  auto from = [&](absl::StatusOr<IntQuantMatrix> m) {
    EXPECT_TRUE(m.ok()) << w.name << ": " << m.status();
    return m.ok() ? Dequantize(*m) : std::vector<float>();
  };
  switch (w.format) {
    case WeightFormat::kDense:
      return ToFloatVector(w.weight);
    case WeightFormat::kGptq:
      return from(UnpackGptq(w));
    case WeightFormat::kAwq:
      return from(UnpackAwq(w));
    case WeightFormat::kPacked:
      return from(UnpackPackQuantized(w));
    case WeightFormat::kInt8:
      return from(UnpackInt8(w));
    case WeightFormat::kFp8: {
      absl::StatusOr<Fp8ScaleGrid> g = Fp8Scales(w);
      EXPECT_TRUE(g.ok()) << w.name << ": " << g.status();
      if (!g.ok()) return {};
      std::vector<float> out(static_cast<size_t>(w.out_features * w.in_features));
      const uint8_t* q = w.weight.data<uint8_t>();
      for (int64_t n = 0; n < w.out_features; ++n) {
        for (int64_t k = 0; k < w.in_features; ++k) {
          out[n * w.in_features + k] = E4M3ToFloat(q[n * w.in_features + k]) * g->at(n, k);
        }
      }
      return out;
    }
  }
  return {};
}

// A bias as fp32 (none: empty).
std::vector<float> BiasValues(const Tensor& b) {
  return b.empty() ? std::vector<float>() : ToFloatVector(b);
}

// The parts' dequantized matrices stacked row-wise, and their biases.
std::vector<float> Stacked(const std::vector<LinearWeights>& parts, bool bias = false) {
  std::vector<float> out;
  for (const LinearWeights& w : parts) {
    const std::vector<float> d = bias ? BiasValues(w.bias) : Dequant(w);
    out.insert(out.end(), d.begin(), d.end());
  }
  return out;
}

std::vector<const LinearWeights*> Ptrs(const std::vector<LinearWeights>& parts) {
  std::vector<const LinearWeights*> out;
  for (const LinearWeights& w : parts) out.push_back(&w);
  return out;
}

// Whether t's bytes lie inside any tensor of the parts (the result must not alias them).
bool AliasesParts(const Tensor& t, const std::vector<LinearWeights>& parts) {
  if (t.empty()) return false;
  const uint8_t* p = static_cast<const uint8_t*>(t.raw());
  for (const LinearWeights& w : parts) {
    for (const Tensor* s : {&w.weight, &w.bias, &w.qweight, &w.qzeros, &w.scales, &w.g_idx,
                            &w.weight_scale, &w.input_scale}) {
      if (s->empty()) continue;
      const uint8_t* b = static_cast<const uint8_t*>(s->raw());
      if (p < b + s->nbytes() && b < p + t.nbytes()) return true;
    }
  }
  return false;
}

// Concatenates, destroys the parts, and checks the result against what they dequantized to.
LinearWeights ConcatAndCheck(std::vector<LinearWeights> parts) {
  const std::vector<float> want = Stacked(parts);
  const std::vector<float> want_bias = Stacked(parts, /*bias=*/true);
  int64_t n = 0;
  for (const LinearWeights& w : parts) n += w.out_features;
  absl::StatusOr<LinearWeights> cat = ConcatLinearWeights(Ptrs(parts), "fused");
  EXPECT_TRUE(cat.ok()) << cat.status();
  if (!cat.ok()) return LinearWeights();
  for (const Tensor* t : {&cat->weight, &cat->bias, &cat->qweight, &cat->qzeros, &cat->scales,
                          &cat->g_idx, &cat->weight_scale, &cat->input_scale}) {
    EXPECT_FALSE(AliasesParts(*t, parts)) << "the result must own its memory";
  }
  // Each tensor keeps the parts' dtype (absent stays absent).
  const LinearWeights& p0 = parts[0];
  const std::pair<const Tensor*, const Tensor*> pairs[] = {{&cat->weight, &p0.weight},
                                                           {&cat->bias, &p0.bias},
                                                           {&cat->qweight, &p0.qweight},
                                                           {&cat->qzeros, &p0.qzeros},
                                                           {&cat->scales, &p0.scales},
                                                           {&cat->g_idx, &p0.g_idx},
                                                           {&cat->weight_scale, &p0.weight_scale},
                                                           {&cat->input_scale, &p0.input_scale}};
  for (const auto& [got, part] : pairs) {
    EXPECT_EQ(got->empty(), part->empty());
    if (!got->empty()) {
      EXPECT_EQ(got->dtype(), part->dtype());
    }
  }
  parts.clear();  // the result must not depend on the parts' memory
  EXPECT_EQ(cat->name, "fused");
  EXPECT_EQ(cat->out_features, n);
  EXPECT_EQ(cat->in_features, kK);
  const std::vector<float> got = Dequant(*cat);
  EXPECT_EQ(got.size(), want.size());
  EXPECT_TRUE(got == want) << "the concatenation dequantizes to other values";
  EXPECT_TRUE(BiasValues(cat->bias) == want_bias);
  return *std::move(cat);
}

Tensor RandomBias(int64_t n, uint32_t seed) {
  const std::vector<float> v = RandomWeights(1, n, seed);
  Tensor t = Tensor::Empty(DType::kBF16, {n});
  for (int64_t i = 0; i < n; ++i) t.data<uint16_t>()[i] = F32ToBf16(v[i]);
  return t;
}

LinearWeights Dense(int64_t n, uint32_t seed, bool bias = true) {
  LinearWeights w;
  w.name = "dense." + std::to_string(seed);
  w.in_features = kK;
  w.out_features = n;
  w.weight = Tensor::Empty(DType::kBF16, {n, kK});
  const std::vector<float> v = RandomWeights(n, kK, seed);
  for (int64_t i = 0; i < n * kK; ++i) w.weight.data<uint16_t>()[i] = F32ToBf16(v[i]);
  if (bias) w.bias = RandomBias(n, seed + 1000);
  return w;
}

// Round-to-nearest codes of random weights; act_order: a g_idx permuted with a fixed seed
// (the same for every part, as act-order checkpoints of one layer's q/k/v have).
IntQuantMatrix Rtn(int64_t n, uint32_t seed, int bits, int64_t group, bool sym,
                   bool act_order = false) {
  const std::vector<float> v = RandomWeights(n, kK, seed);
  IntQuantMatrix m = QuantizeRtn(v.data(), n, kK, {.bits = bits, .group_size = group, .sym = sym});
  if (act_order) {
    std::mt19937 rng(99);
    std::shuffle(m.g_idx.begin(), m.g_idx.end(), rng);
  }
  return m;
}

LinearWeights Gptq(int64_t n, uint32_t seed, int bits = 4, bool sym = true, bool v1 = true,
                   bool act_order = false) {
  absl::StatusOr<LinearWeights> w =
      PackGptq(Rtn(n, seed, bits, 32, sym, act_order), "gptq." + std::to_string(seed), sym, v1);
  EXPECT_TRUE(w.ok()) << w.status();
  return *std::move(w);
}

LinearWeights Awq(int64_t n, uint32_t seed) {
  absl::StatusOr<LinearWeights> w =
      PackAwq(Rtn(n, seed, 4, 32, false), "awq." + std::to_string(seed));
  EXPECT_TRUE(w.ok()) << w.status();
  return *std::move(w);
}

// compressed-tensors pack-quantized, written here from the layout in compressed_tensors.h:
// weight_packed [N, K/8] along K, weight_scale bf16 [N, G], weight_zero_point [ceil(N/8), G]
// packed along N (asymmetric only), weight_g_idx [K].
LinearWeights Packed(int64_t n, uint32_t seed, bool sym, bool act_order = true) {
  const int bits = 4, per_word = 8;
  const IntQuantMatrix m = Rtn(n, seed, bits, 32, sym, act_order);
  const int64_t G = m.num_groups;
  LinearWeights w;
  w.name = "packed." + std::to_string(seed);
  w.in_features = kK;
  w.out_features = n;
  w.format = WeightFormat::kPacked;
  w.bits = bits;
  w.group_size = 32;
  w.has_zero_point = !sym;
  w.qweight = Tensor::Empty(DType::kI32, {n, kK / per_word});
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t k = 0; k < kK; ++k) {
      w.qweight.data<uint32_t>()[r * (kK / per_word) + k / per_word] |=
          static_cast<uint32_t>(m.codes[r * kK + k]) << (bits * (k % per_word));
    }
  }
  w.scales = Tensor::Empty(DType::kBF16, {n, G});
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t g = 0; g < G; ++g)
      w.scales.data<uint16_t>()[r * G + g] = F32ToBf16(m.scales[g * n + r]);
  }
  if (!sym) {
    w.qzeros = Tensor::Empty(DType::kI32, {(n + per_word - 1) / per_word, G});
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t g = 0; g < G; ++g) {
        w.qzeros.data<uint32_t>()[(r / per_word) * G + g] |=
            static_cast<uint32_t>(m.zeros[g * n + r]) << (bits * (r % per_word));
      }
    }
  }
  w.g_idx = Tensor::Empty(DType::kI32, {kK});
  std::copy(m.g_idx.begin(), m.g_idx.end(), w.g_idx.data<int32_t>());
  return w;
}

LinearWeights Fp8(int64_t n, uint32_t seed) {
  const std::vector<float> v = RandomWeights(n, kK, seed);
  return QuantizeFp8PerChannel(v.data(), n, kK, "fp8." + std::to_string(seed), true);
}

LinearWeights Int8(int64_t n, uint32_t seed) {
  const std::vector<float> v = RandomWeights(n, kK, seed);
  return QuantizeInt8PerChannel(v.data(), n, kK, "int8." + std::to_string(seed), true);
}

// A scale tensor of `shape` holding `value` in `dtype` (f32 / f16 / bf16).
Tensor Scale(DType dtype, Shape shape, float value) {
  Tensor t = Tensor::Empty(dtype, shape);
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (dtype == DType::kF32) t.data<float>()[i] = value;
    if (dtype == DType::kF16) t.data<uint16_t>()[i] = F32ToF16(value);
    if (dtype == DType::kBF16) t.data<uint16_t>()[i] = F32ToBf16(value);
  }
  return t;
}

// An fp8 / int8 part with one per-tensor scale (the codes of the per-channel quantizer).
LinearWeights PerTensor(LinearWeights w, DType dtype, float scale) {
  w.weight_scale = Scale(dtype, {1}, scale);
  return w;
}

// fp8 block-wise: weight_scale [ceil(N/bn), ceil(K/bk)] of distinct values.
LinearWeights Fp8Block(int64_t n, uint32_t seed, int64_t bn, int64_t bk) {
  LinearWeights w = Fp8(n, seed);
  w.block_size = {bn, bk};
  const int64_t rows = (n + bn - 1) / bn, cols = (kK + bk - 1) / bk;
  w.weight_scale = Tensor::Empty(DType::kF32, {rows, cols});
  for (int64_t i = 0; i < rows * cols; ++i) {
    w.weight_scale.data<float>()[i] = 1e-3f * static_cast<float>(seed * 7 + i + 1);
  }
  w.act_quant = ActQuant::kFp8PerTokenGroup;
  w.act_group_size = bk;
  return w;
}

TEST(ConcatLinearWeightsTest, DenseStacksRowsAndBiases) {
  LinearWeights cat = ConcatAndCheck({Dense(48, 1), Dense(16, 2), Dense(16, 3)});
  EXPECT_EQ(cat.weight.shape(), (Shape{80, kK}));
  EXPECT_EQ(cat.bias.shape(), (Shape{80}));
  EXPECT_EQ(cat.format, WeightFormat::kDense);
}

TEST(ConcatLinearWeightsTest, GptqStacksColumnsAndSharesActOrderGidx) {
  LinearWeights cat =
      ConcatAndCheck({Gptq(32, 1, 4, true, true, true), Gptq(16, 2, 4, true, true, true),
                      Gptq(8, 3, 4, true, true, true)});
  EXPECT_EQ(cat.qweight.shape(), (Shape{kK / 8, 56}));
  EXPECT_EQ(cat.qzeros.shape(), (Shape{2, 7}));
  EXPECT_EQ(cat.scales.shape(), (Shape{2, 56}));
  EXPECT_EQ(cat.g_idx.shape(), (Shape{kK}));
  EXPECT_TRUE(cat.gptq_zeros_minus_one);
  // 8-bit, asymmetric, GPTQ v2 zeros: 4 outputs per qzeros word.
  ConcatAndCheck({Gptq(12, 4, 8, false, false), Gptq(4, 5, 8, false, false)});
}

TEST(ConcatLinearWeightsTest, AwqStacksInterleavedColumns) {
  LinearWeights cat = ConcatAndCheck({Awq(32, 1), Awq(16, 2), Awq(16, 3)});
  EXPECT_EQ(cat.qweight.shape(), (Shape{kK, 8}));
  EXPECT_EQ(cat.qzeros.shape(), (Shape{2, 8}));
  // Symmetric AWQ (no qzeros) too.
  std::vector<LinearWeights> sym = {Awq(16, 4), Awq(8, 5)};
  for (LinearWeights& w : sym) w.qzeros = Tensor();
  ConcatAndCheck(std::move(sym));
}

TEST(ConcatLinearWeightsTest, PackQuantizedStacksRowsIncludingZeroPoints) {
  // The last part may end inside a zero-point word (12 = 8 + 4 rows).
  LinearWeights cat =
      ConcatAndCheck({Packed(16, 1, false), Packed(8, 2, false), Packed(12, 3, false)});
  EXPECT_EQ(cat.qweight.shape(), (Shape{36, kK / 8}));
  EXPECT_EQ(cat.qzeros.shape(), (Shape{5, 2}));
  ConcatAndCheck({Packed(16, 4, true), Packed(12, 5, true), Packed(8, 6, true)});
}

TEST(ConcatLinearWeightsTest, PackQuantizedRefusesAZeroPointWordSharedByTwoParts) {
  std::vector<LinearWeights> parts = {Packed(12, 1, false), Packed(8, 2, false)};
  absl::StatusOr<LinearWeights> cat = ConcatLinearWeights(Ptrs(parts), "fused");
  ASSERT_FALSE(cat.ok());
  EXPECT_NE(cat.status().message().find("packed.1"), std::string::npos) << cat.status();
  EXPECT_NE(cat.status().message().find("weight_zero_point"), std::string::npos) << cat.status();
  // Symmetric checkpoints have no zero points: any N concatenates.
  ConcatAndCheck({Packed(12, 3, true), Packed(8, 4, true)});
}

TEST(ConcatLinearWeightsTest, Fp8PerChannelScalesStack) {
  LinearWeights cat = ConcatAndCheck({Fp8(32, 1), Fp8(16, 2), Fp8(16, 3)});
  EXPECT_EQ(cat.weight_scale.shape(), (Shape{64, 1}));
  EXPECT_EQ(cat.act_quant, ActQuant::kFp8PerToken);
}

TEST(ConcatLinearWeightsTest, EqualPerTensorScalesStayPerTensor) {
  LinearWeights cat = ConcatAndCheck(
      {PerTensor(Fp8(32, 1), DType::kF32, 0.0125f), PerTensor(Fp8(16, 2), DType::kF32, 0.0125f)});
  EXPECT_EQ(cat.weight_scale.shape(), (Shape{1}));
}

TEST(ConcatLinearWeightsTest, DifferentPerTensorScalesBecomePerChannelExactly) {
  LinearWeights cat = ConcatAndCheck({PerTensor(Fp8(32, 1), DType::kBF16, 0.0125f),
                                      PerTensor(Fp8(16, 2), DType::kBF16, 0.03f),
                                      PerTensor(Fp8(16, 3), DType::kBF16, 0.0007f)});
  EXPECT_EQ(cat.weight_scale.shape(), (Shape{64, 1}));
  EXPECT_EQ(cat.weight_scale.dtype(), DType::kBF16);
  // Per-tensor and per-channel parts mixed: per-channel.
  cat = ConcatAndCheck({PerTensor(Fp8(8, 4), DType::kF32, 0.5f), Fp8(16, 5)});
  EXPECT_EQ(cat.weight_scale.shape(), (Shape{24, 1}));
  // int8 with f16 per-tensor scales.
  cat = ConcatAndCheck(
      {PerTensor(Int8(16, 6), DType::kF16, 0.01f), PerTensor(Int8(8, 7), DType::kF16, 0.02f)});
  EXPECT_EQ(cat.weight_scale.dtype(), DType::kF16);
  EXPECT_EQ(cat.format, WeightFormat::kInt8);
}

TEST(ConcatLinearWeightsTest, Int8PerChannelStacks) {
  std::vector<LinearWeights> parts = {Int8(32, 1), Int8(8, 2), Int8(8, 3)};
  for (LinearWeights& w : parts) w.bias = RandomBias(w.out_features, 7);
  LinearWeights cat = ConcatAndCheck(std::move(parts));
  EXPECT_EQ(cat.act_quant, ActQuant::kInt8PerToken);
  // Rank-1 [N] per-channel scales stay rank 1.
  parts = {Int8(16, 4), Int8(8, 5)};
  for (LinearWeights& w : parts) w.weight_scale = w.weight_scale.Reshape({w.out_features});
  cat = ConcatAndCheck(std::move(parts));
  EXPECT_EQ(cat.weight_scale.shape(), (Shape{24}));
}

TEST(ConcatLinearWeightsTest, Fp8BlockScalesStackWhenBlocksDoNotStraddleParts) {
  // bn = 16: the first two parts fill whole block rows; the last (8 rows) ends in a partial one.
  LinearWeights cat =
      ConcatAndCheck({Fp8Block(32, 1, 16, 32), Fp8Block(16, 2, 16, 32), Fp8Block(8, 3, 16, 32)});
  EXPECT_EQ(cat.weight_scale.shape(), (Shape{4, 2}));
  EXPECT_EQ(cat.act_group_size, 32);
  std::vector<LinearWeights> parts = {Fp8Block(8, 4, 16, 32), Fp8Block(16, 5, 16, 32)};
  absl::StatusOr<LinearWeights> bad = ConcatLinearWeights(Ptrs(parts), "fused");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("fp8.4"), std::string::npos) << bad.status();
  EXPECT_NE(bad.status().message().find("block height 16"), std::string::npos) << bad.status();
}

TEST(ConcatLinearWeightsTest, StaticInputScalesMustAgree) {
  std::vector<LinearWeights> parts = {Fp8(16, 1), Fp8(16, 2)};
  for (LinearWeights& w : parts) {
    w.act_quant = ActQuant::kFp8Static;
    w.input_scale = Scale(DType::kF32, {1}, 0.02f);
  }
  LinearWeights cat = ConcatAndCheck(parts);
  EXPECT_EQ(quant_internal::FloatAt(cat.input_scale, 0), 0.02f);
  parts[1].input_scale = Scale(DType::kF32, {1}, 0.03f);
  absl::StatusOr<LinearWeights> bad = ConcatLinearWeights(Ptrs(parts), "fused");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("fp8.2"), std::string::npos) << bad.status();
  EXPECT_NE(bad.status().message().find("input_scale"), std::string::npos) << bad.status();
}

// Parts first() and second() after mutate(second) must not concatenate; the error names the
// second part and contains `what`.
struct Refusal {
  std::string what;
  std::function<LinearWeights()> first;
  std::function<void(LinearWeights&)> mutate;
  std::function<LinearWeights()> second;
};

TEST(ConcatLinearWeightsTest, RefusesPartsThatDifferInAnythingButN) {
  auto gptq = [] { return Gptq(16, 1); };
  auto gptq2 = [] { return Gptq(8, 2); };
  auto fp8 = [] { return Fp8(16, 1); };
  auto fp82 = [] { return Fp8(8, 2); };
  const std::vector<Refusal> cases = {
      {"format", gptq, [](LinearWeights&) {}, [] { return Awq(8, 2); }},
      {"in_features", [] { return Dense(16, 1); },
       [](LinearWeights& w) {
         w.in_features = 32;
         w.weight = w.weight.Reshape({32, 32});
       },
       [] { return Dense(16, 2); }},
      {"bits", gptq, [](LinearWeights&) {}, [] { return Gptq(8, 2, 8); }},
      {"group_size", gptq, [](LinearWeights& w) { w.group_size = 64; }, gptq2},
      {"gptq zeros convention", gptq, [](LinearWeights&) {},
       [] { return Gptq(8, 2, 4, true, /*v1=*/false); }},
      {"has_zero_point", gptq, [](LinearWeights& w) { w.has_zero_point = !w.has_zero_point; },
       gptq2},
      {"g_idx", gptq, [](LinearWeights&) {},
       [] { return Gptq(8, 2, 4, true, true, /*act_order=*/true); }},
      {"scales dtype", gptq,
       [](LinearWeights& w) {
         Tensor s = Tensor::Empty(DType::kBF16, w.scales.shape());
         w.scales = s;
       },
       gptq2},
      {"presence of bias", [] { return Dense(16, 1); }, [](LinearWeights&) {},
       [] { return Dense(16, 2, /*bias=*/false); }},
      {"activation quantization", fp8, [](LinearWeights& w) { w.act_quant = ActQuant::kNone; },
       fp82},
      {"act_group_size", fp8, [](LinearWeights& w) { w.act_group_size = 16; }, fp82},
      {"block_size", [] { return Fp8Block(16, 1, 16, 32); },
       [](LinearWeights& w) {
         w.block_size = {16, 64};
       },
       [] { return Fp8Block(16, 2, 16, 32); }},
      {"weight dtype", fp8,
       [](LinearWeights& w) {
         w.weight = Tensor(DType::kF8E5M2, w.weight.shape(), w.weight.raw(), w.weight.owner());
       },
       fp82},
      {"qweight: shape [8, 8], expected [8, 16]", gptq,
       [](LinearWeights& w) { w.out_features = 16; },  // its tensors hold 8 outputs
       gptq2},
  };
  for (const Refusal& c : cases) {
    std::vector<LinearWeights> parts = {c.first(), c.second()};
    c.mutate(parts[1]);
    absl::StatusOr<LinearWeights> cat = ConcatLinearWeights(Ptrs(parts), "fused");
    ASSERT_FALSE(cat.ok()) << c.what << ": concatenated anyway";
    EXPECT_NE(cat.status().message().find(c.what), std::string::npos)
        << c.what << ": " << cat.status();
    EXPECT_NE(cat.status().message().find(parts[1].name), std::string::npos)
        << c.what << ": " << cat.status();
  }
}

TEST(ConcatLinearWeightsTest, RefusesEmptyInputAndDeviceTensors) {
  EXPECT_FALSE(ConcatLinearWeights({}, "fused").ok());
  std::vector<LinearWeights> parts = {Dense(16, 1), Dense(16, 2)};
  parts[1].weight = Tensor(parts[1].weight.dtype(), parts[1].weight.shape(), parts[1].weight.raw(),
                           parts[1].weight.owner(), Device::kCuda);
  absl::StatusOr<LinearWeights> cat = ConcatLinearWeights(Ptrs(parts), "fused");
  ASSERT_FALSE(cat.ok());
  EXPECT_NE(cat.status().message().find("host memory"), std::string::npos) << cat.status();
  // A single part is a plain (owning) copy.
  ConcatAndCheck({Gptq(16, 3)});
}

}  // namespace
}  // namespace qshard
