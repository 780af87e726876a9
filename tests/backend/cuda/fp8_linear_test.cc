// 8-bit weight linears on the GPU (runtime/backend/cuda/fp8_linear.h) against a float64 host
// reference of the CPU backend's semantics (runtime/backend/cpu/quant_linear.cc).
//
// Without a CUDA device every test skips with a message.
//
// Method: random e4m3 weight codes (every code but the NaNs 0x7F / 0xFF) or int8 codes in
// [-127, 127], per-channel and per-tensor scales, random bf16 activations whose rows span
// e^-3 .. e^3 in magnitude (fixed seeds, never zeros); outputs poisoned with 0xFF (NaN)
// before every run. The host quantizes the same bf16 x with quant/fp8.h (FloatToE4M3(x / s))
// or round-half-even int8, exactly as the CPU backend does, and computes y in float64.
//
// Tolerances:
//   - Activation codes: bit-identical to the host's, scales equal as floats. IEEE division
//     is correctly rounded on both sides (the build has no fast-math), and the encoders are
//     the same integer algorithm, so there is no legitimate difference.
//   - y with fp32 output: with identical codes, every product (e4m3 x e4m3, bf16 x e4m3,
//     bf16 x int8) is exact in fp32 and int8 sums are exact in int32; what remains is fp32
//     summation order (~K * 2^-24 relative to the sum of |terms|, < 1e-5 of the row RMS
//     here) and the final scale multiplications (a few ulp). Bound: 1e-3 of the row's RMS
//     + 1e-5 |want| per element, 1e-4 normwise: a single missing k term of a k = 512 row
//     moves an element by ~4e-2 of the row's RMS.
//   - fp8 W8A8 (e4m3 tensor cores, GEMV mma.sync and cuBLASLt): the hardware adds the 32
//     products of one mma with a limited-width internal alignment (DeepSeek-V3 reports ~14
//     retained bits for Hopper fp8 accumulation), so each 32-term chunk may carry ~2^-14 of
//     its magnitude in error; the GEMV adds chunks in fp32 and cuBLASLt (fast accumulation
//     off) promotes too. Bound: 2e-3 of the row RMS per element, 5e-4 normwise; a missing
//     term of a k = 8192 row is still ~1e-2 of the row RMS. cuBLASLt's fp8 GEMM (m > 16)
//     keeps partial sums in that format longer than our GEMV (which adds every 32-term
//     mma into fp32): measured on an H200 (2026-11-27), 7 of ~1.5M elements landed at
//     1.05-1.19x the 2e-3 bound while the normwise error stayed under 5e-4, so its
//     per-element bound is 4e-3 of the row RMS (normwise unchanged).
//   - bf16 output adds one round-to-nearest-even: 2^-8 |want|, so 5e-3 |want| per element on
//     top, and 4e-3 normwise.
//   - NaN or inf anywhere fails; failures name the case (mode, scales, m, n, k, dtype) and
//     the first bad [row, col] with got / want.
#include "runtime/backend/cuda/fp8_linear.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "quant/fp8.h"
#include "quant/linear_weights.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "runtime/base/tensor.h"

namespace qshard::cuda {
namespace {

#define SKIP_WITHOUT_GPU()                                                \
  do {                                                                    \
    if (!CudaDeviceAvailable()) GTEST_SKIP() << "no CUDA device visible"; \
  } while (0)

#define Q8_ASSERT_OK(expr)                \
  do {                                    \
    const ::absl::Status q8_st_ = (expr); \
    ASSERT_TRUE(q8_st_.ok()) << q8_st_;   \
  } while (0)

// ---- host data -------------------------------------------------------------------------

// x [rows, cols] as bf16 values (held in float): uniform [-1, 1) times a per-row scale in
// e^-3 .. e^3; a few values per row pushed 8x out so the row max is an outlier.
std::vector<float> RandomX(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-3.0f, 3.0f);
  std::uniform_int_distribution<int64_t> pick(0, cols - 1);
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const float scale = std::exp(log_scale(rng));
    for (int64_t c = 0; c < cols; ++c) {
      float x = unit(rng) * scale;
      if (x == 0.0f) x = scale * 0.5f;
      v[r * cols + c] = Bf16ToF32(F32ToBf16(x));
    }
    for (int i = 0; i < 3; ++i) {
      float& x = v[r * cols + pick(rng)];
      x = Bf16ToF32(F32ToBf16(x * 8.0f));
    }
  }
  return v;
}

std::vector<uint16_t> Bf16Bits(const std::vector<float>& v) {
  std::vector<uint16_t> b(v.size());
  for (size_t i = 0; i < v.size(); ++i) b[i] = F32ToBf16(v[i]);
  return b;
}

std::vector<uint8_t> RandomE4M3Codes(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> c(static_cast<size_t>(count));
  for (uint8_t& b : c) {
    do {
      b = static_cast<uint8_t>(byte(rng));
    } while (IsE4M3NaN(b));
  }
  return c;
}

std::vector<uint8_t> RandomInt8Codes(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> val(-127, 127);
  std::vector<uint8_t> c(static_cast<size_t>(count));
  for (uint8_t& b : c) b = static_cast<uint8_t>(static_cast<int8_t>(val(rng)));
  return c;
}

// Host quantization of one row exactly as the CPU backend (and quant/fp8.h) does it.
// act: kFp8PerToken, kFp8Static, kInt8PerToken. Returns the scale; codes[0:k].
float HostQuantizeRow(const float* x, int64_t k, ActQuant act, float static_scale, uint8_t* codes) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  float s;
  if (act == ActQuant::kFp8PerToken) {
    s = std::max(amax, 1e-12f) / kE4M3Max;
  } else if (act == ActQuant::kFp8Static) {
    s = static_scale;
  } else {
    s = amax > 0.0f ? amax / 127.0f : 1.0f;
  }
  for (int64_t i = 0; i < k; ++i) {
    if (act == ActQuant::kInt8PerToken) {
      const float q = std::clamp(std::nearbyint(x[i] / s), -127.0f, 127.0f);
      codes[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
    } else {
      codes[i] = FloatToE4M3(x[i] / s);
    }
  }
  return s;
}

double CodeValue(uint8_t c, bool fp8) {
  return fp8 ? static_cast<double>(E4M3ToFloat(c)) : static_cast<double>(static_cast<int8_t>(c));
}

template <typename T>
absl::StatusOr<DeviceBuffer> UploadVec(const std::vector<T>& v, cudaStream_t stream) {
  absl::StatusOr<DeviceBuffer> buf = DeviceBuffer::Allocate(v.size() * sizeof(T));
  if (!buf.ok()) return buf.status();
  absl::Status st = buf->CopyFromHost(v.data(), v.size() * sizeof(T), stream);
  if (!st.ok()) return st;
  return buf;
}

// Compares got with want (both [rows, cols]); the message names `what`.
// fp8_mma: the result went through e4m3 tensor-core sums (looser, see the file comment).
// fp8_blas: ... and through cuBLASLt's fp8 GEMM (looser per element, same normwise).
void ExpectClose(const std::vector<float>& got, const std::vector<double>& want, int64_t rows,
                 int64_t cols, bool bf16, bool fp8_mma, const std::string& what,
                 bool fp8_blas = false) {
  const double rel = bf16 ? 5e-3 + 1e-5 : 1e-5;
  const double row_rms_tol = fp8_blas ? 4e-3 : fp8_mma ? 2e-3 : 1e-3;
  const double normwise_tol = bf16 ? 4e-3 : (fp8_mma ? 5e-4 : 1e-4);
  int64_t bad = 0;
  double diff_sq = 0, want_sq = 0, worst = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double sq = 0;
    for (int64_t c = 0; c < cols; ++c) sq += want[r * cols + c] * want[r * cols + c];
    const double rms = std::sqrt(sq / static_cast<double>(cols));
    for (int64_t c = 0; c < cols; ++c) {
      const double g = got[r * cols + c], w = want[r * cols + c];
      const double err = std::fabs(g - w);
      const double bound = rel * std::fabs(w) + row_rms_tol * rms;
      if (std::isfinite(g)) {
        diff_sq += err * err;
        want_sq += w * w;
      }
      if (!(err <= bound)) {  // NaN fails
        if (bad++ < 4) {
          ADD_FAILURE() << what << ": [" << r << ", " << c << "] got " << g << " want " << w
                        << " (err " << err << ", bound " << bound << ", row rms " << rms << ")";
        }
      } else {
        worst = std::max(worst, err / std::max(bound, 1e-300));
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << rows * cols << " elements out of bounds";
  const double normwise = std::sqrt(diff_sq / std::max(want_sq, 1e-300));
  EXPECT_LE(normwise, normwise_tol) << what << ": normwise error " << normwise;
}

struct Device {
  DeviceInfo info;
  CudaStream stream;
};

std::unique_ptr<Device> OpenDevice() {
  auto info = QueryDevice(0);
  if (!info.ok()) return nullptr;
  auto stream = CudaStream::Create();
  if (!stream.ok()) return nullptr;
  auto d = std::make_unique<Device>();
  d->info = *info;
  d->stream = std::move(*stream);
  return d;
}

bool HasFp8TensorCores(const DeviceInfo& info) { return info.cc_major * 10 + info.cc_minor >= 89; }

// ---- activation quantization -------------------------------------------------------------

TEST(Fp8LinearTest, QuantizeActivationsBitIdenticalToHost) {
  SKIP_WITHOUT_GPU();
  auto dev = OpenDevice();
  ASSERT_NE(dev, nullptr);
  cudaStream_t stream = dev->stream.get();
  struct Case {
    ActQuant act;
    int64_t m, k;
  };
  // k = 20480 exceeds the shared-memory staging (second pass re-reads x); k = 16 is one vector.
  const Case cases[] = {
      {ActQuant::kFp8PerToken, 1, 16},     {ActQuant::kFp8PerToken, 5, 4096},
      {ActQuant::kFp8PerToken, 17, 528},   {ActQuant::kFp8PerToken, 3, 20480},
      {ActQuant::kFp8Static, 4, 1024},     {ActQuant::kFp8Static, 2, 20480},
      {ActQuant::kInt8PerToken, 1, 16},    {ActQuant::kInt8PerToken, 7, 4096},
      {ActQuant::kInt8PerToken, 3, 20480}, {ActQuant::kInt8PerToken, 33, 2064},
  };
  uint32_t seed = 100;
  for (const Case& c : cases) {
    std::vector<float> x = RandomX(c.m, c.k, ++seed);
    // Row 0 of multi-row cases: all zero but one tiny value, so codes go subnormal / zero and
    // the amax clamp (fp8) is exercised; the last row of m >= 3: exactly zero.
    if (c.m >= 2) {
      for (int64_t i = 0; i < c.k; ++i) x[i] = 0.0f;
      x[c.k / 2] = Bf16ToF32(F32ToBf16(3e-20f));
    }
    if (c.m >= 3) {
      for (int64_t i = 0; i < c.k; ++i) x[(c.m - 1) * c.k + i] = 0.0f;
    }
    // Static scale: small enough that some values saturate at 448.
    const float static_scale = 0.004f;
    std::vector<uint8_t> want_codes(static_cast<size_t>(c.m * c.k));
    std::vector<float> want_scales(static_cast<size_t>(c.m));
    for (int64_t r = 0; r < c.m; ++r) {
      want_scales[r] = HostQuantizeRow(x.data() + r * c.k, c.k, c.act, static_scale,
                                       want_codes.data() + r * c.k);
    }
    auto xd = UploadVec(Bf16Bits(x), stream);
    ASSERT_TRUE(xd.ok()) << xd.status();
    auto codes = DeviceBuffer::Allocate(static_cast<size_t>(c.m * c.k));
    auto scales = DeviceBuffer::Allocate(sizeof(float) * c.m);
    ASSERT_TRUE(codes.ok() && scales.ok());
    Q8_ASSERT_OK(codes->Fill(0xFF, stream));
    Q8_ASSERT_OK(scales->Fill(0xFF, stream));
    Q8_ASSERT_OK(LaunchQuantizeActivations(xd->get(), c.m, c.k, c.act, static_scale, codes->get(),
                                           scales->as<float>(), stream));
    std::vector<uint8_t> got_codes(want_codes.size());
    std::vector<float> got_scales(want_scales.size());
    Q8_ASSERT_OK(codes->CopyToHost(got_codes.data(), got_codes.size(), stream));
    Q8_ASSERT_OK(scales->CopyToHost(got_scales.data(), sizeof(float) * c.m, stream));
    const std::string what = absl::StrCat(ActQuantName(c.act), " m=", c.m, " k=", c.k);
    int bad = 0;
    for (int64_t r = 0; r < c.m; ++r) {
      if (std::memcmp(&got_scales[r], &want_scales[r], sizeof(float)) != 0) {
        ADD_FAILURE() << what << ": scale of row " << r << " got " << got_scales[r] << " want "
                      << want_scales[r];
      }
      for (int64_t i = 0; i < c.k; ++i) {
        const size_t j = static_cast<size_t>(r * c.k + i);
        if (got_codes[j] != want_codes[j] && bad++ < 5) {
          ADD_FAILURE() << what << ": code [" << r << ", " << i << "] of x = " << x[j] << " got 0x"
                        << std::hex << int(got_codes[j]) << " want 0x" << int(want_codes[j])
                        << std::dec;
        }
      }
    }
    EXPECT_EQ(bad, 0) << what;
  }
}

// ---- linear layers ------------------------------------------------------------------------

struct LayerCase {
  WeightFormat format;
  ActQuant act;
  bool per_channel;
  bool with_bias;
};

std::string CaseName(const LayerCase& c) {
  return absl::StrCat(WeightFormatName(c.format), "/", ActQuantName(c.act),
                      c.per_channel ? "/per-channel" : "/per-tensor", c.with_bias ? "/bias" : "");
}

// Runs every m and output dtype on one layer of shape [n, k] against the float64 reference.
void CheckLayer(Device& dev, const LayerCase& lc, int64_t n, int64_t k,
                const std::vector<int64_t>& ms, uint32_t seed) {
  cudaStream_t stream = dev.stream.get();
  const bool fp8 = lc.format == WeightFormat::kFp8;
  const std::string layer = absl::StrCat(CaseName(lc), " n=", n, " k=", k);
  SCOPED_TRACE(layer);

  LinearWeights w;
  w.name = "model.layers.0.test_proj";
  w.in_features = k;
  w.out_features = n;
  w.format = lc.format;
  w.act_quant = lc.act;
  const std::vector<uint8_t> codes =
      fp8 ? RandomE4M3Codes(n * k, seed) : RandomInt8Codes(n * k, seed);
  w.weight = Tensor::Empty(fp8 ? DType::kF8E4M3 : DType::kI8, {n, k});
  std::memcpy(w.weight.raw(), codes.data(), codes.size());
  std::mt19937 rng(seed + 1);
  std::uniform_real_distribution<float> scale_dist(0.5e-3f, 2e-3f);
  std::vector<float> w_scale(static_cast<size_t>(n));
  if (lc.per_channel) {
    w.weight_scale = Tensor::Empty(DType::kF32, {n, 1});
    for (int64_t i = 0; i < n; ++i) w_scale[i] = w.weight_scale.data<float>()[i] = scale_dist(rng);
  } else {
    w.weight_scale = Tensor::Empty(DType::kF32, {1});
    const float s = scale_dist(rng);
    w.weight_scale.data<float>()[0] = s;
    std::fill(w_scale.begin(), w_scale.end(), s);
  }
  const float static_scale = 0.02f;
  if (lc.act == ActQuant::kFp8Static) {
    w.input_scale = Tensor::Empty(DType::kF32, {1});
    w.input_scale.data<float>()[0] = static_scale;
  }
  std::vector<float> bias(static_cast<size_t>(n), 0.0f);
  if (lc.with_bias) {
    // Of the order of a typical y, so a bias added to the wrong column is caught.
    std::uniform_real_distribution<float> bias_dist(-1.0f, 1.0f);
    w.bias = Tensor::Empty(DType::kF32, {n});
    for (int64_t i = 0; i < n; ++i) bias[i] = w.bias.data<float>()[i] = bias_dist(rng);
  }

  auto op = QuantLinear8::Create(w, dev.info.cc_major, dev.info.cc_minor, stream);
  if (fp8 && lc.act != ActQuant::kNone && !HasFp8TensorCores(dev.info)) {
    ASSERT_FALSE(op.ok());
    EXPECT_TRUE(absl::IsUnimplemented(op.status())) << op.status();
    return;
  }
  ASSERT_TRUE(op.ok()) << op.status();
  EXPECT_EQ((*op)->in_features(), k);
  EXPECT_EQ((*op)->out_features(), n);
  EXPECT_EQ((*op)->weight_bytes(), n * k);

  // Dequantized weight codes (without the scale), row-major [n, k].
  std::vector<double> wv(codes.size());
  for (size_t i = 0; i < codes.size(); ++i) wv[i] = CodeValue(codes[i], fp8);

  for (int64_t m : ms) {
    const std::vector<float> x = RandomX(m, k, seed * 31 + static_cast<uint32_t>(m));
    // The activation each product sees, and its row scale.
    std::vector<double> xv(static_cast<size_t>(m * k));
    std::vector<double> xs(static_cast<size_t>(m), 1.0);
    if (lc.act == ActQuant::kNone) {
      for (size_t i = 0; i < xv.size(); ++i) xv[i] = x[i];
    } else {
      std::vector<uint8_t> xc(static_cast<size_t>(k));
      for (int64_t r = 0; r < m; ++r) {
        xs[r] = HostQuantizeRow(x.data() + r * k, k, lc.act, static_scale, xc.data());
        for (int64_t i = 0; i < k; ++i) xv[r * k + i] = CodeValue(xc[i], fp8);
      }
    }
    std::vector<double> want(static_cast<size_t>(m * n));
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < n; ++c) {
        double acc = 0;
        const double* xr = xv.data() + r * k;
        const double* wr = wv.data() + c * k;
        for (int64_t i = 0; i < k; ++i) acc += xr[i] * wr[i];
        want[r * n + c] = acc * xs[r] * w_scale[c] + bias[c];
      }
    }
    auto xd = UploadVec(Bf16Bits(x), stream);
    ASSERT_TRUE(xd.ok()) << xd.status();
    for (DType yt : {DType::kF32, DType::kBF16}) {
      const std::string what = absl::StrCat(layer, " m=", m, " y=", std::string(DTypeName(yt)));
      auto y = DeviceBuffer::Allocate(static_cast<size_t>(m * n) * DTypeSize(yt));
      ASSERT_TRUE(y.ok()) << y.status();
      Q8_ASSERT_OK(y->Fill(0xFF, stream));
      const absl::Status st = (*op)->Run(xd->get(), m, y->get(), yt, stream);
      ASSERT_TRUE(st.ok()) << what << ": " << st;
      std::vector<float> got(static_cast<size_t>(m * n));
      if (yt == DType::kF32) {
        Q8_ASSERT_OK(y->CopyToHost(got.data(), got.size() * sizeof(float), stream));
      } else {
        std::vector<uint16_t> bits(got.size());
        Q8_ASSERT_OK(y->CopyToHost(bits.data(), bits.size() * sizeof(uint16_t), stream));
        for (size_t i = 0; i < bits.size(); ++i) got[i] = Bf16ToF32(bits[i]);
      }
      if ((*op)->TakesFp8PerTokenCodes()) {
        // The same x quantized by the quantize kernel outside the linear (what a producer's
        // fp8 side output holds, see act_quant_side_test.cc): RunQuantized must give Run's
        // bits.
        auto codes = DeviceBuffer::Allocate(static_cast<size_t>(m * k));
        auto scales = DeviceBuffer::Allocate(static_cast<size_t>(m) * sizeof(float));
        auto y2 = DeviceBuffer::Allocate(static_cast<size_t>(m * n) * DTypeSize(yt));
        ASSERT_TRUE(codes.ok() && scales.ok() && y2.ok());
        Q8_ASSERT_OK(y2->Fill(0xFF, stream));
        Q8_ASSERT_OK(LaunchQuantizeActivations(xd->get(), m, k, ActQuant::kFp8PerToken, 0.0f,
                                               codes->get(), scales->as<float>(), stream));
        Q8_ASSERT_OK((*op)->RunQuantized(codes->as<uint8_t>(), scales->as<float>(), m, y2->get(),
                                         yt, stream));
        const size_t bytes = static_cast<size_t>(m * n) * DTypeSize(yt);
        std::vector<uint8_t> a(bytes), b(bytes);
        Q8_ASSERT_OK(y->CopyToHost(a.data(), bytes, stream));
        Q8_ASSERT_OK(y2->CopyToHost(b.data(), bytes, stream));
        EXPECT_TRUE(a == b) << what << ": RunQuantized differs from Run";
      }
      const std::string kernel = (*op)->kernel_name();
      const bool fp8_mma = fp8 && lc.act != ActQuant::kNone;
      ExpectClose(got, want, m, n, yt == DType::kBF16, fp8_mma,
                  absl::StrCat(what, " kernel ", kernel),
                  fp8_mma && kernel.find("cublaslt") != std::string::npos);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

const std::vector<int64_t> kAllMs = {1, 2, 7, 16, 17, 64, 300};
const std::vector<int64_t> kSmallMs = {1, 3, 9, 16, 40};

struct Shape2 {
  int64_t n, k;
};
// 256 x 512 .. 768 x 2048: the plain shapes; 200 x 4112: n not a multiple of 64, k not a
// multiple of 512 (tail chunks); 77 x 1040: odd n; 64 x 8192: one column tile, many K splits.
const Shape2 kShapes[] = {{256, 512},  {384, 1024}, {768, 2048},
                          {200, 4112}, {77, 1040},  {64, 8192}};

void RunLayerCases(const LayerCase& lc, uint32_t seed) {
  auto dev = OpenDevice();
  ASSERT_NE(dev, nullptr);
  for (const Shape2& s : kShapes) {
    const bool plain = s.n % 64 == 0 && s.k <= 2048;
    CheckLayer(*dev, lc, s.n, s.k, plain ? kAllMs : kSmallMs, seed++);
    if (::testing::Test::HasFatalFailure()) return;
  }
}

TEST(Fp8LinearTest, Fp8PerTokenPerChannel) {
  SKIP_WITHOUT_GPU();
  RunLayerCases({WeightFormat::kFp8, ActQuant::kFp8PerToken, true, false}, 1000);
}

TEST(Fp8LinearTest, Fp8PerTokenPerTensorWithBias) {
  SKIP_WITHOUT_GPU();
  RunLayerCases({WeightFormat::kFp8, ActQuant::kFp8PerToken, false, true}, 2000);
}

TEST(Fp8LinearTest, Fp8StaticInputScale) {
  SKIP_WITHOUT_GPU();
  RunLayerCases({WeightFormat::kFp8, ActQuant::kFp8Static, true, false}, 3000);
}

TEST(Fp8LinearTest, Fp8WeightOnly) {
  SKIP_WITHOUT_GPU();
  RunLayerCases({WeightFormat::kFp8, ActQuant::kNone, true, true}, 4000);
}

TEST(Fp8LinearTest, Int8PerTokenPerChannel) {
  SKIP_WITHOUT_GPU();
  RunLayerCases({WeightFormat::kInt8, ActQuant::kInt8PerToken, true, false}, 5000);
}

TEST(Fp8LinearTest, Int8PerTokenPerTensorWithBias) {
  SKIP_WITHOUT_GPU();
  RunLayerCases({WeightFormat::kInt8, ActQuant::kInt8PerToken, false, true}, 6000);
}

TEST(Fp8LinearTest, Int8WeightOnly) {
  SKIP_WITHOUT_GPU();
  RunLayerCases({WeightFormat::kInt8, ActQuant::kNone, false, false}, 7000);
}

// An n x k layer (256 x 512 unless given) of random codes, scales 1e-3 per channel, bias
// 0.5 when asked.
LinearWeights SmallLayer(const std::string& name, WeightFormat format, ActQuant act, bool with_bias,
                         int64_t n = 256, int64_t k = 512) {
  const bool fp8 = format == WeightFormat::kFp8;
  LinearWeights w;
  w.name = name;
  w.in_features = k;
  w.out_features = n;
  w.format = format;
  w.act_quant = act;
  w.weight = Tensor::Empty(fp8 ? DType::kF8E4M3 : DType::kI8, {n, k});
  const std::vector<uint8_t> codes = fp8 ? RandomE4M3Codes(n * k, 3) : RandomInt8Codes(n * k, 3);
  std::memcpy(w.weight.raw(), codes.data(), codes.size());
  w.weight_scale = Tensor::Empty(DType::kF32, {n, 1});
  for (int64_t i = 0; i < n; ++i) w.weight_scale.data<float>()[i] = 1e-3f;
  if (with_bias) {
    w.bias = Tensor::Empty(DType::kF32, {n});
    for (int64_t i = 0; i < n; ++i) w.bias.data<float>()[i] = 0.5f;
  }
  return w;
}

// The ring-loaded GEMV (SetGemv8Ring) does the default's arithmetic in the default's order:
// the same bits, on shapes with K tails, one and many K splits, and every decode M.
TEST(Fp8LinearTest, Gemv8RingGivesTheSameBits) {
  SKIP_WITHOUT_GPU();
  auto dev = OpenDevice();
  ASSERT_NE(dev, nullptr);
  if (!HasFp8TensorCores(dev->info)) GTEST_SKIP() << "no fp8 tensor cores";
  struct Restore {
    bool saved = Gemv8RingEnabled();
    ~Restore() { SetGemv8Ring(saved); }
  } restore;
  cudaStream_t stream = dev->stream.get();
  for (const Shape2 s : {Shape2{256, 512}, Shape2{200, 4112}, Shape2{77, 1040}, Shape2{64, 8192},
                         Shape2{4096, 4096}}) {
    auto op = QuantLinear8::Create(
        SmallLayer("ring", WeightFormat::kFp8, ActQuant::kFp8PerToken, false, s.n, s.k),
        dev->info.cc_major, dev->info.cc_minor, stream);
    ASSERT_TRUE(op.ok()) << op.status();
    for (int64_t m : {1, 3, 16}) {
      const std::string what = absl::StrCat(s.n, " x ", s.k, " m=", m);
      auto xd = UploadVec(Bf16Bits(RandomX(m, s.k, static_cast<uint32_t>(s.n + m))), stream);
      ASSERT_TRUE(xd.ok()) << xd.status();
      std::vector<uint8_t> out[2];
      for (const bool ring : {false, true}) {
        SetGemv8Ring(ring);
        auto y = DeviceBuffer::Allocate(static_cast<size_t>(m * s.n) * 4);
        ASSERT_TRUE(y.ok()) << y.status();
        Q8_ASSERT_OK(y->Fill(ring ? 0xFF : 0x7F, stream));  // different poison per run
        Q8_ASSERT_OK((*op)->Run(xd->get(), m, y->get(), DType::kF32, stream));
        out[ring].resize(static_cast<size_t>(m * s.n) * 4);
        Q8_ASSERT_OK(y->CopyToHost(out[ring].data(), out[ring].size(), stream));
        EXPECT_EQ((*op)->kernel_name(), "cuda-fp8-w8a8-gemv") << what;
      }
      EXPECT_TRUE(out[0] == out[1]) << what << ": the ring GEMV differs from the default";
    }
  }
}

// The outer-vector-scaled cuBLASLt path (SetFp8BlasScaled) for m > 16: every fp8 W8A8 case
// against the float64 reference again (per-channel and per-tensor weights, per-token and
// static activations; with a bias the linear keeps the accumulator + epilogue path). On
// Hopper (cuBLAS 12.9+ has outer-vector fp8 scales there) the path must actually run.
TEST(Fp8LinearTest, Fp8BlasScaledMatchesReference) {
  SKIP_WITHOUT_GPU();
  struct Restore {
    bool saved = Fp8BlasScaledEnabled();
    ~Restore() { SetFp8BlasScaled(saved); }
  } restore;
  SetFp8BlasScaled(true);
  RunLayerCases({WeightFormat::kFp8, ActQuant::kFp8PerToken, true, false}, 8000);
  if (HasFatalFailure()) return;
  RunLayerCases({WeightFormat::kFp8, ActQuant::kFp8PerToken, false, true}, 8100);
  if (HasFatalFailure()) return;
  RunLayerCases({WeightFormat::kFp8, ActQuant::kFp8Static, true, false}, 8200);
  if (HasFatalFailure()) return;

  auto dev = OpenDevice();
  ASSERT_NE(dev, nullptr);
  if (!HasFp8TensorCores(dev->info)) GTEST_SKIP() << "no fp8 tensor cores";
  for (const bool with_bias : {false, true}) {
    LinearWeights w = SmallLayer("scaled", WeightFormat::kFp8, ActQuant::kFp8PerToken, with_bias);
    auto op = QuantLinear8::Create(w, dev->info.cc_major, dev->info.cc_minor, dev->stream.get());
    ASSERT_TRUE(op.ok()) << op.status();
    auto x = DeviceBuffer::Allocate(64 * 512 * 2);
    auto y = DeviceBuffer::Allocate(64 * 256 * 2);
    ASSERT_TRUE(x.ok() && y.ok());
    Q8_ASSERT_OK(x->Fill(0x3F, dev->stream.get()));
    Q8_ASSERT_OK((*op)->Run(x->get(), 64, y->get(), DType::kBF16, dev->stream.get()));
    Q8_ASSERT_OK(dev->stream.Synchronize());
    const std::string name = (*op)->kernel_name();
    std::printf("fp8 W8A8 at m=64%s with outer-vector scales on: %s\n", with_bias ? " (bias)" : "",
                name.c_str());
    if (with_bias) {
      EXPECT_EQ(name, "cuda-fp8-w8a8-cublaslt") << "a bias keeps the epilogue path";
    } else if (dev->info.cc_major == 9) {
      EXPECT_EQ(name, "cuda-fp8-w8a8-cublaslt-scaled");
    }
  }
}

// Names which kernel serves decode vs prefill (informational on the path, strict on the name).
TEST(Fp8LinearTest, KernelNames) {
  SKIP_WITHOUT_GPU();
  auto dev = OpenDevice();
  ASSERT_NE(dev, nullptr);
  LinearWeights w = SmallLayer("names", WeightFormat::kInt8, ActQuant::kInt8PerToken, false);
  auto op = QuantLinear8::Create(w, dev->info.cc_major, dev->info.cc_minor, dev->stream.get());
  ASSERT_TRUE(op.ok()) << op.status();
  EXPECT_EQ((*op)->kernel_name(), "cuda-int8-w8a8-gemv");
  auto x = DeviceBuffer::Allocate(64 * 512 * 2);
  auto y = DeviceBuffer::Allocate(64 * 256 * 4);
  ASSERT_TRUE(x.ok() && y.ok());
  Q8_ASSERT_OK(x->Fill(0x3F, dev->stream.get()));  // bf16 0x3F3F = 0.746
  Q8_ASSERT_OK((*op)->Run(x->get(), 64, y->get(), DType::kF32, dev->stream.get()));
  Q8_ASSERT_OK(dev->stream.Synchronize());
  const std::string name = (*op)->kernel_name();
  EXPECT_TRUE(name == "cuda-int8-w8a8-cublaslt" || name == "cuda-int8-w8a8-gemv") << name;
  std::printf("int8 W8A8 at m=64 runs on %s\n", name.c_str());
}

// Validation: block-wise fp8 scales, bad scale shapes, missing input_scale, bad K.
TEST(Fp8LinearTest, CreateRejectsWithLayerName) {
  SKIP_WITHOUT_GPU();
  auto dev = OpenDevice();
  ASSERT_NE(dev, nullptr);
  auto make = [] {
    LinearWeights w;
    w.name = "model.layers.3.mlp.down_proj";
    w.in_features = 128;
    w.out_features = 64;
    w.format = WeightFormat::kFp8;
    w.act_quant = ActQuant::kFp8PerToken;
    w.weight = Tensor::Empty(DType::kF8E4M3, {64, 128});
    w.weight_scale = Tensor::Empty(DType::kF32, {64, 1});
    return w;
  };
  const int ma = dev->info.cc_major, mi = dev->info.cc_minor;
  cudaStream_t s = dev->stream.get();
  {
    LinearWeights w = make();
    w.block_size = {128, 128};
    w.weight_scale = Tensor::Empty(DType::kF32, {1, 1});
    auto op = QuantLinear8::Create(w, ma, mi, s);
    ASSERT_FALSE(op.ok());
    EXPECT_TRUE(absl::IsUnimplemented(op.status())) << op.status();
    EXPECT_NE(op.status().message().find("down_proj"), std::string::npos) << op.status();
    EXPECT_NE(op.status().message().find("block"), std::string::npos) << op.status();
  }
  {
    LinearWeights w = make();
    w.weight_scale = Tensor::Empty(DType::kF32, {32, 1});
    auto op = QuantLinear8::Create(w, ma, mi, s);
    ASSERT_FALSE(op.ok());
    EXPECT_NE(op.status().message().find("weight_scale"), std::string::npos) << op.status();
  }
  {
    LinearWeights w = make();
    w.act_quant = ActQuant::kFp8Static;
    auto op = QuantLinear8::Create(w, ma, mi, s);
    ASSERT_FALSE(op.ok());
    EXPECT_NE(op.status().message().find("input_scale"), std::string::npos) << op.status();
  }
  {
    LinearWeights w = make();
    w.in_features = 120;
    w.weight = Tensor::Empty(DType::kF8E4M3, {64, 120});
    auto op = QuantLinear8::Create(w, ma, mi, s);
    ASSERT_FALSE(op.ok());
    EXPECT_NE(op.status().message().find("multiple of 16"), std::string::npos) << op.status();
  }
  {
    LinearWeights w = make();
    w.weight = Tensor::Empty(DType::kBF16, {64, 128});
    auto op = QuantLinear8::Create(w, ma, mi, s);
    ASSERT_FALSE(op.ok());
    EXPECT_NE(op.status().message().find("weight"), std::string::npos) << op.status();
  }
  {
    LinearWeights w = make();
    w.format = WeightFormat::kInt8;
    w.weight = Tensor::Empty(DType::kI8, {64, 128});
    auto op = QuantLinear8::Create(w, ma, mi, s);  // int8 weights with fp8 activations
    ASSERT_FALSE(op.ok());
    EXPECT_NE(op.status().message().find("down_proj"), std::string::npos) << op.status();
  }
}

// Informational (never fails on speed): decode-time cost of the Llama-3.1-8B linears
// (N x K = 6144 x 4096, 4096 x 4096, 28672 x 4096, 4096 x 14336; 32 layers), each Run
// (activation quantization + GEMV) timed with CUDA events over 20 back-to-back calls, in
// GB/s of weight streamed; the 32-layer total is what the decode step would spend.
TEST(Fp8LinearTest, LlamaDecodeBandwidthReport) {
  SKIP_WITHOUT_GPU();
  auto dev = OpenDevice();
  ASSERT_NE(dev, nullptr);
  cudaStream_t stream = dev->stream.get();
  struct Layer {
    int64_t n, k;
  };
  const Layer layers[] = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}};
  const bool fp8_ok = HasFp8TensorCores(dev->info);
  for (WeightFormat format : {WeightFormat::kFp8, WeightFormat::kInt8}) {
    for (ActQuant act : {ActQuant::kFp8PerToken, ActQuant::kInt8PerToken, ActQuant::kNone}) {
      const bool fp8 = format == WeightFormat::kFp8;
      if (fp8 && act == ActQuant::kInt8PerToken) continue;
      if (!fp8 && act == ActQuant::kFp8PerToken) continue;
      if (fp8 && act == ActQuant::kFp8PerToken && !fp8_ok) continue;
      std::vector<std::unique_ptr<QuantLinear8>> ops;
      for (const Layer& l : layers) {
        LinearWeights w;
        w.name = "bench";
        w.in_features = l.k;
        w.out_features = l.n;
        w.format = format;
        w.act_quant = act;
        w.weight = Tensor::Empty(fp8 ? DType::kF8E4M3 : DType::kI8, {l.n, l.k}, false);
        uint8_t* c = w.weight.data<uint8_t>();
        uint32_t state = 12345;
        for (int64_t i = 0; i < l.n * l.k; ++i) {
          state = state * 1664525u + 1013904223u;
          uint8_t b = static_cast<uint8_t>(state >> 24);
          if (fp8 && IsE4M3NaN(b)) b = 0x3E;
          if (!fp8 && b == 0x80) b = 0x81;  // int8 codes stay in [-127, 127]
          c[i] = b;
        }
        w.weight_scale = Tensor::Empty(DType::kF32, {l.n, 1});
        for (int64_t i = 0; i < l.n; ++i) w.weight_scale.data<float>()[i] = 1e-3f;
        auto op = QuantLinear8::Create(w, dev->info.cc_major, dev->info.cc_minor, stream);
        ASSERT_TRUE(op.ok()) << op.status();
        ops.push_back(std::move(*op));
      }
      // The four layers run in turn (218 MB, over the 50 MB L2), so no layer is timed from L2.
      for (int64_t m : {1, 4, 16}) {
        auto xd = UploadVec(Bf16Bits(RandomX(m, 14336, 9)), stream);
        auto y = DeviceBuffer::Allocate(static_cast<size_t>(m * 28672) * 2);
        ASSERT_TRUE(xd.ok() && y.ok());
        constexpr int kReps = 20;
        constexpr int kLayers = 4;
        cudaEvent_t ev[kLayers + 1];
        for (cudaEvent_t& e : ev) ASSERT_EQ(cudaEventCreate(&e), cudaSuccess);
        double us[kLayers] = {0, 0, 0, 0};
        for (int r = -2; r < kReps; ++r) {  // two warm-up rounds
          for (int l = 0; l < kLayers; ++l) {
            ASSERT_EQ(cudaEventRecord(ev[l], stream), cudaSuccess);
            Q8_ASSERT_OK(ops[l]->Run(xd->get(), m, y->get(), DType::kBF16, stream));
          }
          ASSERT_EQ(cudaEventRecord(ev[kLayers], stream), cudaSuccess);
          ASSERT_EQ(cudaEventSynchronize(ev[kLayers]), cudaSuccess);
          if (r < 0) continue;
          for (int l = 0; l < kLayers; ++l) {
            float ms = 0;
            ASSERT_EQ(cudaEventElapsedTime(&ms, ev[l], ev[l + 1]), cudaSuccess);
            us[l] += 1e3 * ms / kReps;
          }
        }
        for (cudaEvent_t& e : ev) (void)cudaEventDestroy(e);
        double total = 0;
        for (int l = 0; l < kLayers; ++l) {
          total += us[l];
          std::printf("  %-22s m=%-2lld %5lld x %-5lld %8.1f us %7.0f GB/s\n",
                      ops[l]->kernel_name().c_str(), static_cast<long long>(m),
                      static_cast<long long>(layers[l].n), static_cast<long long>(layers[l].k),
                      us[l], static_cast<double>(layers[l].n * layers[l].k) / us[l] * 1e-3);
        }
        std::printf("%s m=%lld: one layer %.1f us, 32 layers %.2f ms (target <= 2.9 ms)\n",
                    ops[0]->kernel_name().c_str(), static_cast<long long>(m), total,
                    total * 32 * 1e-3);
      }
    }
  }
}

}  // namespace
}  // namespace qshard::cuda
