// AWQ scale and clip search (quant/awq.h), checked by direct recomputation of the output
// errors from the calibration inputs in double.
#include "quant/awq.h"

#include <chrono>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "quant/quantize_weights.h"
#include "tests/quant/quant_test_util.h"

namespace qshard {
namespace {

// x [T, K]: N(0, 1) inputs where a few channels are 30x larger (the activation outliers AWQ
// protects), plus a common offset so that the channels are correlated.
std::vector<float> OutlierInputs(int64_t T, int64_t K, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(T * K));
  for (int64_t t = 0; t < T; ++t) {
    const float common = nd(rng);
    for (int64_t k = 0; k < K; ++k) {
      const float mag = (k % 37 == 3) ? 30.0f : 1.0f;
      x[t * K + k] = mag * (nd(rng) + 0.5f * common);
    }
  }
  return x;
}

using ::qshard::testing::RandomWeights;

// mean over T x N outputs of (x W^T - (x / s) Q(W diag(s))^T)^2, computed directly.
double DirectLoss(const std::vector<float>& x, int64_t T, int64_t K, const std::vector<float>& w,
                  int64_t N, const std::vector<float>& s, const AwqOptions& o) {
  std::vector<float> ws(w.size());
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) ws[n * K + k] = w[n * K + k] * s[k];
  }
  const IntQuantMatrix q = QuantizeRtn(ws.data(), N, K, {o.bits, o.group_size, !o.zero_point});
  double e = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      double ref = 0, got = 0;
      for (int64_t k = 0; k < K; ++k) {
        ref += static_cast<double>(x[t * K + k]) * w[n * K + k];
        got += static_cast<double>(x[t * K + k]) / s[k] * q.Dequant(n, k);
      }
      e += (ref - got) * (ref - got);
    }
  }
  return e / static_cast<double>(T * N);
}

TEST(AwqTest, ScalesReduceErrorAndLossIsExact) {
  const int64_t K = 256, T = 512;
  const std::vector<float> x = OutlierInputs(T, K, 1);
  const std::vector<float> wa = RandomWeights(48, K, 2), wb = RandomWeights(16, K, 3);
  std::vector<float> w(wa);
  w.insert(w.end(), wb.begin(), wb.end());
  // K < T (second-moment path) and K > T (direct path).
  for (int64_t t : {T, int64_t{128}}) {
    for (bool duo : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "T " << t << " duo " << duo);
      AwqOptions o;
      o.duo_scaling = duo;
      const AwqScaleResult r = AwqSearchScales({wa.data(), wb.data()}, {48, 16}, K, x.data(), t, o);
      ASSERT_EQ(static_cast<int64_t>(r.scales.size()), K);
      EXPECT_GT(r.ratio, 0.0);
      EXPECT_LT(r.loss, 0.9 * r.loss_unscaled) << r.loss << " vs " << r.loss_unscaled;
      // The reported losses equal a direct recomputation (fp32 second moment: 1e-3).
      const std::vector<float> ones(K, 1.0f);
      EXPECT_NEAR(r.loss, DirectLoss(x, t, K, w, 64, r.scales, o), 1e-3 * r.loss);
      EXPECT_NEAR(r.loss_unscaled, DirectLoss(x, t, K, w, 64, ones, o), 1e-3 * r.loss_unscaled);
      // The outlier channels get the largest scales.
      float out_min = INFINITY, in_max = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (k % 37 == 3)
          out_min = std::min(out_min, r.scales[k]);
        else
          in_max = std::max(in_max, r.scales[k]);
      }
      EXPECT_GT(out_min, in_max);
    }
  }
}

TEST(AwqTest, RatioZeroGivesOnes) {
  // Uniform inputs: every ratio gives s = 1 after normalization, so ratio 0 (first) wins.
  const int64_t K = 128, T = 64;
  std::vector<float> x(T * K, 1.0f);
  const std::vector<float> w = RandomWeights(16, K, 4);
  const AwqScaleResult r = AwqSearchScales({w.data()}, {16}, K, x.data(), T, AwqOptions());
  EXPECT_EQ(r.ratio, 0.0);
  for (float s : r.scales) EXPECT_EQ(s, 1.0f);
  EXPECT_EQ(r.loss, r.loss_unscaled);
}

// Per (row, group) output error of the group alone, on the sampled tokens, as the clip
// search defines it.
double GroupObjective(const std::vector<float>& x, int64_t T, int64_t K,
                      const std::vector<float>& w, int64_t N, const float* clip,
                      const AwqOptions& o) {
  const IntQuantMatrix q = QuantizeRtn(w.data(), N, K, {o.bits, o.group_size, !o.zero_point}, clip);
  const int64_t gs = o.group_size, nt = std::min(T, o.clip_tokens);
  double e = 0;
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = i * T / nt;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k0 = 0; k0 < K; k0 += gs) {
        double d = 0;
        for (int64_t k = k0; k < k0 + gs; ++k) {
          d += static_cast<double>(x[t * K + k]) * (q.Dequant(n, k) - w[n * K + k]);
        }
        e += d * d;
      }
    }
  }
  return e / nt;
}

TEST(AwqTest, ClipNeverIncreasesTheGroupError) {
  const int64_t K = 256, N = 32, T = 1024;
  const std::vector<float> x = OutlierInputs(T, K, 5);
  std::vector<float> w = RandomWeights(N, K, 6);
  for (int64_t n = 0; n < N; ++n) w[n * K + (n * 13) % K] *= 8.0f;  // weight outliers
  AwqOptions o;
  o.group_size = 64;
  const std::vector<float> clip = AwqSearchClip(w.data(), N, K, x.data(), T, o);
  ASSERT_EQ(clip.size(), static_cast<size_t>(N * K / 64));
  int64_t clipped = 0;
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < K / 64; ++g) {
      float amax = 0;
      for (int64_t k = g * 64; k < (g + 1) * 64; ++k)
        amax = std::max(amax, std::fabs(w[n * K + k]));
      EXPECT_LE(clip[n * (K / 64) + g], amax);
      EXPECT_GE(clip[n * (K / 64) + g], amax * 0.5f);
      clipped += clip[n * (K / 64) + g] < amax;
    }
  }
  EXPECT_GT(clipped, 0);
  // The searched objective (sum of per-group errors over the sampled tokens) can only go
  // down: no clipping is one of the candidates. Tolerance: fp32 second moments, 1e-4.
  const double with = GroupObjective(x, T, K, w, N, clip.data(), o);
  const double without = GroupObjective(x, T, K, w, N, nullptr, o);
  EXPECT_LE(with, without * (1 + 1e-4)) << with << " vs " << without;
  std::printf("[awq] clip: %lld of %lld groups clipped, group error %.4g -> %.4g\n",
              static_cast<long long>(clipped), static_cast<long long>(N * K / 64), without, with);
}

TEST(AwqTimingTest, Small) {
  // The 12M model's largest search: gate+up (2 x 1024 rows) over K = 384, and down_proj's
  // clip over K = 1024.
  const int64_t T = 4096;
  const std::vector<float> x = OutlierInputs(T, 384, 7), x2 = OutlierInputs(T, 1024, 8);
  const std::vector<float> g = RandomWeights(1024, 384, 9), u = RandomWeights(1024, 384, 10);
  const std::vector<float> d = RandomWeights(384, 1024, 11);
  auto t0 = std::chrono::steady_clock::now();
  const AwqScaleResult r =
      AwqSearchScales({g.data(), u.data()}, {1024, 1024}, 384, x.data(), T, AwqOptions());
  const double t_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t0 = std::chrono::steady_clock::now();
  const std::vector<float> clip = AwqSearchClip(d.data(), 384, 1024, x2.data(), T, AwqOptions());
  const double t_c = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "[timing] AwqSearchScales K=384 N=2048 T=%lld: %.2f s (ratio %.2f); "
      "AwqSearchClip K=1024 N=384: %.2f s\n",
      static_cast<long long>(T), t_s, r.ratio, t_c);
}

// TinyLlama's down_proj (K = 5632, N = 2048): run with --gtest_also_run_disabled_tests.
TEST(AwqTimingTest, DISABLED_TinyLlamaDownProj) {
  const int64_t T = 4096, K = 5632, N = 2048;
  const std::vector<float> x = OutlierInputs(T, K, 12);
  const std::vector<float> w = RandomWeights(N, K, 13);
  auto t0 = std::chrono::steady_clock::now();
  const AwqScaleResult r = AwqSearchScales({w.data()}, {N}, K, x.data(), T, AwqOptions());
  const double t_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t0 = std::chrono::steady_clock::now();
  const std::vector<float> clip = AwqSearchClip(w.data(), N, K, x.data(), T, AwqOptions());
  const double t_c = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf(
      "[timing] AwqSearchScales K=%lld N=%lld T=%lld: %.2f s (ratio %.2f); "
      "AwqSearchClip: %.2f s\n",
      static_cast<long long>(K), static_cast<long long>(N), static_cast<long long>(T), t_s, r.ratio,
      t_c);
}

}  // namespace
}  // namespace qshard
