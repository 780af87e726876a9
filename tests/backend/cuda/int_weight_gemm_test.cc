// IntWeightGemm (runtime/backend/cuda/int_weight_gemm.h): the host repack (no GPU needed)
// and the GPU kernel against a float64 CPU reference.
//
// Method (as cuda_ops_test.cc): fresh random inputs per case (fixed seeds, never zeros),
// every GPU output poisoned with 0xFF bytes (NaN) before the run, NaN/inf never passes.
// Inputs: codes uniform in [0, 2^bits), scales ~U(0.001, 0.02), zeros random integers in
// the code range, a fixed 2^(bits-1) (symmetric GPTQ), or non-integer floats; x bf16 with
// a per-row magnitude spread over e^-2..e^2. The reference is
//   ref[m, n] = sum_k double(x[m, k]) * double(W[n, k]),  W from IntQuantMatrix::Dequant
// (the same fp32 dequantization the kernel uses before its bf16 rounding).
//
// Tolerances (why): the kernel rounds each dequantized weight to bf16 once (relative
// error <= 2^-9, random sign), multiplies exactly in fp32 and accumulates in fp32 (error
// ~K * 2^-24, negligible). The weight rounding gives an output error of RMS about
// 2^-9/sqrt(3) ~ 1.1e-3 of the output's RMS (1.4e-3..2.5e-3 measured on an H100), so
// normwise ||gpu - ref|| / ||ref|| <= 1e-2 has a 4x margin while dropping a single k16
// step of K = 1024 (sqrt(16/1024) = 0.125) or using a wrong group's scales fails it by far.
// Elementwise |gpu - ref| <= 3e-2 * RMS(ref row): the largest measured is 1.6e-2 with
// fp32 output over ~4.6M elements (the per-element error is not Gaussian: it scales with
// the row's |x| |w| products); a wrong column, row or code moves an element by O(1) of
// the row RMS. bf16 output adds one rounding (<= 2^-8 |ref|): + 4e-3 |ref| elementwise.
#include "runtime/backend/cuda/int_weight_gemm.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "quant/int_quant_matrix.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "tests/backend/cuda/cuda_test_util.h"

namespace qshard::cuda {
namespace {

enum class ZeroKind { kRandomInt, kSymmetric, kFloat };

// group_size -1: one group over all of K. act_order: g_idx is a random shuffle of the
// ordinary k / group_size assignment (what GPTQ desc_act checkpoints hold).
IntQuantMatrix MakeMatrix(int64_t n, int64_t k, int bits, int64_t group_size, bool act_order,
                          ZeroKind zk, uint32_t seed) {
  std::mt19937 rng(seed);
  IntQuantMatrix m;
  m.in_features = k;
  m.out_features = n;
  m.bits = bits;
  const int64_t gs = group_size < 0 ? k : group_size;
  m.num_groups = (k + gs - 1) / gs;
  const int qmax = (1 << bits) - 1;
  std::uniform_int_distribution<int> code(0, qmax);
  m.codes.resize(static_cast<size_t>(n * k));
  for (uint8_t& c : m.codes) c = static_cast<uint8_t>(code(rng));
  std::uniform_real_distribution<float> scale(0.001f, 0.02f);
  std::uniform_real_distribution<float> zf(0.0f, static_cast<float>(qmax));
  m.scales.resize(static_cast<size_t>(m.num_groups * n));
  m.zeros.resize(static_cast<size_t>(m.num_groups * n));
  for (float& s : m.scales) s = scale(rng);
  for (float& z : m.zeros) {
    switch (zk) {
      case ZeroKind::kRandomInt:
        z = static_cast<float>(code(rng));
        break;
      case ZeroKind::kSymmetric:
        z = static_cast<float>(1 << (bits - 1));
        break;
      case ZeroKind::kFloat:
        z = zf(rng);
        break;
    }
  }
  m.g_idx.resize(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) m.g_idx[i] = static_cast<int32_t>(i / gs);
  if (act_order) std::shuffle(m.g_idx.begin(), m.g_idx.end(), rng);
  return m;
}

// ---------------------------------------------------------------------------
// Host-only: the repack (runs in CI without a GPU)
// ---------------------------------------------------------------------------

struct PackCase {
  int64_t n, k;
  int bits;
  int64_t group_size;
  bool act_order;
};

TEST(IntWeightPackTest, RepackRoundTripsCodesScalesAndGroups) {
  const PackCase cases[] = {
      {256, 512, 4, 128, false}, {200, 256, 4, 32, true}, {384, 1024, 8, 64, false},
      {130, 192, 8, -1, false},  {128, 256, 4, 64, true}, {1000, 128, 8, 32, true},
  };
  uint32_t seed = 11;
  for (const PackCase& c : cases) {
    SCOPED_TRACE(absl::StrCat("N x K = ", c.n, " x ", c.k, ", bits ", c.bits, ", group ",
                              c.group_size, c.act_order ? ", act-order" : ""));
    const IntQuantMatrix m =
        MakeMatrix(c.n, c.k, c.bits, c.group_size, c.act_order, ZeroKind::kRandomInt, seed++);
    absl::StatusOr<PackedIntWeights> packed_or = PackIntWeights(m);
    ASSERT_TRUE(packed_or.ok()) << packed_or.status();
    const PackedIntWeights& p = *packed_or;
    ASSERT_EQ(p.n_padded % kIntGemmTileN, 0);
    ASSERT_GE(p.n_padded, c.n);
    ASSERT_EQ(p.codes.size(), static_cast<size_t>(p.n_padded * c.k * c.bits / 32));
    EXPECT_EQ(p.act_order, c.act_order);
    EXPECT_EQ(p.group_size, c.group_size);

    // perm is a permutation that sorts g_idx.
    ASSERT_EQ(p.perm.size(), static_cast<size_t>(c.k));
    std::vector<int> seen(static_cast<size_t>(c.k), 0);
    for (int64_t i = 0; i < c.k; ++i) {
      ASSERT_GE(p.perm[i], 0);
      ASSERT_LT(p.perm[i], c.k);
      ++seen[p.perm[i]];
      if (i > 0) {
        ASSERT_LE(m.g_idx[p.perm[i - 1]], m.g_idx[p.perm[i]]) << "at sorted " << i;
      }
    }
    for (int64_t i = 0; i < c.k; ++i) ASSERT_EQ(seen[i], 1) << "input " << i;

    // Every code comes back from its packed location; padded columns hold 0.
    for (int64_t n = 0; n < p.n_padded; ++n) {
      for (int64_t q = 0; q < c.k; ++q) {
        const uint32_t want = n < c.n ? m.codes[n * c.k + p.perm[q]] : 0u;
        ASSERT_EQ(PackedCodeAt(p, n, q), want)
            << "column " << n << ", sorted input " << q << " (input " << p.perm[q] << ")";
      }
    }
    // The packing is a bijection: every (n, p) maps to a distinct (word, shift).
    {
      std::vector<uint8_t> used(p.codes.size() * 32 / c.bits, 0);
      for (int64_t n = 0; n < p.n_padded; ++n) {
        for (int64_t q = 0; q < c.k; ++q) {
          const PackedCodeIndex idx = PackedCodeLocation(n, q, c.k, c.bits);
          ASSERT_GE(idx.word, 0);
          ASSERT_LT(idx.word, static_cast<int64_t>(p.codes.size()));
          ASSERT_EQ(idx.shift % c.bits, 0);
          const size_t slot = static_cast<size_t>(idx.word * (32 / c.bits) + idx.shift / c.bits);
          ASSERT_EQ(used[slot], 0) << "column " << n << ", sorted input " << q << " collides";
          used[slot] = 1;
        }
      }
    }
    // kblock_info: the group of each 16-run, and the slot is the first step of the K tile
    // with that group.
    ASSERT_EQ(p.kblock_info.size(), static_cast<size_t>(c.k / 16));
    for (int64_t b = 0; b < c.k / 16; ++b) {
      const int32_t grp = p.kblock_info[b] >> 2;
      const int slot = p.kblock_info[b] & 3;
      for (int i = 0; i < 16; ++i) ASSERT_EQ(m.g_idx[p.perm[b * 16 + i]], grp) << "block " << b;
      const int64_t first = b / 4 * 4 + slot;
      ASSERT_LE(first, b);
      ASSERT_EQ(p.kblock_info[first] >> 2, grp) << "block " << b;
      if (first > b / 4 * 4) {
        ASSERT_NE(p.kblock_info[first - 1] >> 2, grp) << "block " << b;
      }
      ASSERT_EQ(p.kblock_info[first] & 3, slot) << "block " << b;
    }
    // MakeMatrix's zeros here are random integers: the factored-scale path may take the
    // 4-bit ones.
    EXPECT_EQ(p.integer_zero_points, c.bits == 4);
    // scale_zero (encodings in int_weight_gemm.h); all-zero words on padded columns.
    for (int64_t g = 0; g < m.num_groups; ++g) {
      for (int64_t n = 0; n < p.n_padded; ++n) {
        const uint32_t w0 = p.scale_zero[(g * p.n_padded + n) * 2];
        const uint32_t w1 = p.scale_zero[(g * p.n_padded + n) * 2 + 1];
        if (n >= c.n) {
          ASSERT_EQ(w0, 0u) << "padded column " << n;
          ASSERT_EQ(w1, 0u) << "padded column " << n;
          continue;
        }
        const float s = m.scales[g * c.n + n];
        const float z = m.zeros[g * c.n + n];
        if (c.bits == 8) {
          float fs, fz;
          std::memcpy(&fs, &w0, 4);
          std::memcpy(&fz, &w1, 4);
          ASSERT_EQ(fs, s) << "group " << g << ", column " << n;
          ASSERT_EQ(fz, -s * z) << "group " << g << ", column " << n;
        } else {
          const float s_hi = Bf16ToF32(static_cast<uint16_t>(w0 & 0xFFFF));
          const float s_lo = Bf16ToF32(static_cast<uint16_t>(w0 >> 16));
          const float cterm = Bf16ToF32(static_cast<uint16_t>(w1 & 0xFFFF));
          const float zmagic = Bf16ToF32(static_cast<uint16_t>(w1 >> 16));
          const float z_int = std::clamp(std::nearbyint(z), 0.0f, 15.0f);
          ASSERT_NEAR(s_hi + s_lo, s, s * 1e-5) << "group " << g << ", column " << n;
          ASSERT_EQ(zmagic, 128.0f + z_int) << "group " << g << ", column " << n;
          ASSERT_NEAR(cterm, -s * (z - z_int), s * 1e-2 + 1e-12)
              << "group " << g << ", column " << n;
          // Together they reproduce the weight of every code to fp32-ish accuracy.
          for (int q = 0; q < 16; ++q) {
            const double want = static_cast<double>(s) * (q - static_cast<double>(z));
            const double got = (static_cast<double>(s_hi) + s_lo) * (128.0 + q - zmagic) + cterm;
            ASSERT_NEAR(got, want, 1.6e-4 * s + 4e-3 * std::fabs(s * (z - z_int)))
                << "group " << g << ", column " << n << ", code " << q;
          }
        }
      }
    }
  }
}

// integer_zero_points decides whether the factored-scale path may run: any fractional zero
// point (AWQ-style float zeros) must turn it off, for one column of one group too.
TEST(IntWeightPackTest, IntegerZeroPointsFlag) {
  auto packed = [](const IntQuantMatrix& m) {
    absl::StatusOr<PackedIntWeights> p = PackIntWeights(m);
    EXPECT_TRUE(p.ok()) << p.status();
    return p.ok() && p->integer_zero_points;
  };
  EXPECT_TRUE(packed(MakeMatrix(256, 256, 4, 64, false, ZeroKind::kRandomInt, 1)));
  EXPECT_TRUE(packed(MakeMatrix(256, 256, 4, 64, true, ZeroKind::kSymmetric, 2)));
  EXPECT_FALSE(packed(MakeMatrix(256, 256, 4, 64, false, ZeroKind::kFloat, 3)));
  EXPECT_FALSE(packed(MakeMatrix(256, 256, 8, 64, false, ZeroKind::kRandomInt, 4)));
  IntQuantMatrix one = MakeMatrix(256, 256, 4, 64, false, ZeroKind::kRandomInt, 5);
  one.zeros[3 * 256 + 77] = 6.25f;  // group 3, column 77
  EXPECT_FALSE(packed(one));
  // Out-of-range integer zeros are clamped to 0..15 with the rest as the c term.
  IntQuantMatrix clamped = MakeMatrix(256, 256, 4, 64, false, ZeroKind::kRandomInt, 6);
  clamped.zeros[5] = 17.0f;
  EXPECT_FALSE(packed(clamped));
}

// The GEMV's K split: every split's range within the staged limits (tiles, groups), the
// splits covering K, and as many blocks as the target asks for when those limits allow.
TEST(IntWeightPackTest, Gemv4SplitPlanKeepsStagingLimits) {
  struct PlanCase {
    int64_t k, group_size, n_tiles;
    bool act_order;
    int sms, bps;
  };
  const PlanCase cases[] = {
      {4096, 128, 48, false, 132, 8},  {4096, 128, 224, false, 132, 3},
      {14336, 128, 32, false, 132, 8}, {14336, 128, 32, false, 132, 1},
      {4096, 16, 8, false, 132, 8},    {4096, 16, 1, true, 132, 1},
      {4096, 32, 2, true, 108, 4},     {4096, -1, 64, false, 132, 12},
      {768, 48, 2, false, 132, 8},     {128, 64, 1000, false, 132, 8},
  };
  for (const PlanCase& c : cases) {
    SCOPED_TRACE(absl::StrCat("K=", c.k, " g", c.group_size, " N tiles ", c.n_tiles,
                              c.act_order ? " act-order" : "", " target ", c.bps, "/SM x ", c.sms));
    const IntQuantMatrix m = MakeMatrix(128, c.k, 4, c.group_size, c.act_order,
                                        ZeroKind::kRandomInt, static_cast<uint32_t>(c.k));
    auto p = PackIntWeights(m);
    ASSERT_TRUE(p.ok()) << p.status();
    std::vector<int32_t> groups(p->kblock_info.size());
    for (size_t i = 0; i < groups.size(); ++i) groups[i] = p->kblock_info[i] >> 2;
    const int64_t per = PlanIntGemv4TilesPerSplit(groups, c.n_tiles, c.sms, c.bps);
    const int64_t k_tiles = c.k / 64;
    ASSERT_GE(per, 1);
    ASSERT_LE(per, kIntGemv4MaxTiles);
    ASSERT_LE(per, k_tiles);
    const int64_t splits = (k_tiles + per - 1) / per;
    for (int64_t sp = 0; sp < splits; ++sp) {
      std::set<int32_t> distinct;
      for (int64_t st = sp * per * 4; st < std::min(k_tiles, (sp + 1) * per) * 4; ++st) {
        distinct.insert(groups[st]);
      }
      EXPECT_LE(distinct.size(), static_cast<size_t>(kIntGemv4GroupRows)) << "split " << sp;
    }
    // Not split finer than the block target needs, unless a staging limit forces it.
    const int64_t want = (static_cast<int64_t>(c.bps) * c.sms + c.n_tiles - 1) / c.n_tiles;
    if (splits > std::max<int64_t>(want, (k_tiles + 15) / 16)) {
      // Only the group limit may have halved the split: the next larger one breaks it.
      const int64_t bigger = std::min<int64_t>(per * 2, kIntGemv4MaxTiles);
      int64_t worst = 0;
      for (int64_t first = 0; first < k_tiles; first += bigger) {
        std::set<int32_t> distinct;
        for (int64_t st = first * 4; st < std::min(k_tiles, first + bigger) * 4; ++st) {
          distinct.insert(groups[st]);
        }
        worst = std::max<int64_t>(worst, static_cast<int64_t>(distinct.size()));
      }
      EXPECT_GT(worst, kIntGemv4GroupRows) << "split into " << splits << " without need";
    }
  }
}

TEST(IntWeightPackTest, RejectsUnsupportedShapesWithClearMessages) {
  {
    IntQuantMatrix m = MakeMatrix(256, 100, 4, -1, false, ZeroKind::kSymmetric, 1);
    const absl::Status st = PackIntWeights(m).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("K) = 100"), std::string::npos) << st;
    EXPECT_NE(st.message().find("multiple of 64"), std::string::npos) << st;
  }
  {
    IntQuantMatrix m = MakeMatrix(256, 256, 4, 128, false, ZeroKind::kSymmetric, 2);
    m.bits = 3;
    const absl::Status st = PackIntWeights(m).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("bits must be 4 or 8, got 3"), std::string::npos) << st;
  }
  {
    // Group size 8: a 16-run would span two groups.
    IntQuantMatrix m = MakeMatrix(256, 256, 4, 8, false, ZeroKind::kSymmetric, 3);
    const absl::Status st = PackIntWeights(m).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("multiple of 16 inputs"), std::string::npos) << st;
  }
  {
    IntQuantMatrix m = MakeMatrix(256, 256, 4, 128, false, ZeroKind::kSymmetric, 4);
    m.g_idx[5] = 7;  // only 2 groups
    const absl::Status st = PackIntWeights(m).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("g_idx[5] = 7"), std::string::npos) << st;
  }
  {
    IntQuantMatrix m = MakeMatrix(256, 256, 4, 128, false, ZeroKind::kSymmetric, 5);
    m.codes[17] = 16;  // does not fit in 4 bits
    const absl::Status st = PackIntWeights(m).status();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("does not fit in 4 bits"), std::string::npos) << st;
  }
}

// ---------------------------------------------------------------------------
// GPU
// ---------------------------------------------------------------------------

class IntWeightGemmTest : public ::qshard::cuda::testing::CudaStreamTest {};

// x [m, k] bf16 values (as float) with per-row magnitudes over e^-2..e^2.
std::vector<float> RandomX(int64_t m, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_real_distribution<float> log_scale(-2.0f, 2.0f);
  std::vector<float> v(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r) {
    const float s = std::exp(log_scale(rng));
    for (int64_t c = 0; c < k; ++c) {
      float x = unit(rng) * s;
      if (x == 0.0f) x = 0.5f * s;
      v[r * k + c] = Bf16ToF32(F32ToBf16(x));
    }
  }
  return v;
}

struct GemmCase {
  int64_t m, n, k;
  int bits;
  int64_t group_size;
  bool act_order;
  ZeroKind zeros;
  DType y_dtype;
};

std::string CaseName(const GemmCase& c) {
  const char* z = c.zeros == ZeroKind::kRandomInt   ? "int"
                  : c.zeros == ZeroKind::kSymmetric ? "sym"
                                                    : "float";
  return absl::StrCat("M=", c.m, " N=", c.n, " K=", c.k, " w", c.bits, " g", c.group_size,
                      c.act_order ? " act-order" : "", " zeros=", z,
                      " y=", std::string(DTypeName(c.y_dtype)));
}

// normwise_bound: ||gpu - ref|| / ||ref|| (1e-2 for the bf16-rounded weights, see the top).
void RunCase(const GemmCase& c, uint32_t seed, cudaStream_t stream, int repeats = 2,
             double normwise_bound = 1e-2) {
  SCOPED_TRACE(CaseName(c));
  const IntQuantMatrix w = MakeMatrix(c.n, c.k, c.bits, c.group_size, c.act_order, c.zeros, seed);
  const std::vector<float> x = RandomX(c.m, c.k, seed + 1000);

  absl::StatusOr<std::unique_ptr<IntWeightGemm>> gemm_or = IntWeightGemm::Create(w, stream);
  ASSERT_TRUE(gemm_or.ok()) << gemm_or.status();
  IntWeightGemm& gemm = **gemm_or;
  EXPECT_EQ(gemm.in_features(), c.k);
  EXPECT_EQ(gemm.out_features(), c.n);
  EXPECT_GT(gemm.weight_bytes(), c.n * c.k * c.bits / 8);

  // Reference in float64 from the fp32-dequantized weights.
  std::vector<double> wd(static_cast<size_t>(c.n * c.k));
  for (int64_t n = 0; n < c.n; ++n) {
    for (int64_t k = 0; k < c.k; ++k) wd[n * c.k + k] = w.Dequant(n, k);
  }
  std::vector<double> ref(static_cast<size_t>(c.m * c.n));
  for (int64_t r = 0; r < c.m; ++r) {
    const float* xr = x.data() + r * c.k;
    for (int64_t n = 0; n < c.n; ++n) {
      const double* wr = wd.data() + n * c.k;
      double s = 0.0;
      for (int64_t k = 0; k < c.k; ++k) s += static_cast<double>(xr[k]) * wr[k];
      ref[r * c.n + n] = s;
    }
  }

  std::vector<uint16_t> xb(x.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = F32ToBf16(x[i]);
  auto xbuf = DeviceBuffer::Allocate(xb.size() * 2);
  ASSERT_TRUE(xbuf.ok()) << xbuf.status();
  QSHARD_ASSERT_OK(xbuf->CopyFromHost(xb.data(), xb.size() * 2, stream));
  const size_t ybytes = static_cast<size_t>(c.m * c.n) * DTypeSize(c.y_dtype);
  auto ybuf = DeviceBuffer::Allocate(ybytes);
  ASSERT_TRUE(ybuf.ok()) << ybuf.status();

  // Run twice (the second run reuses the scratch buffers grown by the first); the runs
  // must be bitwise equal (split-K partials are summed in a fixed order).
  std::vector<float> first;
  for (int rep = 0; rep < repeats; ++rep) {
    SCOPED_TRACE(absl::StrCat("run ", rep));
    QSHARD_ASSERT_OK(ybuf->Fill(0xFF, stream));
    QSHARD_ASSERT_OK(gemm.Run(xbuf->get(), c.m, ybuf->get(), c.y_dtype, stream));
    // CopyToHost synchronizes the stream, so a fault inside the kernel shows here.
    std::vector<float> y(static_cast<size_t>(c.m * c.n));
    if (c.y_dtype == DType::kF32) {
      QSHARD_ASSERT_OK(ybuf->CopyToHost(y.data(), ybytes, stream));
    } else {
      std::vector<uint16_t> yb(y.size());
      QSHARD_ASSERT_OK(ybuf->CopyToHost(yb.data(), ybytes, stream));
      for (size_t i = 0; i < y.size(); ++i) y[i] = Bf16ToF32(yb[i]);
    }

    if (rep == 0) {
      first = y;
    } else {
      EXPECT_EQ(std::memcmp(first.data(), y.data(), y.size() * sizeof(float)), 0)
          << "a second run of the same product differs from the first";
    }
    double err2 = 0.0, ref2 = 0.0;
    int64_t bad = 0;
    double worst = 0.0;
    int64_t worst_r = -1, worst_n = -1;
    const double bf16_rel = c.y_dtype == DType::kBF16 ? 4e-3 : 0.0;
    for (int64_t r = 0; r < c.m; ++r) {
      double row2 = 0.0;
      for (int64_t n = 0; n < c.n; ++n) row2 += ref[r * c.n + n] * ref[r * c.n + n];
      const double row_rms = std::sqrt(row2 / static_cast<double>(c.n));
      for (int64_t n = 0; n < c.n; ++n) {
        const double g = y[r * c.n + n];
        const double e = ref[r * c.n + n];
        if (!std::isfinite(g)) {
          if (bad++ < 5) ADD_FAILURE() << "non-finite output at row " << r << ", col " << n;
          continue;
        }
        const double d = std::fabs(g - e);
        err2 += d * d;
        ref2 += e * e;
        const double bound = 3e-2 * row_rms + bf16_rel * std::fabs(e);
        if (d > bound) {
          if (bad++ < 5) {
            ADD_FAILURE() << "row " << r << ", col " << n << ": gpu " << g << " ref " << e
                          << " |diff| " << d << " > bound " << bound << " (row RMS " << row_rms
                          << ")";
          }
        }
        if (d / std::max(row_rms, 1e-30) > worst) {
          worst = d / std::max(row_rms, 1e-30);
          worst_r = r;
          worst_n = n;
        }
      }
    }
    const double normwise = std::sqrt(err2 / std::max(ref2, 1e-300));
    EXPECT_EQ(bad, 0) << bad << " elements out of bound";
    EXPECT_LE(normwise, normwise_bound) << "normwise error";
    if (rep == 0) {
      std::printf("  %-64s %-30s normwise %.2e, max |diff|/rowRMS %.2e at (%lld, %lld)\n",
                  CaseName(c).c_str(), gemm.kernel_name().c_str(), normwise, worst,
                  static_cast<long long>(worst_r), static_cast<long long>(worst_n));
    }
  }
}

TEST_F(IntWeightGemmTest, MatchesReferenceAcrossShapesGroupsAndBits) {
  std::vector<GemmCase> cases;
  const int64_t ms[] = {1, 3, 16, 17, 64, 200};
  for (int64_t m : ms) {
    cases.push_back({m, 256, 512, 4, 128, false, ZeroKind::kRandomInt, DType::kF32});
    cases.push_back({m, 384, 1024, 8, 64, false, ZeroKind::kSymmetric, DType::kBF16});
  }
  // Group sizes, bits, act-order, zeros, output dtypes, N not a multiple of 128.
  cases.push_back({5, 256, 512, 4, -1, false, ZeroKind::kSymmetric, DType::kBF16});
  cases.push_back({5, 256, 512, 8, -1, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({7, 384, 256, 4, 32, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({7, 384, 256, 8, 32, false, ZeroKind::kFloat, DType::kBF16});
  cases.push_back({9, 256, 1024, 4, 64, false, ZeroKind::kFloat, DType::kF32});
  cases.push_back({33, 1000, 512, 4, 128, false, ZeroKind::kRandomInt, DType::kBF16});
  cases.push_back({1, 1000, 512, 8, 128, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({3, 999, 256, 4, 64, false, ZeroKind::kRandomInt, DType::kBF16});
  cases.push_back({100, 999, 256, 8, 64, true, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({1, 512, 1024, 4, 128, true, ZeroKind::kSymmetric, DType::kBF16});
  cases.push_back({16, 512, 1024, 4, 128, true, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({200, 256, 512, 4, 32, true, ZeroKind::kFloat, DType::kBF16});
  cases.push_back({17, 384, 512, 8, 64, true, ZeroKind::kRandomInt, DType::kBF16});
  cases.push_back({2, 256, 768, 4, 48, false, ZeroKind::kRandomInt, DType::kF32});  // gs 48
  cases.push_back({65, 256, 768, 8, 48, true, ZeroKind::kRandomInt, DType::kF32});
  // Enough output tiles that no K split is used (direct stores), small and large M tiles.
  cases.push_back({64, 8500, 256, 4, 128, false, ZeroKind::kRandomInt, DType::kBF16});
  cases.push_back({64, 8500, 256, 8, 64, true, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({1000, 4608, 256, 4, 64, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({1000, 4608, 256, 8, 128, true, ZeroKind::kSymmetric, DType::kBF16});
  // Prefill-sized.
  cases.push_back({2048, 512, 512, 4, 128, false, ZeroKind::kRandomInt, DType::kBF16});
  uint32_t seed = 100;
  for (const GemmCase& c : cases) {
    RunCase(c, seed, stream_.get());
    seed += 7;
    if (HasFatalFailure()) return;
  }
}

// Puts the process-wide factored-scale and GEMV switches back when a test ends.
struct FactoredScalesRestore {
  bool factored = IntGemmFactoredScalesEnabled();
  bool gemv = IntGemv4Enabled();
  ~FactoredScalesRestore() {
    SetIntGemmFactoredScales(factored);
    SetIntGemv4(gemv);
  }
};

// The factored-scale arithmetic (SetIntGemmFactoredScales: the GEMM at M <= 64;
// SetIntGemv4: the decode GEMV at M <= 16), for 4-bit weights with integer zero points. It
// keeps no bf16 weight rounding: x (bf16) times the exact t = code - zero is exact in fp32,
// accumulated in fp32 per group, times the group's scale (s_hi + s_lo, within 2^-17 of the
// fp32 scale). So with fp32 output its normwise error is bounded by 1e-4, ten times below
// what the bf16-weight path reaches (1.4e-3..2.5e-3): passing that bound shows the path
// ran; bf16 output keeps the general bound (its rounding dominates). Matrices or M the
// path may not take (float zeros, 8-bit, M above its limit) take the default kernel and
// meet the general bounds.
void CheckFactoredPath(bool gemv, cudaStream_t stream) {
  const int64_t max_m = gemv ? 16 : 64;
  std::vector<GemmCase> cases;
  for (int64_t m : {1, 2, 8, 16, 17, 64}) {
    cases.push_back({m, 256, 512, 4, 128, false, ZeroKind::kRandomInt, DType::kF32});
  }
  // Group boundaries inside a K tile (32, 16), across tiles (128, 48 with uneven steps), one
  // group over all of K, act-order (a new group at any step), N not a multiple of 128,
  // enough N that K is not split, symmetric zeros, bf16 output; group size 16 over a long K
  // (more groups than the GEMV stages per split: its plan must split K finer).
  cases.push_back({1, 384, 256, 4, 32, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({3, 256, 768, 4, 48, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({5, 256, 1024, 4, -1, false, ZeroKind::kSymmetric, DType::kF32});
  cases.push_back({1, 512, 1024, 4, 128, true, ZeroKind::kSymmetric, DType::kF32});
  cases.push_back({16, 512, 1024, 4, 32, true, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({3, 999, 256, 4, 64, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({64, 8500, 256, 4, 128, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({1, 4096, 4096, 4, 128, false, ZeroKind::kSymmetric, DType::kF32});
  cases.push_back({2, 256, 2048, 4, 16, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({1, 128, 4096, 4, 16, true, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({7, 1000, 512, 4, 128, false, ZeroKind::kRandomInt, DType::kBF16});
  const size_t eligible = cases.size();
  // Never eligible.
  cases.push_back({3, 256, 512, 4, 128, false, ZeroKind::kFloat, DType::kF32});
  cases.push_back({3, 384, 1024, 8, 64, false, ZeroKind::kRandomInt, DType::kF32});
  cases.push_back({65, 256, 512, 4, 128, false, ZeroKind::kRandomInt, DType::kF32});
  uint32_t seed = gemv ? 900 : 500;
  for (size_t i = 0; i < cases.size(); ++i) {
    const GemmCase& c = cases[i];
    const bool expected = i < eligible && c.m <= max_m;
    const IntQuantMatrix w = MakeMatrix(c.n, c.k, c.bits, c.group_size, c.act_order, c.zeros, seed);
    auto g = IntWeightGemm::Create(w, stream);
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_EQ(gemv ? (*g)->UsesGemv4(c.m) : (*g)->UsesFactoredScales(c.m), expected) << CaseName(c);
    RunCase(c, seed, stream, 2, expected && c.y_dtype == DType::kF32 ? 1e-4 : 1e-2);
    seed += 7;
    if (::testing::Test::HasFatalFailure()) return;
  }
  // Switched off, an eligible matrix takes the default kernel.
  if (gemv) {
    SetIntGemv4(false);
  } else {
    SetIntGemmFactoredScales(false);
  }
  const IntQuantMatrix w = MakeMatrix(256, 512, 4, 128, false, ZeroKind::kRandomInt, 1);
  auto g = IntWeightGemm::Create(w, stream);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_FALSE(gemv ? (*g)->UsesGemv4(1) : (*g)->UsesFactoredScales(1)) << "switched off";
}

TEST_F(IntWeightGemmTest, FactoredScalesMatchReference) {
  FactoredScalesRestore restore;
  SetIntGemv4(false);
  SetIntGemmFactoredScales(true);
  CheckFactoredPath(/*gemv=*/false, stream_.get());
}

TEST_F(IntWeightGemmTest, Gemv4MatchesReference) {
  FactoredScalesRestore restore;
  SetIntGemmFactoredScales(false);
  SetIntGemv4(true);
  // Other split targets give other K splits (and group-row plans); the same bound.
  const int saved = IntGemmBlocksPerSm();
  for (int bps : {1, 3, 12}) {
    SetIntGemmBlocksPerSm(bps);
    RunCase({1, 1024, 4096, 4, 64, false, ZeroKind::kRandomInt, DType::kF32}, 40 + bps,
            stream_.get(), 2, 1e-4);
    if (HasFatalFailure()) break;
  }
  SetIntGemmBlocksPerSm(saved);
  if (HasFatalFailure()) return;
  CheckFactoredPath(/*gemv=*/true, stream_.get());
}

TEST_F(IntWeightGemmTest, CreateRejectsBadShapes) {
  IntQuantMatrix m = MakeMatrix(256, 100, 4, -1, false, ZeroKind::kSymmetric, 1);
  auto g = IntWeightGemm::Create(m, stream_.get());
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(g.status().message().find("multiple of 64"), std::string::npos) << g.status();
}

TEST_F(IntWeightGemmTest, KernelName) {
  auto g1 = IntWeightGemm::Create(MakeMatrix(128, 256, 4, 128, false, ZeroKind::kSymmetric, 1),
                                  stream_.get());
  ASSERT_TRUE(g1.ok()) << g1.status();
  EXPECT_EQ((*g1)->kernel_name(), "cuda-marlin-w4-g128");
  auto g2 = IntWeightGemm::Create(MakeMatrix(128, 256, 8, 64, true, ZeroKind::kSymmetric, 1),
                                  stream_.get());
  ASSERT_TRUE(g2.ok()) << g2.status();
  EXPECT_EQ((*g2)->kernel_name(), "cuda-marlin-w8-g64-actorder");
}

// Timing on Llama-3.1-8B shapes; only with QSHARD_INT_GEMM_BENCH=1 (prints, never fails
// on speed).
TEST_F(IntWeightGemmTest, BenchLlama8BShapes) {
  if (std::getenv("QSHARD_INT_GEMM_BENCH") == nullptr) {
    GTEST_SKIP() << "set QSHARD_INT_GEMM_BENCH=1 to time Llama-3.1-8B shapes";
  }
  FactoredScalesRestore restore;
  struct Shape {
    int64_t n, k;
  };
  const Shape shapes[] = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {4096, 14336}};
  const int64_t ms[] = {1, 16, 2048};
  for (int bits : {4, 8}) {
    for (const Shape& s : shapes) {
      const IntQuantMatrix w = MakeMatrix(s.n, s.k, bits, 128, false, ZeroKind::kSymmetric, 5);
      auto g = IntWeightGemm::Create(w, stream_.get());
      ASSERT_TRUE(g.ok()) << g.status();
      auto xbuf = DeviceBuffer::Allocate(static_cast<size_t>(2048 * s.k * 2));
      auto ybuf = DeviceBuffer::Allocate(static_cast<size_t>(2048 * s.n * 4));
      ASSERT_TRUE(xbuf.ok() && ybuf.ok());
      QSHARD_ASSERT_OK(xbuf->Fill(0x3F, stream_.get()));  // bf16 0x3F3F ~ 0.75
      for (int64_t m : ms) {
        for (int path = 0; path < 3; ++path) {  // default, factored GEMM, GEMV
          SetIntGemmFactoredScales(path == 1);
          SetIntGemv4(path == 2);
          if (path == 1 && !(*g)->UsesFactoredScales(m)) continue;
          if (path == 2 && !(*g)->UsesGemv4(m)) continue;
          for (int i = 0; i < 3; ++i) {
            QSHARD_ASSERT_OK((*g)->Run(xbuf->get(), m, ybuf->get(), DType::kBF16, stream_.get()));
          }
          cudaEvent_t e0, e1;
          cudaEventCreate(&e0);
          cudaEventCreate(&e1);
          const int iters = m >= 2048 ? 10 : 50;
          cudaEventRecord(e0, stream_.get());
          for (int i = 0; i < iters; ++i) {
            QSHARD_ASSERT_OK((*g)->Run(xbuf->get(), m, ybuf->get(), DType::kBF16, stream_.get()));
          }
          cudaEventRecord(e1, stream_.get());
          QSHARD_ASSERT_OK(stream_.Synchronize());
          float ms_total = 0.0f;
          cudaEventElapsedTime(&ms_total, e0, e1);
          cudaEventDestroy(e0);
          cudaEventDestroy(e1);
          const double sec = ms_total / 1e3 / iters;
          const double bytes = static_cast<double>((*g)->weight_bytes());
          std::printf(
              "  w%d N=%-6lld K=%-6lld M=%-5lld %-9s %8.1f us  weights %.2f TB/s  %.1f "
              "TFLOP/s\n",
              bits, static_cast<long long>(s.n), static_cast<long long>(s.k),
              static_cast<long long>(m),
              path == 0   ? "default"
              : path == 1 ? "factored"
                          : "gemv",
              sec * 1e6, bytes / sec / 1e12, 2.0 * m * s.n * s.k / sec / 1e12);
        }
      }
    }
  }
}

}  // namespace
}  // namespace qshard::cuda
