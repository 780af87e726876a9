// GPTQ (quant/gptq.h) and its linear-algebra kernels (quant/dense_linalg.h): the Hessian
// accumulator against a float64 sum, the Cholesky / triangular inverse / U = chol(H^-1)
// against their definitions, and GptqQuantize's properties: lower output error than RTN on
// correlated inputs, exact RTN behaviour for H = I, the grid, dead inputs, act-order and
// the dampening retries. Timings are printed (the big one is DISABLED_, run it with
// --gtest_also_run_disabled_tests).
#include "quant/gptq.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "quant/dense_linalg.h"
#include "quant/fp8.h"
#include "quant/gptq_format.h"
#include "quant/quantize_weights.h"
#include "tests/quant/quant_test_util.h"
#include "runtime/base/half.h"

namespace qshard {
namespace {

using quant_internal::CholeskyLower;
using quant_internal::GemmAcc;
using quant_internal::InvertLowerTriangular;

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// x [T, K] = z A with z ~ N(0, 1) and a random mixing A [K, K] (identity plus a low-rank
// part and per-channel magnitudes): inputs with a strongly non-diagonal covariance.
std::vector<float> CorrelatedInputs(int64_t T, int64_t K, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t R = 8;  // low-rank factors shared by all channels
  std::vector<float> f(static_cast<size_t>(R * K)), mag(static_cast<size_t>(K));
  for (float& v : f) v = nd(rng);
  for (float& v : mag) v = 0.5f + std::fabs(nd(rng));
  std::vector<float> x(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    float z[R];
    for (float& v : z) v = nd(rng);
    for (int64_t k = 0; k < K; ++k) {
      float v = 0.3f * nd(rng);
      for (int64_t r = 0; r < R; ++r) v += z[r] * f[r * K + k];
      x[t * K + k] = v * mag[k];
    }
  }
  return x;
}

using ::qshard::testing::RandomWeights;

// ||X W^T - X Q^T||_F^2 in double.
double OutputError(const std::vector<float>& x, int64_t T, int64_t K, const std::vector<float>& w,
                   const IntQuantMatrix& q) {
  const int64_t N = q.out_features;
  std::vector<double> d(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) d[n * K + k] = q.Dequant(n, k) - w[n * K + k];
  }
  double e = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += x[t * K + k] * d[n * K + k];
      e += s * s;
    }
  }
  return e;
}

// The result is a valid quantized matrix: codes in range, integer zeros (2^(bits-1) when
// symmetric), f16 scales, every group of the expected size.
void ExpectOnGrid(const IntQuantMatrix& q, int bits, bool sym, int64_t group) {
  const int maxq = (1 << bits) - 1;
  for (uint8_t c : q.codes) ASSERT_LE(c, maxq);
  for (float z : q.zeros) {
    ASSERT_EQ(z, std::nearbyint(z));
    ASSERT_GE(z, 0);
    ASSERT_LE(z, maxq);
    if (sym) {
      ASSERT_EQ(z, 1 << (bits - 1));
    }
  }
  for (float s : q.scales) {
    ASSERT_GT(s, 0);
    ASSERT_EQ(s, F16ToF32(F32ToF16(s)));
  }
  std::vector<int64_t> count(q.num_groups, 0);
  for (int32_t g : q.g_idx) ++count[g];
  for (int64_t g = 0; g + 1 < q.num_groups; ++g) EXPECT_EQ(count[g], group);
}

TEST(DenseLinalgTest, GemmMatchesNaive) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<double> ud(-1, 1);
  for (auto [M, N, Kd] : {std::tuple{13, 37, 19}, std::tuple{6, 16, 1}, std::tuple{1, 5, 7},
                          std::tuple{64, 48, 33}}) {
    std::vector<double> a(M * Kd), b(Kd * N), c(M * N);
    for (double& v : a) v = ud(rng);
    for (double& v : b) v = ud(rng);
    for (double& v : c) v = ud(rng);
    std::vector<float> af(a.begin(), a.end()), bf(b.begin(), b.end()), cf(c.begin(), c.end());
    std::vector<double> want = c;
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < N; ++j) {
        for (int p = 0; p < Kd; ++p) want[i * N + j] += -0.5 * a[i * Kd + p] * b[p * N + j];
      }
    }
    GemmAcc(M, N, Kd, -0.5, a.data(), Kd, b.data(), N, c.data(), N);
    GemmAcc(M, N, Kd, -0.5f, af.data(), Kd, bf.data(), N, cf.data(), N);
    for (int i = 0; i < M * N; ++i) {
      EXPECT_NEAR(c[i], want[i], 1e-12);
      EXPECT_NEAR(cf[i], want[i], 1e-5);  // fp32: a few ulps of sums of <= 64 terms
    }
  }
}

// A random SPD matrix: B B^T / n + 0.1 I.
std::vector<double> RandomSpd(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<double> b(n * n), a(n * n, 0.0);
  for (double& v : b) v = nd(rng);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < n; ++p) s += b[i * n + p] * b[j * n + p];
      a[i * n + j] = s / n + (i == j ? 0.1 : 0.0);
    }
  }
  return a;
}

TEST(DenseLinalgTest, CholeskyAndTriangularInverse) {
  for (int64_t n : {1, 5, 97, 200}) {
    SCOPED_TRACE(n);
    const std::vector<double> a = RandomSpd(n, 3);
    std::vector<double> l = a;
    ASSERT_TRUE(CholeskyLower(l.data(), n));
    double err = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (j > i) {
          ASSERT_EQ(l[i * n + j], 0.0);
        }
        double s = 0;
        for (int64_t p = 0; p < n; ++p) s += l[i * n + p] * l[j * n + p];
        err = std::max(err, std::fabs(s - a[i * n + j]));
      }
    }
    EXPECT_LT(err, 1e-10);  // fp64, entries O(1)
    std::vector<double> x = l;
    InvertLowerTriangular(x.data(), n);
    err = 0;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        if (j > i) {
          ASSERT_EQ(x[i * n + j], 0.0);
        }
        double s = 0;
        for (int64_t p = 0; p < n; ++p) s += l[i * n + p] * x[p * n + j];
        err = std::max(err, std::fabs(s - (i == j ? 1.0 : 0.0)));
      }
    }
    EXPECT_LT(err, 1e-9);
  }
  std::vector<double> bad = {1, 2, 2, 1};  // eigenvalues 3, -1
  EXPECT_FALSE(CholeskyLower(bad.data(), 2));
}

TEST(DenseLinalgTest, UpperCholeskyOfInverse) {
  const int64_t n = 150;
  const std::vector<double> a = RandomSpd(n, 4);
  std::vector<float> u;
  ASSERT_TRUE(quant_internal::UpperCholeskyOfInverse(a.data(), n, 0.05, &u));
  // (a + 0.05 I) U^T U = I; U upper with a positive diagonal. fp32 U: 1e-4.
  double err = 0;
  std::vector<double> inv(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_GT(u[i * n + i], 0.0f);
    for (int64_t j = 0; j < i; ++j) ASSERT_EQ(u[i * n + j], 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < n; ++p) s += static_cast<double>(u[p * n + i]) * u[p * n + j];
      inv[i * n + j] = s;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < n; ++p) s += (a[i * n + p] + (i == p ? 0.05 : 0.0)) * inv[p * n + j];
      err = std::max(err, std::fabs(s - (i == j ? 1.0 : 0.0)));
    }
  }
  EXPECT_LT(err, 1e-4);
  std::vector<double> indefinite = {1, 2, 2, 1};
  EXPECT_FALSE(quant_internal::UpperCholeskyOfInverse(indefinite.data(), 2, 0.0, &u));
}

TEST(HessianAccumulatorTest, RunningMeanMatchesFloat64) {
  const int64_t K = 200;
  const std::vector<float> x = CorrelatedInputs(700, K, 5);
  HessianAccumulator h(K);
  // Batches of odd sizes, with h() read in between (switches representation).
  h.Add(x.data(), 1);
  h.Add(x.data() + K, 300);
  EXPECT_EQ(h.num_samples(), 301);
  (void)h.h();
  h.Add(x.data() + 301 * K, 399);
  EXPECT_EQ(h.num_samples(), 700);
  const std::vector<double>& got = h.h();
  double max_rel = 0;
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = 0; j < K; ++j) {
      double s = 0;
      for (int64_t t = 0; t < 700; ++t) s += static_cast<double>(x[t * K + i]) * x[t * K + j];
      const double want = 2.0 * s / 700;
      const double scale = std::sqrt(got[i * K + i] * got[j * K + j]);
      max_rel = std::max(max_rel, std::fabs(got[i * K + j] - want) / scale);
      ASSERT_EQ(got[i * K + j], got[j * K + i]);
    }
  }
  // fp32 products summed over <= 256 rows per chunk: relative error ~1e-6.
  EXPECT_LT(max_rel, 1e-5);
}

struct GptqCase {
  bool sym, desc_act;
};

TEST(GptqTest, BeatsRtnOnCorrelatedInputs) {
  const int64_t K = 256, N = 64, T = 2048;
  const std::vector<float> x = CorrelatedInputs(T, K, 7);
  const std::vector<float> w = RandomWeights(N, K, 8);
  HessianAccumulator h(K);
  h.Add(x.data(), T);
  for (const GptqCase& c : {GptqCase{true, false}, GptqCase{true, true}, GptqCase{false, false},
                            GptqCase{false, true}}) {
    SCOPED_TRACE(::testing::Message() << "sym " << c.sym << " desc_act " << c.desc_act);
    GptqOptions o;
    o.sym = c.sym;
    o.desc_act = c.desc_act;
    auto r = GptqQuantize(w.data(), N, K, h, o);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(r->warning.empty());
    ExpectOnGrid(r->q, 4, c.sym, 128);
    const IntQuantMatrix rtn = QuantizeRtn(w.data(), N, K, {4, 128, c.sym});
    const double e_gptq = OutputError(x, T, K, w, r->q), e_rtn = OutputError(x, T, K, w, rtn);
    // GPTQ minimizes exactly this error: expect well under RTN's (typically ~0.3-0.6x).
    EXPECT_LT(e_gptq, 0.8 * e_rtn) << "gptq " << e_gptq << " rtn " << e_rtn;
    std::printf("[gptq] sym %d desc_act %d: output error %.4g (RTN %.4g, ratio %.2f)\n", c.sym,
                c.desc_act, e_gptq, e_rtn, e_gptq / e_rtn);
    EXPECT_GT(r->loss, 0.0);
    // act-order: the g_idx is a permutation of the groups (non-monotone here since the
    // channel magnitudes are random), and it packs / unpacks to the same weights.
    bool monotone = true;
    for (int64_t k = 1; k < K; ++k) monotone &= r->q.g_idx[k] >= r->q.g_idx[k - 1];
    EXPECT_EQ(monotone, !c.desc_act);
    auto lw = PackGptq(r->q, "l", c.sym, /*v1=*/false);
    ASSERT_TRUE(lw.ok()) << lw.status();
    auto back = UnpackGptq(*lw);
    ASSERT_TRUE(back.ok()) << back.status();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) ASSERT_EQ(back->Dequant(n, k), r->q.Dequant(n, k));
    }
  }
}

TEST(GptqTest, StaticGroupsKeepMonotoneGroups) {
  const int64_t K = 256, N = 32, T = 1024;
  const std::vector<float> x = CorrelatedInputs(T, K, 9);
  const std::vector<float> w = RandomWeights(N, K, 10);
  HessianAccumulator h(K);
  h.Add(x.data(), T);
  GptqOptions o;
  o.desc_act = true;
  o.static_groups = true;
  o.group_size = 64;
  auto r = GptqQuantize(w.data(), N, K, h, o);
  ASSERT_TRUE(r.ok()) << r.status();
  for (int64_t k = 0; k < K; ++k) EXPECT_EQ(r->q.g_idx[k], k / 64);
  // Static groups: the parameters are those of RTN on the original weights.
  const IntQuantMatrix rtn = QuantizeRtn(w.data(), N, K, {4, 64, true});
  EXPECT_EQ(r->q.scales, rtn.scales);
  const IntQuantMatrix rtn_err = rtn;
  EXPECT_LT(OutputError(x, T, K, w, r->q), OutputError(x, T, K, w, rtn_err));
}

// With H = c I no error is propagated (U is diagonal), and the group parameters are taken
// from the untouched weights: GPTQ then reproduces RTN exactly (codes, scales, zeros), for
// every group size, symmetric or not, with act-order too (equal diagonal: order kept).
TEST(GptqTest, IdentityHessianIsRtn) {
  const int64_t K = 128, N = 16;
  HessianAccumulator h(K);
  std::vector<float> eye(K * K, 0.0f);
  for (int64_t k = 0; k < K; ++k) eye[k * K + k] = 8.0f;  // sqrt(K / 2): H = I
  h.Add(eye.data(), K);
  const std::vector<float> w = RandomWeights(N, K, 11);
  for (int64_t group : {int64_t{32}, int64_t{128}, int64_t{-1}}) {
    for (bool sym : {true, false}) {
      for (bool desc : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "group " << group << " sym " << sym << " desc " << desc);
        GptqOptions o;
        o.group_size = group;
        o.sym = sym;
        o.desc_act = desc;
        o.block_size = 48;  // blocks that do not align with the groups
        auto r = GptqQuantize(w.data(), N, K, h, o);
        ASSERT_TRUE(r.ok()) << r.status();
        const IntQuantMatrix rtn = QuantizeRtn(w.data(), N, K, {4, group, sym});
        EXPECT_EQ(r->q.codes, rtn.codes);
        EXPECT_EQ(r->q.scales, rtn.scales);
        EXPECT_EQ(r->q.zeros, rtn.zeros);
        EXPECT_EQ(r->q.g_idx, rtn.g_idx);
        // loss = sum (w - q)^2 / U_ii^2 / 2 with U_ii^2 = 1 / (1 + damp).
        double want = 0;
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t k = 0; k < K; ++k) {
            const double d = w[n * K + k] - rtn.Dequant(n, k);
            want += d * d * 1.01 / 2;
          }
        }
        EXPECT_NEAR(r->loss, want, 1e-4 * want);
      }
    }
  }
}

// GPTQ on the e4m3 grid (per-channel scales amax / 448): codes are e4m3 values of the
// per-row scale, with H = I they are round-to-nearest (the fp8 packer's codes), and on
// correlated inputs the output error drops well below round-to-nearest's.
double Fp8OutputError(const std::vector<float>& x, int64_t T, int64_t K,
                      const std::vector<float>& w, const uint8_t* codes, const float* scales,
                      int64_t N) {
  double e = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) {
        s += x[t * K + k] * (E4M3ToFloat(codes[n * K + k]) * scales[n] - w[n * K + k]);
      }
      e += s * s;
    }
  }
  return e;
}

TEST(GptqTest, Fp8GridIsRtnForIdentityAndBeatsItOnCorrelatedInputs) {
  const int64_t K = 256, N = 32, T = 2048;
  const std::vector<float> w = RandomWeights(N, K, 21);
  const LinearWeights rtn = QuantizeFp8PerChannel(w.data(), N, K, "l", /*dynamic_act=*/true);
  GptqOptions o;
  o.grid = GptqGrid::kFp8E4M3;
  o.group_size = -1;
  {
    HessianAccumulator eye_h(K);
    std::vector<float> eye(K * K, 0.0f);
    for (int64_t k = 0; k < K; ++k) eye[k * K + k] = std::sqrt(K / 2.0f);
    eye_h.Add(eye.data(), K);
    auto r = GptqQuantize(w.data(), N, K, eye_h, o);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->q.codes.size(), static_cast<size_t>(N * K));
    EXPECT_TRUE(std::equal(r->q.codes.begin(), r->q.codes.end(), rtn.weight.data<uint8_t>()));
    EXPECT_TRUE(std::equal(r->q.scales.begin(), r->q.scales.end(), rtn.weight_scale.data<float>()));
  }
  const std::vector<float> x = CorrelatedInputs(T, K, 22);
  HessianAccumulator h(K);
  h.Add(x.data(), T);
  auto r = GptqQuantize(w.data(), N, K, h, o);
  ASSERT_TRUE(r.ok()) << r.status();
  for (uint8_t c : r->q.codes) ASSERT_FALSE(IsE4M3NaN(c));
  const double e_gptq = Fp8OutputError(x, T, K, w, r->q.codes.data(), r->q.scales.data(), N);
  const double e_rtn =
      Fp8OutputError(x, T, K, w, rtn.weight.data<uint8_t>(), rtn.weight_scale.data<float>(), N);
  std::printf("[gptq fp8] output error %.4g (RTN %.4g, ratio %.2f)\n", e_gptq, e_rtn,
              e_gptq / e_rtn);
  EXPECT_LT(e_gptq, 0.8 * e_rtn);
  auto packed = PackFp8PerChannel(r->q, "l", /*dynamic_act=*/true);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_EQ(packed->format, WeightFormat::kFp8);
  EXPECT_EQ(packed->act_quant, ActQuant::kFp8PerToken);
  EXPECT_EQ(packed->weight_scale.shape(), (Shape{N, 1}));
  // Groups or act-order are not representable in the per-channel fp8 layout.
  o.group_size = 128;
  EXPECT_EQ(GptqQuantize(w.data(), N, K, h, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(GptqTest, DeadInputGetsZeroWeight) {
  const int64_t K = 128, N = 16, T = 512;
  std::vector<float> x = CorrelatedInputs(T, K, 12);
  for (int64_t t = 0; t < T; ++t) x[t * K + 5] = x[t * K + 77] = 0.0f;
  const std::vector<float> w = RandomWeights(N, K, 13);
  HessianAccumulator h(K);
  h.Add(x.data(), T);
  for (bool sym : {true, false}) {
    for (bool desc : {false, true}) {
      GptqOptions o;
      o.sym = sym;
      o.desc_act = desc;
      o.group_size = 32;
      auto r = GptqQuantize(w.data(), N, K, h, o);
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->dead_inputs, 2);
      for (int64_t n = 0; n < N; ++n) {
        EXPECT_EQ(r->q.Dequant(n, 5), 0.0f);
        EXPECT_EQ(r->q.Dequant(n, 77), 0.0f);
      }
    }
  }
}

TEST(GptqTest, DampeningRetriesAndErrors) {
  // T < K: H has rank <= 16, so without dampening the Cholesky meets zero / negative pivots.
  const int64_t K = 64, N = 8, T = 16;
  const std::vector<float> x = CorrelatedInputs(T, K, 14);
  const std::vector<float> w = RandomWeights(N, K, 15);
  HessianAccumulator h(K);
  h.Add(x.data(), T);
  GptqOptions o;
  o.damp_percent = 0.0;
  o.name = "model.layers.0.self_attn.q_proj";
  auto r = GptqQuantize(w.data(), N, K, h, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->damp_percent, 0.01);
  EXPECT_NE(r->warning.find("model.layers.0.self_attn.q_proj"), std::string::npos) << r->warning;

  o.max_damp_percent = 0.0;  // no retry allowed
  auto e = GptqQuantize(w.data(), N, K, h, o);
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(e.status().message().find("q_proj"), std::string::npos);

  std::vector<float> nan_x = x;
  nan_x[3] = NAN;
  HessianAccumulator hn(K);
  hn.Add(nan_x.data(), T);
  EXPECT_FALSE(GptqQuantize(w.data(), N, K, hn, GptqOptions()).ok());
  HessianAccumulator empty(K);
  EXPECT_FALSE(GptqQuantize(w.data(), N, K, empty, GptqOptions()).ok());
  EXPECT_FALSE(GptqQuantize(w.data(), N, K + 8, h, GptqOptions()).ok());  // size mismatch
}

void TimeGptq(int64_t K, int64_t N, int64_t T) {
  const std::vector<float> x = CorrelatedInputs(T, K, 16);
  const std::vector<float> w = RandomWeights(N, K, 17);
  auto t0 = std::chrono::steady_clock::now();
  HessianAccumulator h(K);
  h.Add(x.data(), T);
  const double t_h = Seconds(t0);
  t0 = std::chrono::steady_clock::now();
  GptqOptions o;
  o.desc_act = true;
  auto r = GptqQuantize(w.data(), N, K, h, o);
  const double t_q = Seconds(t0);
  ASSERT_TRUE(r.ok()) << r.status();
  std::printf(
      "[timing] K=%lld N=%lld: HessianAccumulator::Add(%lld rows) %.2f s, "
      "GptqQuantize (desc_act) %.2f s\n",
      static_cast<long long>(K), static_cast<long long>(N), static_cast<long long>(T), t_h, t_q);
}

TEST(GptqTimingTest, Small) { TimeGptq(1024, 384, 4096); }
TEST(GptqTimingTest, DISABLED_TinyLlamaDownProj) { TimeGptq(5632, 2048, 8192); }

}  // namespace
}  // namespace qshard
