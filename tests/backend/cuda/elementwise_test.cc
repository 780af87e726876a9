// GPU elementwise ops (runtime/backend/cuda/elementwise.h) against host references.
//
// Without a CUDA device every test skips with a message.
//
// Method: fresh random inputs (fixed seeds, never zeros), GPU outputs poisoned with 0xFF
// bytes (NaN) first, several sizes including odd ones (which also take the scalar, non-16-byte
// paths), f32 and bf16. Inputs the GPU reads as bf16 are given to the reference already
// rounded, so only the arithmetic differs. NaN never passes (!(err <= bound)).
//
// Tolerances:
//   - Add, GatherRows, Cast, AbsMax, SplitColumns: exact. Add is one fp32 addition then one
//     round-to-nearest-even on both sides; the others move or round values the same way.
//   - RoPE: the reference forms the angle as the same fp32 product, takes cos/sin in double
//     and rotates in double. The GPU's sincosf is accurate to ~1-2 ulp (full range reduction,
//     also for angles ~1e5 rad), then two fp32 products and a sum: |err| <= ~4 ulp of
//     (|x1| + |x2|), bound 1e-6 (|x1| + |x2|) (~8 ulp). bf16 output adds half an ulp of the
//     result: 2^-8 |ref|.
//   - SiluMul: fp32 expf and division (each within 2 ulp) vs double: rel 2e-6 of
//     |gate * up| (the factor silu/gate is in (0, 1.3)); bf16 output adds 2^-8 |ref|.
//     SiluMulPacked: the same bound, and bit for bit what SiluMul gives on the two halves
//     (the same fp32 expression).
#include "runtime/backend/cuda/elementwise.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/dtype.h"
#include "runtime/base/half.h"
#include "runtime/base/status_macros.h"
#include "runtime/checkpoint/model_config.h"
#include "runtime/checkpoint/rope_frequencies.h"
#include "tests/backend/cuda/cuda_test_util.h"

namespace qshard::cuda {
namespace {

using ::qshard::cuda::testing::Name;

float RoundTo(DType t, float x) {
  if (t == DType::kBF16) return Bf16ToF32(F32ToBf16(x));
  if (t == DType::kF16) return F16ToF32(F32ToF16(x));
  return x;
}

// Uniform in +-[0.05, 2) (never zero), rounded to `dtype`.
std::vector<float> RandomValues(size_t n, DType dtype, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> mag(0.05f, 2.0f);
  std::bernoulli_distribution neg(0.5);
  std::vector<float> v(n);
  for (float& x : v) x = RoundTo(dtype, (neg(rng) ? -1.0f : 1.0f) * mag(rng) * scale);
  return v;
}

// Host <-> device in f32 / bf16 / f16.
std::vector<uint8_t> Encode(const std::vector<float>& v, DType t) {
  std::vector<uint8_t> bytes(v.size() * DTypeSize(t));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t == DType::kF32) {
      std::memcpy(bytes.data() + 4 * i, &v[i], 4);
    } else {
      const uint16_t h = t == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  return bytes;
}
std::vector<float> Decode(const std::vector<uint8_t>& bytes, DType t) {
  const size_t n = bytes.size() / DTypeSize(t);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (t == DType::kF32) {
      std::memcpy(&v[i], bytes.data() + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      v[i] = t == DType::kBF16 ? Bf16ToF32(h) : F16ToF32(h);
    }
  }
  return v;
}

absl::StatusOr<DeviceBuffer> Upload(const std::vector<float>& v, DType t, cudaStream_t stream) {
  const std::vector<uint8_t> bytes = Encode(v, t);
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(bytes.size(), 16)));
  if (!bytes.empty()) QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(bytes.data(), bytes.size(), stream));
  return buf;
}
absl::StatusOr<DeviceBuffer> UploadRaw(const void* p, size_t bytes, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(bytes, 16)));
  if (bytes > 0) QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(p, bytes, stream));
  return buf;
}
absl::StatusOr<DeviceBuffer> Poisoned(size_t n, DType t, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(std::max<size_t>(n * DTypeSize(t), 16)));
  QSHARD_RETURN_IF_ERROR(buf.Fill(0xFF, stream));
  return buf;
}
absl::StatusOr<std::vector<float>> Download(const DeviceBuffer& buf, DType t, size_t n,
                                            cudaStream_t stream) {
  std::vector<uint8_t> bytes(n * DTypeSize(t));
  if (n > 0) QSHARD_RETURN_IF_ERROR(buf.CopyToHost(bytes.data(), bytes.size(), stream));
  return Decode(bytes, t);
}

// Fails on a non-finite got, or |got - want| > bound[i] anywhere; reports the first few
// offenders with their index (and row/col for `cols` > 0) and the worst err/bound.
void ExpectWithin(const std::vector<float>& got, const std::vector<double>& want,
                  const std::vector<double>& bound, int64_t cols, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int64_t bad = 0;
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= bound[i])) {
      if (bad++ < 5) {
        ADD_FAILURE() << what << ": element " << i << " (row " << (cols > 0 ? int64_t(i) / cols : 0)
                      << ", col " << (cols > 0 ? int64_t(i) % cols : int64_t(i)) << ") got " << got[i]
                      << ", want " << want[i] << ", |diff| " << err << " > bound " << bound[i];
      }
      if (bound[i] > 0 && std::isfinite(err)) worst = std::max(worst, err / bound[i]);
    }
  }
  EXPECT_EQ(bad, 0) << what << ": elements outside the bound (worst finite err/bound " << worst << ")";
}

class CudaElementwiseTest : public ::qshard::cuda::testing::CudaStreamTest {};

TEST_F(CudaElementwiseTest, RopeMatchesHostFormula) {
  RopeConfig rope;
  rope.theta = 500000.0;
  rope.type = RopeType::kLlama3;
  rope.factor = 8.0;
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int64_t head_dim : {64, 128}) {
      for (int64_t T : {1, 7, 40}) {
        const int64_t qh = 6, kh = 2, half = head_dim / 2;
        const std::string what = absl::StrCat("rope ", Name(dt), " D=", head_dim, " T=", T);
        const std::vector<float> inv_freq = RopeInvFrequencies(rope, head_dim);
        ASSERT_EQ(static_cast<int64_t>(inv_freq.size()), half);
        std::vector<int32_t> pos(T);
        std::mt19937 rng(static_cast<uint32_t>(T * 31 + head_dim));
        std::uniform_int_distribution<int32_t> pd(0, 131071);
        for (int64_t t = 0; t < T; ++t) pos[t] = t == 0 ? 0 : (t == 1 ? 100000 : pd(rng));
        std::vector<float> q = RandomValues(T * qh * head_dim, dt, 1 + T);
        std::vector<float> k = RandomValues(T * kh * head_dim, dt, 2 + T);
        // Reference and per-element bounds.
        auto reference = [&](const std::vector<float>& x, int64_t heads, std::vector<double>& want,
                             std::vector<double>& bound) {
          want.assign(x.size(), 0);
          bound.assign(x.size(), 0);
          for (int64_t t = 0; t < T; ++t) {
            for (int64_t h = 0; h < heads; ++h) {
              const float* row = x.data() + (t * heads + h) * head_dim;
              for (int64_t i = 0; i < half; ++i) {
                const float angle = static_cast<float>(pos[t]) * inv_freq[i];
                const double c = std::cos(static_cast<double>(angle));
                const double s = std::sin(static_cast<double>(angle));
                const double x1 = row[i], x2 = row[i + half];
                const int64_t o = (t * heads + h) * head_dim;
                want[o + i] = x1 * c - x2 * s;
                want[o + i + half] = x2 * c + x1 * s;
                const double base = 1e-6 * (std::fabs(x1) + std::fabs(x2));
                const double out_round = dt == DType::kBF16 ? 1.0 / 256 : 0.0;
                bound[o + i] = base + out_round * std::fabs(want[o + i]);
                bound[o + i + half] = base + out_round * std::fabs(want[o + i + half]);
              }
            }
          }
        };
        std::vector<double> q_want, q_bound, k_want, k_bound;
        reference(q, qh, q_want, q_bound);
        reference(k, kh, k_want, k_bound);
        auto dq = Upload(q, dt, stream());
        auto dk = Upload(k, dt, stream());
        auto dpos = UploadRaw(pos.data(), pos.size() * 4, stream());
        auto dfreq = UploadRaw(inv_freq.data(), inv_freq.size() * 4, stream());
        ASSERT_TRUE(dq.ok() && dk.ok() && dpos.ok() && dfreq.ok());
        QSHARD_ASSERT_OK(LaunchRope(dq->get(), dk->get(), dt, T, qh, kh, head_dim,
                                    dpos->as<int32_t>(), dfreq->as<float>(), stream()));
        auto gq = Download(*dq, dt, q.size(), stream());
        auto gk = Download(*dk, dt, k.size(), stream());
        ASSERT_TRUE(gq.ok()) << gq.status();
        ASSERT_TRUE(gk.ok()) << gk.status();
        ExpectWithin(*gq, q_want, q_bound, head_dim, what + " q");
        ExpectWithin(*gk, k_want, k_bound, head_dim, what + " k");
      }
    }
  }
}

TEST_F(CudaElementwiseTest, SiluMulInPlaceAndOutOfPlace) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 8}, {3, 1000}, {5, 333}, {2, 14336}}) {
      for (bool in_place : {false, true}) {
        const std::string what = absl::StrCat("silu_mul ", Name(dt), " ", rows, "x", cols,
                                              in_place ? " in place" : "");
        const std::vector<float> g = RandomValues(rows * cols, dt, 11 + cols, 4.0f);
        const std::vector<float> u = RandomValues(rows * cols, dt, 12 + cols);
        std::vector<double> want(g.size()), bound(g.size());
        for (size_t i = 0; i < g.size(); ++i) {
          const double gd = g[i];
          want[i] = gd / (1.0 + std::exp(-gd)) * u[i];
          bound[i] = 2e-6 * std::fabs(gd * u[i]) + (dt == DType::kBF16 ? std::fabs(want[i]) / 256 : 0);
        }
        auto dg = Upload(g, dt, stream());
        auto du = Upload(u, dt, stream());
        auto dout = Poisoned(g.size(), dt, stream());
        ASSERT_TRUE(dg.ok() && du.ok() && dout.ok());
        void* out = in_place ? dg->get() : dout->get();
        QSHARD_ASSERT_OK(LaunchSiluMul(dg->get(), du->get(), out, dt, rows, cols, stream()));
        auto got = Download(in_place ? *dg : *dout, dt, g.size(), stream());
        ASSERT_TRUE(got.ok()) << got.status();
        ExpectWithin(*got, want, bound, cols, what);
      }
    }
  }
}

TEST_F(CudaElementwiseTest, SiluMulPackedMatchesReferenceAndSiluMulBitForBit) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    // cols 333: the one-element path; (4, 1000) with `offset`: a gate_up pointer off the
    // 16-byte grid, which must also take it.
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 8}, {3, 1000}, {5, 333}, {2, 14336}}) {
      for (int64_t offset : {0, 1}) {
        const std::string what = absl::StrCat("silu_mul_packed ", Name(dt), " ", rows, "x", cols,
                                              offset ? " misaligned" : "");
        const std::vector<float> g = RandomValues(rows * cols, dt, 61 + cols, 4.0f);
        const std::vector<float> u = RandomValues(rows * cols, dt, 62 + cols);
        // gate_up [rows, 2 * cols] = [gate | up] per row, after `offset` leading elements.
        std::vector<float> gu(offset + rows * 2 * cols, 1.0f);
        std::vector<double> want(g.size()), bound(g.size());
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t i = r * cols + c;
            gu[offset + r * 2 * cols + c] = g[i];
            gu[offset + r * 2 * cols + cols + c] = u[i];
            const double gd = g[i];
            want[i] = gd / (1.0 + std::exp(-gd)) * u[i];
            bound[i] =
                2e-6 * std::fabs(gd * u[i]) + (dt == DType::kBF16 ? std::fabs(want[i]) / 256 : 0);
          }
        }
        auto dgu = Upload(gu, dt, stream());
        auto dout = Poisoned(g.size(), dt, stream());
        auto dg = Upload(g, dt, stream());
        auto du = Upload(u, dt, stream());
        auto dsep = Poisoned(g.size(), dt, stream());
        ASSERT_TRUE(dgu.ok() && dout.ok() && dg.ok() && du.ok() && dsep.ok());
        const void* gate_up = static_cast<const uint8_t*>(dgu->get()) + offset * DTypeSize(dt);
        QSHARD_ASSERT_OK(LaunchSiluMulPacked(gate_up, dout->get(), dt, rows, cols, stream()));
        QSHARD_ASSERT_OK(
            LaunchSiluMul(dg->get(), du->get(), dsep->get(), dt, rows, cols, stream()));
        auto got = Download(*dout, dt, g.size(), stream());
        auto sep = Download(*dsep, dt, g.size(), stream());
        ASSERT_TRUE(got.ok() && sep.ok());
        ExpectWithin(*got, want, bound, cols, what);
        std::vector<double> sep_d(sep->begin(), sep->end());
        ExpectWithin(*got, sep_d, std::vector<double>(g.size(), 0.0), cols, what + " vs SiluMul");
      }
    }
  }
}

TEST_F(CudaElementwiseTest, SplitColumnsIsExactAndStaysInBounds) {
  struct Split {
    std::vector<int64_t> cols;
    int64_t offset;  // elements the first output is moved off the 16-byte grid
  };
  // 16-byte units (q|k|v of a 6-head / 2-KV-head model, of Llama-3-8B), single elements
  // (odd widths), a misaligned output, one output, the most outputs in one launch.
  const std::vector<Split> splits = {{{384, 128, 128}, 0},
                                     {{4096, 1024, 1024}, 0},
                                     {{5, 3, 7}, 0},
                                     {{384, 128, 128}, 1},
                                     {{13}, 0},
                                     {{8, 16, 24, 32, 40, 48, 56, 64}, 0}};
  constexpr int64_t kGuard = 64;  // poisoned elements after each output, must stay poisoned
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const Split& sp : splits) {
      for (int64_t rows : {1, 7}) {
        int64_t width = 0;
        for (int64_t c : sp.cols) width += c;
        const std::string what =
            absl::StrCat("split ", Name(dt), " rows=", rows, " cols=", absl::StrJoin(sp.cols, ","),
                         sp.offset ? " misaligned" : "");
        const std::vector<float> x = RandomValues(rows * width, dt, 71 + width + rows);
        auto dx = Upload(x, dt, stream());
        ASSERT_TRUE(dx.ok()) << dx.status();
        std::vector<DeviceBuffer> outs;
        std::vector<void*> ptrs;
        for (size_t i = 0; i < sp.cols.size(); ++i) {
          const int64_t off = i == 0 ? sp.offset : 0;
          auto b = Poisoned(off + rows * sp.cols[i] + kGuard, dt, stream());
          ASSERT_TRUE(b.ok()) << b.status();
          ptrs.push_back(static_cast<uint8_t*>(b->get()) + off * DTypeSize(dt));
          outs.push_back(std::move(b).value());
        }
        QSHARD_ASSERT_OK(LaunchSplitColumns(dx->get(), dt, rows, ptrs, sp.cols, stream()));
        int64_t col0 = 0;
        for (size_t i = 0; i < sp.cols.size(); ++i) {
          const int64_t off = i == 0 ? sp.offset : 0;
          const int64_t n = rows * sp.cols[i];
          auto got = Download(outs[i], dt, off + n + kGuard, stream());
          ASSERT_TRUE(got.ok()) << got.status();
          std::vector<float> part(got->begin() + off, got->begin() + off + n);
          std::vector<double> want(n);
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t c = 0; c < sp.cols[i]; ++c) {
              want[r * sp.cols[i] + c] = x[r * width + col0 + c];
            }
          }
          ExpectWithin(part, want, std::vector<double>(n, 0.0), sp.cols[i],
                       absl::StrCat(what, " output ", i));
          for (int64_t j = 0; j < off; ++j) EXPECT_TRUE(std::isnan((*got)[j])) << what;
          for (int64_t j = off + n; j < off + n + kGuard; ++j) {
            EXPECT_TRUE(std::isnan((*got)[j]))
                << what << " output " << i << " wrote past its end at " << j - off - n;
          }
          col0 += sp.cols[i];
        }
      }
    }
  }
}

TEST_F(CudaElementwiseTest, AddIsExact) {
  for (DType xt : {DType::kF32, DType::kBF16}) {
    for (DType yt : {DType::kF32, DType::kBF16}) {
      for (int64_t n : {1, 7, 4096, 10001}) {
        const std::string what = absl::StrCat("add x=", Name(xt), " y=", Name(yt), " n=", n);
        const std::vector<float> x = RandomValues(n, xt, 21 + n);
        const std::vector<float> y = RandomValues(n, yt, 22 + n);
        std::vector<double> want(n), bound(n, 0.0);
        for (int64_t i = 0; i < n; ++i) want[i] = RoundTo(xt, x[i] + y[i]);
        auto dx = Upload(x, xt, stream());
        auto dy = Upload(y, yt, stream());
        ASSERT_TRUE(dx.ok() && dy.ok());
        QSHARD_ASSERT_OK(LaunchAdd(dx->get(), xt, dy->get(), yt, n, stream()));
        auto got = Download(*dx, xt, n, stream());
        ASSERT_TRUE(got.ok()) << got.status();
        ExpectWithin(*got, want, bound, 0, what);
      }
    }
  }
}

TEST_F(CudaElementwiseTest, GatherRowsIsExact) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t cols : {1, 13, 4096}) {
      const int64_t src_rows = 9;
      const std::vector<int32_t> rows = {8, 0, 3, 3, 5, 1, 7};
      const std::string what = absl::StrCat("gather ", Name(dt), " cols=", cols);
      const std::vector<float> src = RandomValues(src_rows * cols, dt, 31 + cols);
      std::vector<double> want(rows.size() * cols), bound(want.size(), 0.0);
      for (size_t i = 0; i < rows.size(); ++i)
        for (int64_t c = 0; c < cols; ++c) want[i * cols + c] = src[rows[i] * cols + c];
      auto dsrc = Upload(src, dt, stream());
      auto drows = UploadRaw(rows.data(), rows.size() * 4, stream());
      auto dout = Poisoned(want.size(), dt, stream());
      ASSERT_TRUE(dsrc.ok() && drows.ok() && dout.ok());
      QSHARD_ASSERT_OK(LaunchGatherRows(dsrc->get(), dt, cols, drows->as<int32_t>(),
                                        static_cast<int64_t>(rows.size()), dout->get(), stream()));
      auto got = Download(*dout, dt, want.size(), stream());
      ASSERT_TRUE(got.ok()) << got.status();
      ExpectWithin(*got, want, bound, cols, what);
    }
  }
}

TEST_F(CudaElementwiseTest, CastRoundsLikeHost) {
  const DType types[] = {DType::kF32, DType::kBF16, DType::kF16};
  for (DType st : types) {
    for (DType dt : types) {
      for (int64_t n : {1, 1000, 4099}) {
        const std::string what = absl::StrCat("cast ", Name(st), " -> ", Name(dt), " n=", n);
        // Scale 3 with uniform mantissas: plenty of values needing rounding to bf16/f16.
        const std::vector<float> src = RandomValues(n, st, 41 + n, 3.0f);
        std::vector<double> want(n), bound(n, 0.0);
        for (int64_t i = 0; i < n; ++i) want[i] = RoundTo(dt, src[i]);
        auto dsrc = Upload(src, st, stream());
        auto dout = Poisoned(n, dt, stream());
        ASSERT_TRUE(dsrc.ok() && dout.ok());
        QSHARD_ASSERT_OK(LaunchCast(dsrc->get(), st, dout->get(), dt, n, stream()));
        auto got = Download(*dout, dt, n, stream());
        ASSERT_TRUE(got.ok()) << got.status();
        ExpectWithin(*got, want, bound, 0, what);
      }
    }
  }
}

TEST_F(CudaElementwiseTest, AbsMaxIsExact) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int64_t n : {1, 255, 100003, 3000000}) {
      const std::string what = absl::StrCat("absmax ", Name(dt), " n=", n);
      std::vector<float> x = RandomValues(n, dt, 51 + n);
      // A single outlier, negative, somewhere in the middle.
      x[n / 2] = RoundTo(dt, -37.5f);
      double want = 0;
      for (float v : x) want = std::max(want, static_cast<double>(std::fabs(v)));
      auto dx = Upload(x, dt, stream());
      auto dout = Poisoned(1, DType::kF32, stream());
      ASSERT_TRUE(dx.ok() && dout.ok());
      QSHARD_ASSERT_OK(LaunchAbsMax(dx->get(), dt, n, dout->as<float>(), stream()));
      auto got = Download(*dout, DType::kF32, 1, stream());
      ASSERT_TRUE(got.ok()) << got.status();
      ExpectWithin(*got, {want}, {0.0}, 0, what);
    }
  }
}

TEST_F(CudaElementwiseTest, RejectsBadArguments) {
  EXPECT_FALSE(LaunchRope(nullptr, nullptr, DType::kF32, 1, 1, 1, 63, nullptr, nullptr, stream()).ok());
  EXPECT_FALSE(LaunchRope(nullptr, nullptr, DType::kF16, 1, 1, 1, 64, nullptr, nullptr, stream()).ok());
  EXPECT_FALSE(LaunchSiluMul(nullptr, nullptr, nullptr, DType::kI32, 1, 1, stream()).ok());
  EXPECT_FALSE(LaunchCast(nullptr, DType::kF8E4M3, nullptr, DType::kF32, 1, stream()).ok());
  EXPECT_FALSE(LaunchSiluMulPacked(nullptr, nullptr, DType::kF16, 1, 8, stream()).ok());
  EXPECT_FALSE(LaunchSiluMulPacked(nullptr, nullptr, DType::kF32, -1, 8, stream()).ok());
  void* outs[kMaxSplitOutputs + 1] = {};
  const int64_t cols[kMaxSplitOutputs + 1] = {8, 8, 8, 8, 8, 8, 8, 8, 8};
  EXPECT_FALSE(LaunchSplitColumns(nullptr, DType::kI32, 1, {outs, 1}, {cols, 1}, stream()).ok());
  EXPECT_FALSE(LaunchSplitColumns(nullptr, DType::kF32, 1, {outs, 2}, {cols, 1}, stream()).ok());
  EXPECT_FALSE(LaunchSplitColumns(nullptr, DType::kF32, 1, {outs, 0}, {cols, 0}, stream()).ok());
  EXPECT_FALSE(LaunchSplitColumns(nullptr, DType::kF32, 1, {outs, kMaxSplitOutputs + 1},
                                  {cols, kMaxSplitOutputs + 1}, stream())
                   .ok());
  const int64_t zero[2] = {8, 0};
  EXPECT_FALSE(LaunchSplitColumns(nullptr, DType::kF32, 1, {outs, 2}, {zero, 2}, stream()).ok());
}

}  // namespace
}  // namespace qshard::cuda
