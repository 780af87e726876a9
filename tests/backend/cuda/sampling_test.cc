// GPU sampling (runtime/backend/cuda/sampling.h) against a float64 host reference written
// here from the CPU sampler's specification (runtime/engine/sampling.cc), not by calling it.
//
// Without a CUDA device every test skips with a message. The host references (and the
// checks that the test data have no decision sitting on a rounding boundary) still run
// first, so a broken test design shows on any machine.
//
// What is checked, and the tolerances:
//   - Greedy: the token is the exact argmax of the penalized row (the penalties are
//     reproduced in float with the CPU's unfused operations, so the row is bit-exact):
//     planted ties (lowest id wins), blocked ids, repetition / frequency / presence
//     penalties that move the argmax, ids outside the vocabulary in the history, NaN and
//     -inf logits, all-NaN and all-blocked rows, +inf logits.
//   - Sampling: the kept set (top_k with ties kept, top_p with the weight-descending /
//     id-ascending cut, min_p) is computed on the host; the GPU draw uses the public
//     SamplingUniform(seed, step), so the host predicts the exact token: the first id (in
//     ascending order) whose cumulative kept weight exceeds u * kept mass. The GPU's
//     weights use expf (<= 2 ulp, 2.4e-7 relative) and its sums a 2^-40 fixed point, so
//     its running sums are within ~3e-7 of the mass of these; a draw may therefore land on
//     any kept id whose interval meets u * mass +- 5e-7 * mass (and on no other). Test
//     data are asserted to keep every top_p / min_p decision more than 1e-6 (relative)
//     from its boundary, so the kept set itself is exact.
//   - Distribution: per parameter combination 40000 draws (steps 0..39999, vocab 1000);
//     tokens with expected probability >= 0.02 are binned alone, the rest together, and
//     the total-variation distance to the expected distribution must be < 0.03 (expected
//     TV for <= 51 bins at this many draws is <= 0.015, its s.d. ~0.003).
//   - Logprobs: chosen logprob and the top-n (ids exact, value descending then id
//     ascending, -inf padding) equal the float64 log-softmax of the raw logits within
//     1e-5 absolute (the data keep |logprob| < 60, where one float ulp is <= 3.8e-6);
//     unused slots hold id -1 and -inf.
//   - Determinism: the same row gives bit-identical outputs alone, inside a batch at any
//     position, and on a second run; consecutive steps advance the stream.
//   - Sizes: vocab 1000, 997 (not a multiple of 4: the scalar path) and 128256; rows 1,
//     37 and 2000. Outputs and the workspace are poisoned with 0xFF before every launch.
//   - Bad arguments are rejected by LaunchSample / ValidateSamplingRow, and a row with
//     out-of-range parameters that reaches the kernel gets token -1 and NaN logprobs.
#include "runtime/backend/cuda/sampling.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "runtime/backend/cuda/cuda_context.h"
#include "runtime/base/status_macros.h"
#include "tests/backend/cuda/cuda_test_util.h"

namespace qshard::cuda {
namespace {

#define QSHARD_ASSERT_OK_AND_ASSIGN(lhs, expr) \
  QSHARD_ASSERT_OK_AND_ASSIGN_IMPL_(QSHARD_CONCAT_(qshard_test_or_, __LINE__), lhs, expr)
#define QSHARD_ASSERT_OK_AND_ASSIGN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                                      \
  ASSERT_TRUE(tmp.ok()) << tmp.status();                  \
  lhs = std::move(tmp).value()

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr int kMaxLp = kSamplingMaxLogprobs;
constexpr double kLogprobTol = 1e-5;
// Relative margins that cover the GPU's rounding (see the file comment): top_p / min_p
// decisions of the test data must be clearer than kBoundaryTol, and a draw may land on a
// neighbour when u * mass is within kDrawTol * mass of an interval boundary.
constexpr double kBoundaryTol = 1e-6;
constexpr double kDrawTol = 5e-7;

bool HaveGpu() { return CudaDeviceAvailable(); }
#define QSHARD_SKIP_WITHOUT_GPU()                                                     \
  do {                                                                                \
    if (!HaveGpu()) {                                                                 \
      GTEST_SKIP() << "no CUDA device or driver on this machine: GPU sampling tests " \
                      "skipped (host references were checked)";                       \
    }                                                                                 \
  } while (0)

// ---------------------------------------------------------------------------
// Rows and the host reference
// ---------------------------------------------------------------------------

struct HostRow {
  std::vector<float> logits;  // [vocab]
  DeviceSamplingRow p;        // offsets are filled in when the batch is flattened
  std::vector<int32_t> prompt, output, blocked;
};

// Blocked ids, repetition, then frequency / presence, in float with the CPU's operations.
// volatile keeps the compiler from fusing a multiply and an add into an FMA (the GPU
// and the CPU sampler round each operation).
std::vector<float> Penalized(const HostRow& r, int vocab) {
  std::vector<float> w = r.logits;
  for (int32_t id : r.blocked) {
    if (id >= 0 && id < vocab) w[id] = -kInf;
  }
  const float rep = r.p.repetition_penalty;
  if (rep != 1.0f && rep > 0.0f) {
    std::vector<char> seen(vocab, 0);
    for (const std::vector<int32_t>* ids : {&r.prompt, &r.output}) {
      for (int32_t id : *ids) {
        if (id < 0 || id >= vocab || seen[id]) continue;
        seen[id] = 1;
        volatile float v = w[id];
        w[id] = v > 0.0f ? v / rep : v * rep;
      }
    }
  }
  const float freq = r.p.frequency_penalty;
  const float presence = r.p.presence_penalty;
  if (freq != 0.0f || presence != 0.0f) {
    std::map<int32_t, int> counts;
    for (int32_t id : r.output) {
      if (id >= 0 && id < vocab) ++counts[id];
    }
    for (const auto& [id, c] : counts) {
      volatile float t = freq * static_cast<float>(c);
      volatile float t2 = t + presence;
      w[id] = w[id] - t2;
    }
  }
  return w;
}

struct Reference {
  int argmax = 0;        // of the penalized row (greedy's token)
  bool sampled = false;  // false: the token is argmax
  double lse = 0;        // raw log-sum-exp
  std::vector<int32_t> top_ids;
  std::vector<float> top_vals;  // raw values (-inf for padding)
  // Sampling: the kept ids ascending, their weights and the running sums.
  std::vector<int32_t> kept;
  std::vector<double> cum;  // cum[j] = weight of kept[0..j]
  double mass = 0;
  std::string boundary_problem;  // non-empty: a top_p / min_p decision is too close to call
};

double RawLse(const std::vector<float>& x) {
  float m = -kInf;
  for (float v : x) {
    if (v > m) m = v;
  }
  if (std::isinf(m)) return m;
  double s = 0;
  for (float v : x) {
    if (v > -kInf && v < kInf) s += std::exp(static_cast<double>(v) - m);
  }
  return static_cast<double>(m) + std::log(s);
}

Reference ComputeReference(const HostRow& r, int vocab) {
  Reference ref;
  const std::vector<float> w = Penalized(r, vocab);
  // Argmax: lowest id among the largest, NaN skipped; else the first -inf id; else 0.
  int arg = -1;
  float m = -kInf;
  for (int i = 0; i < vocab; ++i) {
    if (w[i] > m || (arg < 0 && w[i] == -kInf)) {
      m = w[i];
      arg = i;
    }
  }
  ref.argmax = arg < 0 ? 0 : arg;
  ref.lse = RawLse(r.logits);

  // Top-n of the raw logits.
  const int n_top = std::min(r.p.num_logprobs, vocab);
  std::vector<std::pair<float, int32_t>> live;
  for (int i = 0; i < vocab; ++i) {
    if (r.logits[i] > -kInf) live.emplace_back(r.logits[i], i);
  }
  std::sort(live.begin(), live.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  for (int s = 0; s < n_top && s < static_cast<int>(live.size()); ++s) {
    ref.top_ids.push_back(live[s].second);
    ref.top_vals.push_back(live[s].first);
  }
  for (int i = 0; i < vocab && static_cast<int>(ref.top_ids.size()) < n_top; ++i) {
    if (!(r.logits[i] > -kInf)) {
      ref.top_ids.push_back(i);
      ref.top_vals.push_back(-kInf);
    }
  }

  const DeviceSamplingRow& p = r.p;
  if (p.temperature < 1e-5f || !(m > -kInf) || m == kInf) return ref;
  ref.sampled = true;

  // top_k on the penalized values; ties with the k-th are kept.
  float kth = -kInf;
  if (p.top_k > 0 && p.top_k < vocab) {
    std::vector<float> vals;
    for (float v : w) {
      if (v > -kInf) vals.push_back(v);
    }
    if (static_cast<int>(vals.size()) >= p.top_k) {
      std::nth_element(vals.begin(), vals.begin() + (p.top_k - 1), vals.end(),
                       std::greater<float>());
      kth = vals[p.top_k - 1];
    }
  }
  const float inv_t = 1.0f / p.temperature;
  std::vector<double> weight(vocab, 0.0);
  std::vector<float> xs(vocab, -kInf);
  std::vector<int32_t> cand;
  double total = 0;
  for (int i = 0; i < vocab; ++i) {
    if (!(w[i] > -kInf && w[i] >= kth)) continue;
    volatile float d = w[i] - m;
    const float x = d * inv_t;
    xs[i] = x;
    weight[i] = x == 0.0f ? 1.0 : (x >= -87.0f ? std::exp(static_cast<double>(x)) : 0.0);
    cand.push_back(i);
    total += weight[i];
  }
  std::vector<char> keep(vocab, 0);
  for (int32_t id : cand) keep[id] = 1;

  if (p.top_p < 1.0f) {
    std::vector<int32_t> order = cand;
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return weight[a] > weight[b] || (weight[a] == weight[b] && a < b);
    });
    const double target = static_cast<double>(p.top_p) * total;
    double cum = 0;
    size_t cut = order.size();
    for (size_t j = 0; j < order.size(); ++j) {
      const double before = cum;
      cum += weight[order[j]];
      if (cum >= target) {
        cut = j + 1;
        if (cum - target < kBoundaryTol * total || target - before < kBoundaryTol * total) {
          ref.boundary_problem = absl::StrCat("top_p cut at rank ", j, " (id ", order[j],
                                              ") is within ", kBoundaryTol, " of the target");
        }
        // Nearly (not exactly) equal weights across the cut could swap on the GPU.
        if (j + 1 < order.size() && xs[order[j]] != xs[order[j + 1]] &&
            weight[order[j]] - weight[order[j + 1]] < kBoundaryTol * weight[order[j]]) {
          ref.boundary_problem = absl::StrCat("near-tie across the top_p cut at rank ", j);
        }
        break;
      }
    }
    for (size_t j = cut; j < order.size(); ++j) keep[order[j]] = 0;
  }
  if (p.min_p > 0.0f) {
    const double min_w = std::min(p.min_p, 1.0f);
    for (int32_t id : cand) {
      if (!keep[id]) continue;
      if (std::fabs(weight[id] - min_w) < kBoundaryTol * min_w && xs[id] != 0.0f) {
        ref.boundary_problem = absl::StrCat("id ", id, " weight ", weight[id], " at min_p");
      }
      if (weight[id] < min_w) keep[id] = 0;
    }
  }
  double cum = 0;
  for (int i = 0; i < vocab; ++i) {
    if (!keep[i] || weight[i] <= 0) continue;
    cum += weight[i];
    ref.kept.push_back(i);
    ref.cum.push_back(cum);
  }
  ref.mass = cum;
  return ref;
}

// The token the GPU must draw for uniform u: the kept id whose cumulative interval
// holds u * mass. The GPU's running sums differ from these by at most ~3e-7 of the mass
// (expf is within 2 ulp, the 2^-40 fixed point loses < 1e-7), so every kept id whose
// interval meets u * mass +- kDrawTol * mass is acceptable; outside the window none is.
struct Predicted {
  int32_t token = -1;
  size_t lo = 0, hi = 0;  // acceptable kept indices [lo, hi]
};

Predicted Predict(const Reference& ref, double u) {
  const auto index_of = [&](double x) {
    const size_t j = std::upper_bound(ref.cum.begin(), ref.cum.end(), x) - ref.cum.begin();
    return std::min(j, ref.kept.size() - 1);
  };
  const double x = u * ref.mass;
  const double tol = kDrawTol * ref.mass;
  Predicted out;
  const size_t j = index_of(x);
  out.token = ref.kept[j];
  out.lo = index_of(x - tol);
  out.hi = index_of(x + tol);
  return out;
}

// 0: tok is the predicted token; 1: another acceptable one (a rounding boundary);
// -1: not acceptable.
int Judge(const Reference& ref, const Predicted& want, int32_t tok) {
  if (tok == want.token) return 0;
  const auto it = std::lower_bound(ref.kept.begin(), ref.kept.end(), tok);
  if (it == ref.kept.end() || *it != tok) return -1;
  const size_t j = it - ref.kept.begin();
  return (j >= want.lo && j <= want.hi) ? 1 : -1;
}

bool IsKept(const Reference& ref, int32_t id) {
  return std::binary_search(ref.kept.begin(), ref.kept.end(), id);
}

// ---------------------------------------------------------------------------
// Running a batch on the GPU
// ---------------------------------------------------------------------------

struct GpuOut {
  std::vector<int32_t> token;
  std::vector<float> chosen;
  std::vector<int32_t> top_ids;
  std::vector<float> top_lp;
};

absl::StatusOr<DeviceBuffer> UploadBytes(const void* data, size_t bytes, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(bytes));
  if (bytes > 0) QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(data, bytes, stream));
  return buf;
}

absl::StatusOr<DeviceBuffer> PoisonedBytes(size_t bytes, cudaStream_t stream) {
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(bytes));
  if (bytes > 0) QSHARD_RETURN_IF_ERROR(buf.Fill(0xFF, stream));
  return buf;
}

// Flattens the rows (offsets into one history / blocked array each), runs LaunchSample
// with every output and the workspace poisoned, and downloads the results.
absl::StatusOr<GpuOut> RunGpu(const std::vector<const HostRow*>& rows, int vocab,
                              cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(rows.size());
  std::vector<float> logits;
  logits.reserve(static_cast<size_t>(n) * vocab);
  std::vector<DeviceSamplingRow> params;
  std::vector<int32_t> history, blocked;
  for (const HostRow* r : rows) {
    if (static_cast<int>(r->logits.size()) != vocab) {
      return absl::InvalidArgumentError("row logits size != vocab");
    }
    logits.insert(logits.end(), r->logits.begin(), r->logits.end());
    DeviceSamplingRow p = r->p;
    p.history_offset = static_cast<int32_t>(history.size());
    p.prompt_len = static_cast<int32_t>(r->prompt.size());
    p.output_len = static_cast<int32_t>(r->output.size());
    history.insert(history.end(), r->prompt.begin(), r->prompt.end());
    history.insert(history.end(), r->output.begin(), r->output.end());
    p.blocked_offset = static_cast<int32_t>(blocked.size());
    p.blocked_len = static_cast<int32_t>(r->blocked.size());
    blocked.insert(blocked.end(), r->blocked.begin(), r->blocked.end());
    params.push_back(p);
  }
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_logits,
                          UploadBytes(logits.data(), logits.size() * sizeof(float), stream));
  QSHARD_ASSIGN_OR_RETURN(
      DeviceBuffer d_params,
      UploadBytes(params.data(), params.size() * sizeof(DeviceSamplingRow), stream));
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_history,
                          UploadBytes(history.data(), history.size() * sizeof(int32_t), stream));
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_blocked,
                          UploadBytes(blocked.data(), blocked.size() * sizeof(int32_t), stream));
  const int64_t ws_bytes = SamplingWorkspaceBytes(n, vocab);
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_ws, PoisonedBytes(ws_bytes, stream));
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_tok, PoisonedBytes(n * sizeof(int32_t), stream));
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_lp, PoisonedBytes(n * sizeof(float), stream));
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_tid, PoisonedBytes(n * kMaxLp * sizeof(int32_t), stream));
  QSHARD_ASSIGN_OR_RETURN(DeviceBuffer d_tlp, PoisonedBytes(n * kMaxLp * sizeof(float), stream));
  QSHARD_RETURN_IF_ERROR(LaunchSample(
      d_logits.as<float>(), n, vocab, d_params.as<DeviceSamplingRow>(), d_history.as<int32_t>(),
      d_blocked.as<int32_t>(), d_ws.get(), ws_bytes, d_tok.as<int32_t>(), d_lp.as<float>(),
      d_tid.as<int32_t>(), d_tlp.as<float>(), stream));
  GpuOut out;
  out.token.resize(n);
  out.chosen.resize(n);
  out.top_ids.resize(n * kMaxLp);
  out.top_lp.resize(n * kMaxLp);
  QSHARD_RETURN_IF_ERROR(d_tok.CopyToHost(out.token.data(), n * sizeof(int32_t), stream));
  QSHARD_RETURN_IF_ERROR(d_lp.CopyToHost(out.chosen.data(), n * sizeof(float), stream));
  QSHARD_RETURN_IF_ERROR(
      d_tid.CopyToHost(out.top_ids.data(), n * kMaxLp * sizeof(int32_t), stream));
  QSHARD_RETURN_IF_ERROR(d_tlp.CopyToHost(out.top_lp.data(), n * kMaxLp * sizeof(float), stream));
  return out;
}

std::vector<const HostRow*> Pointers(const std::vector<HostRow>& rows) {
  std::vector<const HostRow*> out;
  for (const HostRow& r : rows) out.push_back(&r);
  return out;
}

// A logprob within kLogprobTol of want (NaN only where want is NaN, infinities exact).
void ExpectLogprob(float got, double want, const std::string& what) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << what << ": got " << got << ", want NaN";
  } else if (std::isinf(want)) {
    EXPECT_EQ(got, static_cast<float>(want)) << what;
  } else {
    EXPECT_TRUE(std::fabs(static_cast<double>(got) - want) <= kLogprobTol)
        << what << ": got " << got << ", want " << want << ", |diff| "
        << std::fabs(static_cast<double>(got) - want);
  }
}

// Chosen logprob (for the token the GPU chose) and the top-n slots of row `r`.
void CheckLogprobs(const HostRow& row, const Reference& ref, const GpuOut& out, int r,
                   const std::string& what) {
  const int32_t tok = out.token[r];
  ASSERT_GE(tok, 0) << what << ": row " << r << " token";
  ASSERT_LT(tok, static_cast<int32_t>(row.logits.size())) << what << ": row " << r << " token";
  ExpectLogprob(out.chosen[r], static_cast<double>(row.logits[tok]) - ref.lse,
                absl::StrCat(what, ": row ", r, " chosen logprob of id ", tok));
  const int n_top = static_cast<int>(ref.top_ids.size());
  for (int s = 0; s < kMaxLp; ++s) {
    const int32_t id = out.top_ids[r * kMaxLp + s];
    const float lp = out.top_lp[r * kMaxLp + s];
    if (s < n_top) {
      EXPECT_EQ(id, ref.top_ids[s])
          << what << ": row " << r << " top slot " << s << " of " << n_top;
      ExpectLogprob(lp, static_cast<double>(ref.top_vals[s]) - ref.lse,
                    absl::StrCat(what, ": row ", r, " top slot ", s));
    } else {
      EXPECT_EQ(id, -1) << what << ": row " << r << " unused top slot " << s;
      EXPECT_EQ(lp, -kInf) << what << ": row " << r << " unused top slot " << s;
    }
  }
}

// ---------------------------------------------------------------------------
// Test data
// ---------------------------------------------------------------------------

// Logits: a normal tail around `tail_mean` plus `head` ids lifted into [lo, lo + 4),
// optionally rounded to multiples of `quantum` (ties).
std::vector<float> MakeLogits(int vocab, uint32_t seed, int head, float tail_mean, float tail_sd,
                              float lo, float quantum) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> tail(tail_mean, tail_sd);
  std::uniform_real_distribution<float> lift(lo, lo + 4.0f);
  std::uniform_int_distribution<int> pick(0, vocab - 1);
  std::vector<float> x(vocab);
  for (float& v : x) v = tail(rng);
  for (int h = 0; h < head; ++h) x[pick(rng)] = lift(rng);
  if (quantum > 0) {
    for (float& v : x) v = std::round(v / quantum) * quantum;
  }
  return x;
}

// Ids among the `count` largest values of x.
std::vector<int32_t> TopIds(const std::vector<float>& x, int count) {
  std::vector<int32_t> ids(x.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::partial_sort(ids.begin(), ids.begin() + count, ids.end(),
                    [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
  ids.resize(count);
  return ids;
}

// Greedy rows of four kinds (r % 4): plain; repetition penalty; frequency / presence;
// everything plus blocked ids. The history favours the row's top ids so the penalties
// move the argmax, and holds ids outside the vocabulary (ignored).
std::vector<HostRow> GreedyRows(int vocab, int rows, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pick(0, vocab - 1);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<HostRow> out(rows);
  for (int r = 0; r < rows; ++r) {
    HostRow& row = out[r];
    const float quantum = (r % 3 == 0) ? 0.25f : 0.0f;
    row.logits = MakeLogits(vocab, seed * 131 + r, 30, 0.0f, 2.5f, 4.0f, quantum);
    // Plant ties at the maximum: two more ids (one below the first max, if possible).
    const int32_t top = TopIds(row.logits, 1)[0];
    row.logits[pick(rng) % (top + 1)] = row.logits[top];
    row.logits[pick(rng)] = row.logits[top];
    if (r % 5 == 1) {
      row.logits[pick(rng)] = kNaN;
      row.logits[pick(rng)] = -kInf;
    }
    DeviceSamplingRow& p = row.p;
    p.temperature = (r % 7 == 3) ? 5e-6f : 0.0f;
    p.top_k = r % 11;  // ignored by greedy
    p.top_p = 0.5f;
    p.min_p = 0.1f;
    p.seed = 1000 + r;
    p.step = r;
    p.num_logprobs = r % (kMaxLp + 1);
    const int kind = r % 4;
    if (kind == 1 || kind == 3) p.repetition_penalty = 0.5f + 1.5f * unit(rng);
    if (kind == 2 || kind == 3) {
      p.frequency_penalty = -2.0f + 4.0f * unit(rng);
      p.presence_penalty = -2.0f + 4.0f * unit(rng);
    }
    if (kind != 0) {
      const std::vector<int32_t> tops = TopIds(row.logits, 8);
      for (int j = 0; j < 60; ++j) row.prompt.push_back(j % 3 == 0 ? tops[j % 8] : pick(rng));
      for (int j = 0; j < 40; ++j) row.output.push_back(j % 2 == 0 ? tops[j % 5] : pick(rng));
      row.prompt.push_back(-1);
      row.output.push_back(vocab + 7);
    }
    if (kind == 3) {
      row.blocked = {top, pick(rng), pick(rng), -3, vocab};
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

class SamplingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (HaveGpu()) {
      auto s = CudaStream::Create();
      ASSERT_TRUE(s.ok()) << s.status();
      stream_ = std::move(s).value();
    }
  }
  cudaStream_t stream() const { return stream_.get(); }
  CudaStream stream_;
};

TEST_F(SamplingTest, GreedyIsExactArgmaxWithPenaltiesAndLogprobs) {
  struct Case {
    int vocab, rows;
  };
  for (const Case c : {Case{1000, 37}, Case{997, 37}, Case{128256, 1}, Case{128256, 37}}) {
    const std::string what = absl::StrCat("greedy vocab=", c.vocab, " rows=", c.rows);
    SCOPED_TRACE(what);
    std::vector<HostRow> rows = GreedyRows(c.vocab, c.rows, 7 + c.vocab + c.rows);
    if (c.vocab == 1000) {
      // Degenerate rows: all NaN (token 0), NaN prefix with everything else blocked (the
      // first -inf id), five finite values (top-20 padded with -inf ids), +inf values
      // (the first +inf id even when sampling).
      HostRow nan_row = rows[0];
      nan_row.logits.assign(c.vocab, kNaN);
      nan_row.p.num_logprobs = 20;
      rows.push_back(nan_row);
      HostRow blocked_row = rows[0];
      blocked_row.logits = MakeLogits(c.vocab, 99, 0, 0.0f, 1.0f, 0.0f, 0.0f);
      for (int i = 0; i < 5; ++i) blocked_row.logits[i] = kNaN;
      blocked_row.blocked.clear();
      for (int i = 5; i < c.vocab; ++i) blocked_row.blocked.push_back(i);
      rows.push_back(blocked_row);
      HostRow sparse_row = rows[0];
      sparse_row.logits.assign(c.vocab, -kInf);
      for (int i : {900, 3, 500, 501, 77}) sparse_row.logits[i] = static_cast<float>(i % 7);
      sparse_row.logits[10] = kNaN;
      sparse_row.p.num_logprobs = 20;
      sparse_row.p.temperature = 1.0f;  // sampling among the 5 finite values
      rows.push_back(sparse_row);
      HostRow inf_row = rows[0];
      inf_row.logits[700] = kInf;
      inf_row.logits[300] = kInf;
      inf_row.p.temperature = 0.8f;  // +inf takes all the mass: argmax, not a draw
      rows.push_back(inf_row);
    }
    std::vector<Reference> refs;
    int moved = 0;  // rows whose penalized argmax differs from the raw argmax
    for (const HostRow& row : rows) {
      refs.push_back(ComputeReference(row, c.vocab));
      HostRow plain = row;
      plain.prompt.clear();
      plain.output.clear();
      plain.blocked.clear();
      if (ComputeReference(plain, c.vocab).argmax != refs.back().argmax) ++moved;
    }
    if (c.rows >= 37) {
      ASSERT_GE(moved, 5) << "test design: the penalties should move the argmax in some rows";
    }
    if (!HaveGpu()) continue;  // the host side of every case is still checked
    QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut out, RunGpu(Pointers(rows), c.vocab, stream()));
    for (size_t r = 0; r < rows.size(); ++r) {
      const Reference& ref = refs[r];
      if (ref.sampled) {
        ASSERT_FALSE(ref.kept.empty());
        EXPECT_TRUE(IsKept(ref, out.token[r]))
            << what << ": row " << r << " drew " << out.token[r] << ", not in the kept set";
      } else {
        EXPECT_EQ(out.token[r], ref.argmax)
            << what << ": row " << r << " (kind " << r % 4 << ", rep "
            << rows[r].p.repetition_penalty << ", freq " << rows[r].p.frequency_penalty
            << ", presence " << rows[r].p.presence_penalty << ")";
      }
      CheckLogprobs(rows[r], ref, out, static_cast<int>(r), what);
    }
  }
  QSHARD_SKIP_WITHOUT_GPU();
}

struct Combo {
  const char* name;
  float temperature;
  int top_k;
  float top_p;
  float min_p;
  float quantum;   // > 0: logits rounded to multiples (ties)
  bool penalties;  // history + blocked ids in sampling mode
};

// Parameter combinations exercised by the draw tests. The logits (vocab 1000) are a tail
// around -4 plus 40 ids in [2, 6): concentrated enough that the binned TV test has few
// bins, with every filter cutting somewhere in the head.
const std::vector<Combo>& Combos() {
  static const std::vector<Combo> combos = {
      {"plain T=1", 1.0f, 0, 1.0f, 0.0f, 0.0f, false},
      {"T=0.7 top_k=20", 0.7f, 20, 1.0f, 0.0f, 0.0f, false},
      {"T=1.3 top_p=0.8", 1.3f, 0, 0.8f, 0.0f, 0.0f, false},
      {"min_p=0.05", 1.0f, 0, 1.0f, 0.05f, 0.0f, false},
      {"T=0.9 top_k=40 top_p=0.9 min_p=0.02", 0.9f, 40, 0.9f, 0.02f, 0.0f, false},
      {"T=2 top_k=5", 2.0f, 5, 1.0f, 0.0f, 0.0f, false},
      {"ties top_p=0.5", 1.0f, 0, 0.5f, 0.0f, 0.5f, false},
      {"ties top_k=3", 1.0f, 3, 1.0f, 0.0f, 0.5f, false},
      {"penalties T=1.1 top_p=0.95", 1.1f, 0, 0.95f, 0.0f, 0.0f, true},
  };
  return combos;
}

HostRow ComboRow(const Combo& c, int vocab, uint32_t seed) {
  HostRow row;
  // The tail carries ~1.3% of the mass at T=1 for both sizes (lower for the larger
  // vocab), so top_p cuts inside the head: in a dense tail of 10^5 ids every cut would sit
  // within rounding distance of the target and the kept set could not be predicted.
  const float tail_mean = vocab > 10000 ? -9.0f : -4.0f;
  row.logits = MakeLogits(vocab, seed, 40, tail_mean, 1.5f, 2.0f, c.quantum);
  row.p.temperature = c.temperature;
  row.p.top_k = c.top_k;
  row.p.top_p = c.top_p;
  row.p.min_p = c.min_p;
  row.p.seed = seed * 7919ull + 17;
  row.p.num_logprobs = 5;
  if (c.penalties) {
    const std::vector<int32_t> tops = TopIds(row.logits, 6);
    row.p.repetition_penalty = 1.3f;
    row.p.frequency_penalty = 0.5f;
    row.p.presence_penalty = 0.3f;
    row.prompt = {tops[1], tops[2], 5, 6, tops[1]};
    row.output = {tops[3], tops[3], tops[4], 9};
    row.blocked = {tops[0]};
  }
  return row;
}

// Finds a seed (from `seed` up) whose row has no top_p / min_p decision near a rounding
// boundary, so the kept set is exact. Deterministic: the same seed every run.
std::pair<HostRow, Reference> CleanComboRow(const Combo& c, int vocab, uint32_t seed) {
  for (int attempt = 0; attempt < 50; ++attempt, ++seed) {
    HostRow row = ComboRow(c, vocab, seed);
    Reference ref = ComputeReference(row, vocab);
    if (ref.boundary_problem.empty()) return {std::move(row), std::move(ref)};
  }
  ADD_FAILURE() << c.name << ": no seed without a boundary problem";
  HostRow row = ComboRow(c, vocab, seed);
  return {row, ComputeReference(row, vocab)};
}

TEST_F(SamplingTest, DrawsFollowTheFilteredDistribution) {
  constexpr int kVocab = 1000;
  constexpr int kRowsPerLaunch = 2000;
  constexpr int kLaunches = 20;  // 40000 draws per combination
  uint32_t seed = 500;
  for (const Combo& c : Combos()) {
    const std::string what = absl::StrCat("draws [", c.name, "]");
    SCOPED_TRACE(what);
    auto [row, ref] = CleanComboRow(c, kVocab, seed += 100);
    ASSERT_TRUE(ref.sampled);
    ASSERT_FALSE(ref.kept.empty());
    // Each filter must actually cut: fewer kept ids than candidates of the plain row.
    if (c.top_k > 0) {
      EXPECT_LE(static_cast<int>(ref.kept.size()), c.top_k + (c.quantum > 0 ? 40 : 0));
      if (c.top_p == 1.0f && c.min_p == 0.0f) {
        EXPECT_GE(static_cast<int>(ref.kept.size()), c.top_k) << "top_k keeps ties";
      }
    }
    if (c.top_p < 1.0f || c.min_p > 0.0f) {
      EXPECT_LT(static_cast<int>(ref.kept.size()), 40) << "top_p / min_p should cut the head";
    }

    // Expected probabilities and the TV bins: ids >= 0.02 alone, the rest pooled.
    std::map<int32_t, int> bin_of;
    std::vector<double> bin_p(1, 0.0);  // bin 0: the pooled rest
    for (size_t j = 0; j < ref.kept.size(); ++j) {
      const double pj = (ref.cum[j] - (j ? ref.cum[j - 1] : 0.0)) / ref.mass;
      if (pj >= 0.02) {
        bin_of[ref.kept[j]] = static_cast<int>(bin_p.size());
        bin_p.push_back(pj);
      } else {
        bin_p[0] += pj;
      }
    }
    ASSERT_LE(bin_p.size(), 51u);
    if (!HaveGpu()) continue;  // the host side of every combination is still checked

    std::vector<HostRow> rows(kRowsPerLaunch, row);
    std::vector<int64_t> hits(bin_p.size(), 0);
    int outside = 0, mismatched = 0, near_boundary = 0;
    for (int launch = 0; launch < kLaunches; ++launch) {
      for (int r = 0; r < kRowsPerLaunch; ++r) rows[r].p.step = launch * kRowsPerLaunch + r;
      QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut out, RunGpu(Pointers(rows), kVocab, stream()));
      for (int r = 0; r < kRowsPerLaunch; ++r) {
        const int32_t tok = out.token[r];
        const uint64_t step = rows[r].p.step;
        if (!IsKept(ref, tok)) {
          if (outside++ < 5) {
            ADD_FAILURE() << what << ": step " << step << " drew id " << tok
                          << " outside the kept set (" << ref.kept.size() << " ids)";
          }
          continue;
        }
        const Predicted want = Predict(ref, SamplingUniform(rows[r].p.seed, step));
        const int verdict = Judge(ref, want, tok);
        if (verdict == 1) {
          ++near_boundary;
        } else if (verdict < 0 && mismatched++ < 5) {
          ADD_FAILURE() << what << ": step " << step << " u "
                        << SamplingUniform(rows[r].p.seed, step) << " drew " << tok << ", want "
                        << want.token;
        }
        const auto it = bin_of.find(tok);
        ++hits[it == bin_of.end() ? 0 : it->second];
      }
      if (launch == 0) CheckLogprobs(row, ref, out, 0, what);
    }
    EXPECT_EQ(outside, 0) << what;
    EXPECT_EQ(mismatched, 0) << what << ": draws that differ from the host prediction";
    EXPECT_LE(near_boundary, kRowsPerLaunch * kLaunches / 100)
        << what << ": draws resolved to a neighbour at a rounding boundary";
    double tv = 0;
    const double draws = static_cast<double>(kRowsPerLaunch) * kLaunches;
    for (size_t b = 0; b < bin_p.size(); ++b) tv += std::fabs(hits[b] / draws - bin_p[b]);
    tv *= 0.5;
    EXPECT_LT(tv, 0.03) << what << ": total-variation distance over " << bin_p.size() << " bins, "
                        << draws << " draws";
  }
  QSHARD_SKIP_WITHOUT_GPU();
}

TEST_F(SamplingTest, LargeVocabDrawsMatchPrediction) {
  constexpr int kVocab = 128256;
  constexpr int kRows = 37;
  std::vector<HostRow> rows;
  std::vector<Reference> refs;
  uint32_t seed = 9000;
  for (int r = 0; r < kRows; ++r) {
    const Combo& c = Combos()[r % Combos().size()];
    auto [row, ref] = CleanComboRow(c, kVocab, seed += 10);
    row.p.num_logprobs = (r * 3) % (kMaxLp + 1);
    ref = ComputeReference(row, kVocab);  // num_logprobs changed the top-n only
    ASSERT_TRUE(ref.boundary_problem.empty()) << ref.boundary_problem;
    rows.push_back(std::move(row));
    refs.push_back(std::move(ref));
  }
  QSHARD_SKIP_WITHOUT_GPU();
  int near_boundary = 0;
  for (uint64_t step_base : {0ull, 1000003ull, 77ull}) {
    const std::string what = absl::StrCat("vocab=128256 step base ", step_base);
    SCOPED_TRACE(what);
    for (int r = 0; r < kRows; ++r) rows[r].p.step = step_base + r;
    QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut out, RunGpu(Pointers(rows), kVocab, stream()));
    for (int r = 0; r < kRows; ++r) {
      const Reference& ref = refs[r];
      const Predicted want = Predict(ref, SamplingUniform(rows[r].p.seed, rows[r].p.step));
      const int verdict = Judge(ref, want, out.token[r]);
      if (verdict == 1) ++near_boundary;
      EXPECT_GE(verdict, 0) << what << ": row " << r << " [" << Combos()[r % Combos().size()].name
                            << "] drew " << out.token[r] << ", want " << want.token;
      CheckLogprobs(rows[r], ref, out, r, what);
    }
  }
  EXPECT_LE(near_boundary, 10) << "of " << 3 * kRows << " draws";
}

TEST_F(SamplingTest, DeterministicAndIndependentOfTheBatch) {
  constexpr int kVocab = 128256;
  // The row under test: sampling with every filter, penalties, logprobs.
  HostRow probe = CleanComboRow(Combos()[8], kVocab, 4242).first;
  probe.p.top_k = 50;
  probe.p.min_p = 0.01f;
  probe.p.num_logprobs = 20;
  probe.p.step = 12345;
  const Reference ref = ComputeReference(probe, kVocab);
  ASSERT_TRUE(ref.boundary_problem.empty()) << ref.boundary_problem;
  std::vector<HostRow> others = GreedyRows(kVocab, 36, 31);
  for (size_t i = 0; i < others.size(); ++i) {
    others[i].p.temperature = 0.5f + 0.1f * static_cast<float>(i % 10);  // sampling too
  }
  QSHARD_SKIP_WITHOUT_GPU();

  auto batch_with_probe_at = [&](int pos) {
    std::vector<const HostRow*> b;
    for (int i = 0, o = 0; i < 37; ++i) b.push_back(i == pos ? &probe : &others[o++]);
    return b;
  };
  QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut alone, RunGpu({&probe}, kVocab, stream()));
  const Predicted want = Predict(ref, SamplingUniform(probe.p.seed, probe.p.step));
  EXPECT_GE(Judge(ref, want, alone.token[0]), 0)
      << "probe drew " << alone.token[0] << ", want " << want.token;
  CheckLogprobs(probe, ref, alone, 0, "probe alone");
  const auto same_as_alone = [&](const GpuOut& out, int pos, const std::string& what) {
    EXPECT_EQ(out.token[pos], alone.token[0]) << what;
    EXPECT_EQ(std::memcmp(&out.chosen[pos], &alone.chosen[0], sizeof(float)), 0) << what;
    EXPECT_EQ(
        std::memcmp(&out.top_ids[pos * kMaxLp], alone.top_ids.data(), kMaxLp * sizeof(int32_t)), 0)
        << what;
    EXPECT_EQ(std::memcmp(&out.top_lp[pos * kMaxLp], alone.top_lp.data(), kMaxLp * sizeof(float)),
              0)
        << what;
  };
  for (int pos : {0, 5, 36}) {
    QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut first, RunGpu(batch_with_probe_at(pos), kVocab, stream()));
    QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut second, RunGpu(batch_with_probe_at(pos), kVocab, stream()));
    same_as_alone(first, pos, absl::StrCat("probe at position ", pos, " of 37"));
    EXPECT_EQ(first.token, second.token) << "second run of the same batch, probe at " << pos;
    for (size_t i = 0; i < first.chosen.size(); ++i) {
      EXPECT_EQ(std::memcmp(&first.chosen[i], &second.chosen[i], sizeof(float)), 0)
          << "chosen logprob of row " << i << " differs between two runs";
    }
  }

  // The stream advances with step: 64 consecutive steps of a flat-enough row (the combo
  // keeps > 10 ids) give more than one distinct token, each as predicted.
  std::vector<HostRow> steps(64, probe);
  for (int s = 0; s < 64; ++s) steps[s].p.step = 1000 + s;
  QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut out, RunGpu(Pointers(steps), kVocab, stream()));
  std::vector<int32_t> distinct(out.token);
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  EXPECT_GT(distinct.size(), 3u) << "tokens over 64 steps: the stream does not advance";
  for (int s = 0; s < 64; ++s) {
    const Predicted w = Predict(ref, SamplingUniform(probe.p.seed, steps[s].p.step));
    EXPECT_GE(Judge(ref, w, out.token[s]), 0)
        << "step " << steps[s].p.step << " drew " << out.token[s] << ", want " << w.token;
  }
}

TEST_F(SamplingTest, RejectsBadArguments) {
  DeviceSamplingRow ok;
  EXPECT_TRUE(ValidateSamplingRow(ok, 1000, 0, 0).ok());
  auto bad = [&](auto mutate, const char* field) {
    DeviceSamplingRow r;
    mutate(r);
    const absl::Status st = ValidateSamplingRow(r, 1000, 10, 4);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(st.message().find(field), std::string::npos) << st.message();
  };
  bad([](DeviceSamplingRow& r) { r.top_k = -1; }, "top_k");
  bad([](DeviceSamplingRow& r) { r.num_logprobs = kMaxLp + 1; }, "num_logprobs");
  bad([](DeviceSamplingRow& r) { r.num_logprobs = -1; }, "num_logprobs");
  bad([](DeviceSamplingRow& r) { r.temperature = kNaN; }, "temperature");
  bad([](DeviceSamplingRow& r) { r.temperature = -1.0f; }, "temperature");
  bad([](DeviceSamplingRow& r) { r.top_p = 0.0f; }, "top_p");
  bad([](DeviceSamplingRow& r) { r.min_p = 1.5f; }, "min_p");
  bad([](DeviceSamplingRow& r) { r.repetition_penalty = 0.0f; }, "repetition_penalty");
  bad([](DeviceSamplingRow& r) { r.presence_penalty = 3.0f; }, "presence_penalty");
  bad([](DeviceSamplingRow& r) { r.frequency_penalty = -3.0f; }, "frequency_penalty");
  bad([](DeviceSamplingRow& r) { r.prompt_len = 8, r.output_len = 3; }, "history");
  bad([](DeviceSamplingRow& r) { r.history_offset = -1; }, "history");
  bad([](DeviceSamplingRow& r) { r.blocked_offset = 2, r.blocked_len = 3; }, "blocked");
  EXPECT_EQ(ValidateSamplingRow(ok, 0, 0, 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SamplingWorkspaceBytes(0, 1000), 0);
  EXPECT_EQ(SamplingWorkspaceBytes(3, 1000), 3 * 1024 * 8);
  EXPECT_GE(SamplingUniform(1, 2), 0.0);
  EXPECT_LT(SamplingUniform(1, 2), 1.0);
  EXPECT_NE(SamplingUniform(1, 2), SamplingUniform(1, 3));
  EXPECT_NE(SamplingUniform(1, 2), SamplingUniform(2, 2));
  QSHARD_SKIP_WITHOUT_GPU();

  // Launcher argument checks (they return before touching the device).
  float* f = reinterpret_cast<float*>(256);
  int32_t* i = reinterpret_cast<int32_t*>(256);
  const DeviceSamplingRow* prm = reinterpret_cast<const DeviceSamplingRow*>(256);
  void* ws = reinterpret_cast<void*>(256);
  const int64_t big = int64_t{1} << 40;
  auto launch = [&](const float* logits, int64_t rows, int64_t vocab, void* w, int64_t wb) {
    return LaunchSample(logits, rows, vocab, prm, i, i, w, wb, i, f, i, f, stream());
  };
  EXPECT_EQ(launch(f, 1, 0, ws, big).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(launch(f, 1, -5, ws, big).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(launch(f, 1, kSamplingMaxVocab + 1, ws, big).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(launch(f, -1, 1000, ws, big).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(launch(nullptr, 1, 1000, ws, big).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(launch(f, 2, 1000, ws, SamplingWorkspaceBytes(2, 1000) - 1).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(launch(f, 1, 1000, reinterpret_cast<void*>(260), big).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(launch(f, 0, 1000, ws, 0).ok()) << "rows == 0 enqueues nothing";

  // A row with out-of-range parameters that reaches the kernel anyway: token -1, NaN
  // logprobs; its neighbours are unaffected.
  std::vector<HostRow> rows = GreedyRows(1000, 3, 5);
  rows[1].p.num_logprobs = kMaxLp + 1;
  const Reference ref0 = ComputeReference(rows[0], 1000);
  const Reference ref2 = ComputeReference(rows[2], 1000);
  QSHARD_ASSERT_OK_AND_ASSIGN(GpuOut out, RunGpu(Pointers(rows), 1000, stream()));
  EXPECT_EQ(out.token[1], -1);
  EXPECT_TRUE(std::isnan(out.chosen[1]));
  for (int s = 0; s < kMaxLp; ++s) {
    EXPECT_EQ(out.top_ids[kMaxLp + s], -1);
    EXPECT_TRUE(std::isnan(out.top_lp[kMaxLp + s]));
  }
  EXPECT_EQ(out.token[0], ref0.argmax);
  EXPECT_EQ(out.token[2], ref2.argmax);
}

}  // namespace
}  // namespace qshard::cuda
