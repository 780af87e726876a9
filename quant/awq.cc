#include "quant/awq.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "quant/dense_linalg.h"
#include "quant/fp8.h"
#include "quant/gptq.h"
#include "quant/quantize_weights.h"

namespace qshard {

using quant_internal::GemmAcc;
using quant_internal::ParallelRange;

namespace {

constexpr int64_t kRowChunk = 32;  // weight rows per work item of the error evaluation

// Output error of weight perturbations d for inputs x [T, K]:
//   err(d) = mean_t (x_t . d)^2.
// With K <= T through the second moment S = X^T X / T (err = d^T S d, one [rows, K] x [K, K]
// product per chunk of rows); otherwise directly as X d^T ([T, K] x [K, rows]).
class OutputError {
 public:
  OutputError(const float* x, int64_t T, int64_t K) : x_(x), t_(T), k_(K) {
    if (K <= T) {
      HessianAccumulator acc(K);  // H = 2 S
      acc.Add(x, T);
      const std::vector<double>& h = acc.h();
      s_.resize(static_cast<size_t>(K * K));
      for (size_t i = 0; i < s_.size(); ++i) s_[i] = static_cast<float>(0.5 * h[i]);
    }
  }

  // out[r] = err(d[r, :]) for d [rows, K]. Single-threaded (callers split the rows).
  void RowErrors(const float* d, int64_t rows, double* out) const {
    const int64_t K = k_;
    if (!s_.empty()) {
      std::vector<float> m(static_cast<size_t>(rows * K), 0.0f);
      GemmAcc(rows, K, K, 1.0f, d, K, s_.data(), K, m.data(), K);
      for (int64_t r = 0; r < rows; ++r) {
        double acc = 0.0;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(m[r * K + k]) * d[r * K + k];
        out[r] = acc;
      }
      return;
    }
    std::vector<float> dt(static_cast<size_t>(K * rows));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < K; ++k) dt[k * rows + r] = d[r * K + k];
    }
    std::fill(out, out + rows, 0.0);
    constexpr int64_t kTokens = 256;
    std::vector<float> e;
    for (int64_t t0 = 0; t0 < t_; t0 += kTokens) {
      const int64_t tn = std::min(kTokens, t_ - t0);
      e.assign(static_cast<size_t>(tn * rows), 0.0f);
      GemmAcc(tn, rows, K, 1.0f, x_ + t0 * K, K, dt.data(), rows, e.data(), rows);
      for (int64_t t = 0; t < tn; ++t) {
        for (int64_t r = 0; r < rows; ++r) {
          const double v = e[t * rows + r];
          out[r] += v * v;
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) out[r] /= static_cast<double>(t_);
  }

 private:
  const float* x_;
  int64_t t_, k_;
  std::vector<float> s_;  // [K, K] or empty (direct mode)
};

// out = Q(w) for one row w [K] with groups of gs; clip [G] optional (values clamped first).
void FakeQuantRow(const float* w, int64_t K, int64_t gs, int bits, bool sym, const float* clip,
                  float* out) {
  const int maxq = (1 << bits) - 1;
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += gs) {
    const int64_t k1 = std::min(K, k0 + gs);
    const float c = clip ? clip[g] : std::numeric_limits<float>::infinity();
    const GroupScaleZero sz = ComputeScaleZero(w + k0, k1 - k0, bits, sym, c);
    for (int64_t k = k0; k < k1; ++k) {
      const float v = ClampAbs(w[k], c);
      out[k] = sz.scale * (static_cast<float>(QuantizeCode(v, sz.scale, sz.zero, maxq)) - sz.zero);
    }
  }
}

}  // namespace

AwqScaleResult AwqSearchScales(const std::vector<const float*>& ws, const std::vector<int64_t>& ns,
                               int64_t K, const float* x, int64_t T, const AwqOptions& o) {
  AwqScaleResult res;
  res.scales.assign(static_cast<size_t>(K), 1.0f);
  int64_t total = 0;
  for (size_t i = 0; i < ws.size() && i < ns.size(); ++i) total += ns[i];
  if (K <= 0 || T <= 0 || total <= 0 || o.grid <= 0) return res;
  const int64_t gs = NumGroups(K, o.group_size) == 1 ? K : o.group_size;
  const bool sym = !o.zero_point;

  // The linears stacked: w [total, K].
  std::vector<float> w(static_cast<size_t>(total * K));
  for (size_t i = 0, row = 0; i < ws.size() && i < ns.size(); row += ns[i], ++i) {
    std::copy(ws[i], ws[i] + ns[i] * K, w.begin() + row * K);
  }
  // s_x: mean |x| per input channel.
  std::vector<double> sx(static_cast<size_t>(K), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) sx[k] += std::fabs(x[t * K + k]);
  }
  for (double& v : sx) v /= static_cast<double>(T);
  // s_w (duo scaling): mean over rows of |w| / max|w| of its group.
  std::vector<double> sw;
  if (o.duo_scaling) {
    sw.assign(static_cast<size_t>(K), 0.0);
    for (int64_t n = 0; n < total; ++n) {
      const float* row = w.data() + n * K;
      for (int64_t k0 = 0; k0 < K; k0 += gs) {
        const int64_t k1 = std::min(K, k0 + gs);
        const float amax = AbsMax(row + k0, k1 - k0);
        for (int64_t k = k0; k < k1; ++k) sw[k] += std::fabs(row[k]) / (amax + 1e-6);
      }
    }
    for (double& v : sw) v /= static_cast<double>(total);
  }

  const OutputError err(x, T, K);
  // Mean output error of Q(W diag(s)) diag(s)^-1 against W.
  std::vector<double> row_err(static_cast<size_t>(total));
  auto loss_of = [&](const std::vector<float>& s) {
    ParallelRange((total + kRowChunk - 1) / kRowChunk, 1, [&](int64_t cb, int64_t ce) {
      std::vector<float> scaled(static_cast<size_t>(K)), d(static_cast<size_t>(kRowChunk * K));
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t n0 = c * kRowChunk, n1 = std::min(total, n0 + kRowChunk);
        for (int64_t n = n0; n < n1; ++n) {
          const float* row = w.data() + n * K;
          float* dr = d.data() + (n - n0) * K;
          for (int64_t k = 0; k < K; ++k) scaled[k] = row[k] * s[k];
          FakeQuantRow(scaled.data(), K, gs, o.bits, sym, nullptr, dr);
          for (int64_t k = 0; k < K; ++k) dr[k] = dr[k] / s[k] - row[k];
        }
        err.RowErrors(d.data(), n1 - n0, row_err.data() + n0);
      }
    });
    double sum = 0.0;
    for (double v : row_err) sum += v;
    return sum / static_cast<double>(total);
  };

  const std::vector<float> ones(static_cast<size_t>(K), 1.0f);
  res.loss_unscaled = loss_of(ones);
  double best = std::numeric_limits<double>::infinity();
  std::vector<float> s(static_cast<size_t>(K));
  for (int i = 0; i < o.grid; ++i) {
    const double ratio = static_cast<double>(i) / o.grid;
    double smax = 0.0, smin = std::numeric_limits<double>::infinity();
    std::vector<double> sd(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) {
      double v = std::pow(sx[k], ratio);
      if (o.duo_scaling) v /= std::pow(sw[k], 1.0 - ratio) + 1e-4;
      v = std::max(v, 1e-4);
      sd[k] = v;
      smax = std::max(smax, v);
      smin = std::min(smin, v);
    }
    const double norm = std::sqrt(smax * smin);
    for (int64_t k = 0; k < K; ++k) s[k] = static_cast<float>(sd[k] / norm);
    // Ratio 0 without duo scaling is exactly s = 1: reuse the unscaled loss.
    const double loss = (i == 0 && !o.duo_scaling) ? res.loss_unscaled : loss_of(s);
    if (loss < best) {
      best = loss;
      res.loss = loss;
      res.ratio = ratio;
      res.scales = s;
    }
  }
  return res;
}

std::vector<float> AwqSearchClip(const float* w, int64_t N, int64_t K, const float* x, int64_t T,
                                 const AwqOptions& o) {
  const int64_t G = NumGroups(K, o.group_size);
  const int64_t gs = G == 1 ? K : o.group_size;
  std::vector<float> clip(static_cast<size_t>(N * G), 0.0f);
  // Without samples every limit ties with "no clipping": return the groups' max |w|.
  const int64_t nt = std::min<int64_t>(T, std::max<int64_t>(o.clip_tokens, 1));
  const int steps = std::max(1, static_cast<int>(o.max_shrink * o.clip_grid));
  const bool sym = !o.zero_point;
  const int maxq = (1 << o.bits) - 1;

  // Evenly spaced sample rows, transposed: xt [K, nt]; per group the second moment of its
  // inputs sg[g] [len, len] = X_g^T X_g / nt.
  std::vector<float> xs(static_cast<size_t>(std::max<int64_t>(nt, 0) * K));
  for (int64_t i = 0; i < nt; ++i) {
    const int64_t t = i * T / nt;
    std::copy(x + t * K, x + (t + 1) * K, xs.begin() + i * K);
  }
  std::vector<float> xt(xs.size());
  for (int64_t i = 0; i < nt; ++i) {
    for (int64_t k = 0; k < K; ++k) xt[k * nt + i] = xs[i * K + k];
  }
  std::vector<std::vector<float>> sg(static_cast<size_t>(G));
  if (nt > 0) {
    quant_internal::ParallelTiles(G, [&](int64_t g) {
      const int64_t k0 = g * gs, len = std::min(K, k0 + gs) - k0;
      sg[g].assign(static_cast<size_t>(len * len), 0.0f);
      GemmAcc(len, len, nt, 1.0f / static_cast<float>(nt), xt.data() + k0 * nt, nt, xs.data() + k0,
              K, sg[g].data(), len);
    });
  }

  ParallelRange(N, 4, [&](int64_t nb, int64_t ne) {
    // d [steps, len]: Q(clamp(w, -m, m)) - w for every candidate m; e = d * S_g.
    std::vector<float> d(static_cast<size_t>(steps * gs)), e(d.size());
    for (int64_t n = nb; n < ne; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = g * gs, len = std::min(K, k0 + gs) - k0;
        const float* wg = w + n * K + k0;
        const float amax = AbsMax(wg, len);
        clip[n * G + g] = amax;
        if (nt == 0 || amax == 0.0f) continue;
        for (int i = 0; i < steps; ++i) {
          const float m = amax * static_cast<float>(1.0 - static_cast<double>(i) / o.clip_grid);
          const GroupScaleZero sz = ComputeScaleZero(wg, len, o.bits, sym, m);
          float* di = d.data() + i * len;
          for (int64_t k = 0; k < len; ++k) {
            const float v = ClampAbs(wg[k], m);
            di[k] = sz.scale *
                        (static_cast<float>(QuantizeCode(v, sz.scale, sz.zero, maxq)) - sz.zero) -
                    wg[k];
          }
        }
        std::fill(e.begin(), e.begin() + steps * len, 0.0f);
        GemmAcc(steps, len, len, 1.0f, d.data(), len, sg[g].data(), len, e.data(), len);
        double best = std::numeric_limits<double>::infinity();
        for (int i = 0; i < steps; ++i) {
          double v = 0.0;
          for (int64_t k = 0; k < len; ++k) {
            v += static_cast<double>(e[i * len + k]) * d[i * len + k];
          }
          if (v < best) {
            best = v;
            clip[n * G + g] = amax * static_cast<float>(1.0 - static_cast<double>(i) / o.clip_grid);
          }
        }
      }
    }
  });
  return clip;
}

}  // namespace qshard
