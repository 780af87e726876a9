#include "quant/gptq.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "quant/dense_linalg.h"
#include "quant/fp8.h"
#include "quant/quantize_weights.h"

namespace qshard {

using quant_internal::GemmAcc;
using quant_internal::ParallelRange;
using quant_internal::ParallelTiles;

// ---------------------------------------------------------------------------------------
// HessianAccumulator

namespace {
constexpr int64_t kHessRows = 256;   // rows of x per fp32 product (then added in fp64)
constexpr int64_t kHessTileI = 96;   // output tile rows
constexpr int64_t kHessTileJ = 256;  // output tile columns
}  // namespace

HessianAccumulator::HessianAccumulator(int64_t k) : k_(k), buf_(static_cast<size_t>(k * k), 0.0) {}

void HessianAccumulator::Add(const float* x, int64_t rows) {
  if (rows <= 0) return;
  const int64_t K = k_;
  if (is_mean_) {  // back to the plain sum
    const double f = static_cast<double>(n_) / 2.0;
    for (double& v : buf_) v *= f;
    is_mean_ = false;
  }
  // Upper-triangle tiles (i-tile, j-tile) with some j >= i.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = 0; i0 < K; i0 += kHessTileI) {
    for (int64_t j0 = i0 / kHessTileJ * kHessTileJ; j0 < K; j0 += kHessTileJ) {
      tiles.emplace_back(i0, j0);
    }
  }
  std::vector<float> xt;  // x chunk transposed, [K, r]
  for (int64_t r0 = 0; r0 < rows; r0 += kHessRows) {
    const int64_t r = std::min(kHessRows, rows - r0);
    const float* xc = x + r0 * K;  // [r, K]
    xt.resize(static_cast<size_t>(K * r));
    for (int64_t t = 0; t < r; ++t) {
      for (int64_t k = 0; k < K; ++k) xt[k * r + t] = xc[t * K + k];
    }
    // Each tile: sum over the chunk's rows of x[:, i] x[:, j] in fp32 (SIMD GEMM of
    // xt[i-tile, :] by x[:, j-tile]), then added to the fp64 sum; tiles are disjoint, so
    // the threads never write the same element.
    ParallelTiles(static_cast<int64_t>(tiles.size()), [&](int64_t t) {
      const auto [i0, j0] = tiles[t];
      const int64_t i1 = std::min(K, i0 + kHessTileI);
      const int64_t js = std::max(j0, i0), j1 = std::min(K, j0 + kHessTileJ);
      if (js >= j1) return;
      const int64_t ni = i1 - i0, nj = j1 - js;
      thread_local std::vector<float> acc;
      acc.assign(static_cast<size_t>(ni * nj), 0.0f);
      GemmAcc(ni, nj, r, 1.0f, xt.data() + i0 * r, r, xc + js, K, acc.data(), nj);
      for (int64_t i = 0; i < ni; ++i) {
        double* dst = buf_.data() + (i0 + i) * K + js;
        const float* src = acc.data() + i * nj;
        for (int64_t j = 0; j < nj; ++j) dst[j] += src[j];
      }
    });
  }
  n_ += rows;
}

const std::vector<double>& HessianAccumulator::h() const {
  if (!is_mean_) {
    const int64_t K = k_;
    const double f = n_ > 0 ? 2.0 / static_cast<double>(n_) : 0.0;
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t j = i; j < K; ++j) buf_[i * K + j] *= f;
      for (int64_t j = 0; j < i; ++j) buf_[i * K + j] = buf_[j * K + i];  // mirror
    }
    is_mean_ = true;
  }
  return buf_;
}

// ---------------------------------------------------------------------------------------
// Inverse-Hessian factor

namespace quant_internal {

bool UpperCholeskyOfInverse(const double* h, int64_t k, double lambda, std::vector<float>* u) {
  // work = P (h + lambda I) P, P reversing the index order.
  std::vector<double> work(static_cast<size_t>(k * k));
  ParallelRange(k, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double* src = h + (k - 1 - i) * k;
      double* dst = work.data() + i * k;
      for (int64_t j = 0; j < k; ++j) dst[j] = src[k - 1 - j];
      dst[i] += lambda;
    }
  });
  if (!CholeskyLower(work.data(), k)) return false;
  InvertLowerTriangular(work.data(), k);
  // (h + lambda I)^-1 = P L^-T L^-1 P = U^T U with U = P L^-1 P upper triangular.
  u->assign(static_cast<size_t>(k * k), 0.0f);
  ParallelRange(k, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double* src = work.data() + (k - 1 - i) * k;
      float* dst = u->data() + i * k;
      for (int64_t j = i; j < k; ++j) dst[j] = static_cast<float>(src[k - 1 - j]);
    }
  });
  return true;
}

}  // namespace quant_internal

// ---------------------------------------------------------------------------------------
// GptqQuantize

namespace {

std::string Prefix(const GptqOptions& o) { return o.name.empty() ? "GPTQ" : o.name + ": GPTQ"; }

}  // namespace

absl::StatusOr<GptqResult> GptqQuantize(const float* w, int64_t N, int64_t K,
                                        const HessianAccumulator& hacc, const GptqOptions& o) {
  const std::string pre = Prefix(o);
  if (o.bits < 2 || o.bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat(pre, " bits ", o.bits, " outside [2, 8]"));
  }
  if (o.group_size == 0 || o.group_size < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat(pre, " group_size ", o.group_size, ": expected -1 or a positive size"));
  }
  if (o.block_size <= 0 || !(o.damp_percent >= 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat(pre, " block_size ", o.block_size,
                                                   " / damp_percent ", o.damp_percent,
                                                   ": expected > 0 / >= 0"));
  }
  if (N <= 0 || K <= 0 || hacc.k() != K) {
    return absl::InvalidArgumentError(absl::StrCat(
        pre, ": weight [", N, ", ", K, "] does not match a Hessian of ", hacc.k(), " inputs"));
  }
  if (hacc.num_samples() == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(pre, ": the Hessian has no calibration samples"));
  }
  const std::vector<double>& h0 = hacc.h();
  for (double v : h0) {
    if (!std::isfinite(v)) {
      return absl::FailedPreconditionError(
          absl::StrCat(pre, ": the Hessian has non-finite entries (bad calibration inputs?)"));
    }
  }
  const bool fp8 = o.grid == GptqGrid::kFp8E4M3;
  if (fp8 && (o.group_size != -1 || o.desc_act)) {
    return absl::InvalidArgumentError(absl::StrCat(
        pre, " on the fp8 grid: per-channel scales only (group_size -1, no desc_act)"));
  }
  const int64_t G = NumGroups(K, o.group_size);
  const int64_t gs = G == 1 ? K : o.group_size;
  const int maxq = (1 << o.bits) - 1;

  GptqResult res;
  // Working copy of W; dead inputs (never active: diag 0) get weight 0 and H_dd = 1 so that
  // H stays invertible and no error is pushed onto them.
  std::vector<float> wk(w, w + N * K);
  std::vector<char> dead(static_cast<size_t>(K), 0);
  for (int64_t k = 0; k < K; ++k) {
    if (h0[k * K + k] == 0.0) {
      dead[k] = 1;
      ++res.dead_inputs;
      for (int64_t n = 0; n < N; ++n) wk[n * K + k] = 0.0f;
    }
  }

  IntQuantMatrix& q = res.q;
  q.in_features = K;
  q.out_features = N;
  q.bits = o.bits;
  q.num_groups = G;
  q.codes.resize(static_cast<size_t>(N * K));
  q.scales.resize(static_cast<size_t>(G * N));
  q.zeros.resize(static_cast<size_t>(G * N));
  q.g_idx.resize(static_cast<size_t>(K));

  // static_groups: every group's parameters from the (dead-zeroed) original weights, in the
  // original column order, before any error feedback.
  const bool static_groups = o.static_groups && o.group_size > 0;
  if (static_groups) {
    ParallelRange(N, 16, [&](int64_t nb, int64_t ne) {
      for (int64_t n = nb; n < ne; ++n) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
          const GroupScaleZero sz =
              ComputeScaleZero(wk.data() + n * K + k0, k1 - k0, o.bits, o.sym);
          q.scales[g * N + n] = sz.scale;
          q.zeros[g * N + n] = sz.zero;
        }
      }
    });
  }

  // Act-order: quantize the columns with the largest diag(H) first (stable for ties, so an
  // H with equal diagonal keeps the original order).
  std::vector<int64_t> perm(static_cast<size_t>(K));
  std::iota(perm.begin(), perm.end(), 0);
  if (o.desc_act) {
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) {
      const double ha = dead[a] ? 1.0 : h0[a * K + a], hb = dead[b] ? 1.0 : h0[b * K + b];
      return ha > hb;
    });
  }
  // Hp = H permuted (rows and columns), dead diagonals set to 1.
  std::vector<double> hp(static_cast<size_t>(K * K));
  ParallelRange(K, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double* src = h0.data() + perm[i] * K;
      double* dst = hp.data() + i * K;
      for (int64_t j = 0; j < K; ++j) dst[j] = src[perm[j]];
      if (dead[perm[i]]) dst[i] = 1.0;
    }
  });
  double mean_diag = 0.0;
  for (int64_t i = 0; i < K; ++i) mean_diag += hp[i * K + i];
  mean_diag /= static_cast<double>(K);

  // U = chol(H^-1)^T-upper with dampening; on failure retry with 10x the dampening.
  std::vector<float> u;
  double damp = o.damp_percent;
  while (true) {
    if (quant_internal::UpperCholeskyOfInverse(hp.data(), K, damp * mean_diag, &u)) break;
    const double next = damp > 0.0 ? damp * 10.0 : 0.01;
    if (next > o.max_damp_percent * (1.0 + 1e-9)) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: the Hessian (%d inputs, %d samples) is not positive definite even with "
          "damp_percent %g (max_damp_percent %g); the calibration data may be degenerate",
          pre, K, hacc.num_samples(), damp, o.max_damp_percent));
    }
    damp = next;
  }
  res.damp_percent = damp;
  if (damp != o.damp_percent) {
    res.warning = absl::StrFormat(
        "%s: Cholesky of the Hessian failed with damp_percent %g; succeeded with %g", pre,
        o.damp_percent, damp);
  }
  hp = std::vector<double>();

  // Permute the working weights' columns.
  if (o.desc_act) {
    ParallelRange(N, 16, [&](int64_t nb, int64_t ne) {
      std::vector<float> tmp(static_cast<size_t>(K));
      for (int64_t n = nb; n < ne; ++n) {
        float* row = wk.data() + n * K;
        for (int64_t i = 0; i < K; ++i) tmp[i] = row[perm[i]];
        std::copy(tmp.begin(), tmp.end(), row);
      }
    });
  }
  // Group of the column at permuted position i (for g_idx and parameter lookup).
  std::vector<int32_t> group_of(static_cast<size_t>(K));
  for (int64_t i = 0; i < K; ++i) {
    group_of[i] = static_cast<int32_t>((static_groups ? perm[i] : i) / gs);
  }
  for (int64_t i = 0; i < K; ++i) q.g_idx[perm[i]] = group_of[i];

  // Rows of W evolve independently (the error of row n only moves along row n), so each
  // thread runs the whole column sweep on its own rows: within a block of B columns the
  // updates are applied column by column; the rest of the row gets them once per block as
  // W[:, i2:] -= Err[:, B] * U[i1:i2, i2:] (a GEMM, the "lazy batch" update).
  const int64_t B = o.block_size;
  std::vector<double> row_loss(static_cast<size_t>(N), 0.0);
  ParallelRange(N, 8, [&](int64_t n0, int64_t n1) {
    const int64_t rows = n1 - n0;
    std::vector<float> err(static_cast<size_t>(rows * B));
    std::vector<GroupScaleZero> cur(static_cast<size_t>(rows));
    if (fp8) {  // one e4m3 scale per row, from the original weights
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = wk.data() + (n0 + r) * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(row[k]));
        cur[r] = {std::max(amax / 448.0f, FLT_EPSILON), 0.0f};
        q.scales[n0 + r] = cur[r].scale;
        q.zeros[n0 + r] = 0.0f;
      }
    } else if (!static_groups && o.group_size <= 0) {  // one group: the whole row
      for (int64_t r = 0; r < rows; ++r) {
        cur[r] = ComputeScaleZero(wk.data() + (n0 + r) * K, K, o.bits, o.sym);
        q.scales[n0 + r] = cur[r].scale;
        q.zeros[n0 + r] = cur[r].zero;
      }
    }
    for (int64_t i1 = 0; i1 < K; i1 += B) {
      const int64_t i2 = std::min(K, i1 + B), nb = i2 - i1;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        float* row = wk.data() + n * K;
        float* e_row = err.data() + r * B;
        for (int64_t i = i1; i < i2; ++i) {
          if (static_groups) {
            const int32_t g = group_of[i];
            cur[r] = {q.scales[g * N + n], q.zeros[g * N + n]};
          } else if (!fp8 && o.group_size > 0 && i % gs == 0) {
            // Group parameters from the current (error-updated) weights of the group.
            cur[r] = ComputeScaleZero(row + i, std::min(K, i + gs) - i, o.bits, o.sym);
            const int64_t g = i / gs;
            q.scales[g * N + n] = cur[r].scale;
            q.zeros[g * N + n] = cur[r].zero;
          }
          const float x = row[i];
          float deq;
          if (fp8) {
            // x / s (not x * (1 / s)), as the fp8 packer and llm-compressor round.
            const uint8_t c = FloatToE4M3(x / cur[r].scale);
            q.codes[n * K + perm[i]] = c;
            deq = E4M3ToFloat(c) * cur[r].scale;
          } else {
            const int c = QuantizeCode(x, cur[r].scale, cur[r].zero, maxq);
            q.codes[n * K + perm[i]] = static_cast<uint8_t>(c);
            deq = cur[r].scale * (static_cast<float>(c) - cur[r].zero);
          }
          const float* urow = u.data() + i * K;
          const float d = urow[i];
          const float e = (x - deq) / d;
          row_loss[n] += 0.5 * static_cast<double>(e) * static_cast<double>(e);
          for (int64_t j = i + 1; j < i2; ++j) row[j] -= e * urow[j];
          e_row[i - i1] = e;
        }
      }
      if (i2 < K) {
        GemmAcc(rows, K - i2, nb, -1.0f, err.data(), B, u.data() + i1 * K + i2, K,
                wk.data() + n0 * K + i2, K);
      }
    }
  });
  for (double l : row_loss) res.loss += l;
  return res;
}

}  // namespace qshard
