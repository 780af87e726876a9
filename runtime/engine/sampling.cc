// File: sampling.cc
// Parameter validation and the CPU sampler (penalties, greedy, temperature, top-k, top-p,
// min-p, seeded multinomial draw, raw logprobs).
//
// Everything here runs once per sequence per decode step over vocabularies up to ~256k,
// so the dense passes (max, exp, filters) are explicit vector kernels and the selection
// steps (top-k, top-p, top logprobs) never sort the vocabulary.
#include "runtime/engine/sampling.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace qshard {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Below this temperature the softmax is numerically a one-hot, so sample greedily
// (the same cut-off vLLM uses).
constexpr float kGreedyTemperature = 1e-5f;

// vLLM-compatible limits.
constexpr float kMaxTemperature = 100.0f;
constexpr float kMaxRepetitionPenalty = 2.0f;
constexpr float kMaxAbsPenalty = 2.0f;
constexpr int32_t kMaxLogprobs = 20;
constexpr size_t kMaxStopStrings = 16;
constexpr size_t kMaxStopStringBytes = 256;
constexpr size_t kMaxStopTokenIds = 64;

// Dense passes work in blocks this long: small enough that a block's exp terms stay in
// L1 and a float partial sum loses nothing measurable, large enough that the per-block
// sums (kept in double) make the final draw cost O(V / kBlock + kBlock).
constexpr int32_t kBlock = 256;

// top_k up to this uses a k-element heap (one compare per token in the common case);
// beyond it nth_element on a copy of the values is cheaper.
constexpr int32_t kHeapTopK = 1024;
// Candidate lists up to this are sorted outright for top_p; larger ones radix-select.
constexpr size_t kSortTopP = 4096;

// Vector kernels (GCC/Clang vector extensions). Under the default -ftrapping-math the
// compiler won't vectorize scalar loops with float selects, and libm's expf is a scalar
// call, yet these passes dominate the step. F4 is native everywhere (SSE2 on x86-64, NEON
// on Arm); the exp / max row passes also get an F8 instance built for AVX2 and chosen at
// run time. Neither enables FMA and both sum in the same order, so they give
// bit-identical results and a seed replays the same tokens on any x86-64 host. Vectors go
// by reference only: by value their ABI would depend on -mavx.
using F4 = float __attribute__((vector_size(16)));
using F8 = float __attribute__((vector_size(32)));

#define QSHARD_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename V>
constexpr int kLanesOf = static_cast<int>(sizeof(V) / sizeof(float));

template <typename V>
QSHARD_ALWAYS_INLINE void Load(const float* p, V& v) {
  std::memcpy(&v, p, sizeof(v));
}

template <typename V>
QSHARD_ALWAYS_INLINE void Store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof(v));
}

// The first len (< lanes) floats of p, the other lanes set to fill.
template <typename V>
QSHARD_ALWAYS_INLINE void LoadPartial(const float* p, int32_t len, float fill, V& v) {
  std::array<float, kLanesOf<V>> buf;
  buf.fill(fill);
  std::copy(p, p + len, buf.begin());
  Load(buf.data(), v);
}

template <typename V>
QSHARD_ALWAYS_INLINE double SumLanes(const V& v) {
  double sum = 0.0;
  for (int j = 0; j < kLanesOf<V>; ++j) sum += v[j];
  return sum;
}

// out = exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp). Exactly 0 below -87 (where
// expf goes denormal; such weights are < 1e-38 of the max), for -inf and for NaN.
template <typename V>
QSHARD_ALWAYS_INLINE void ExpNonPositive(const V& x, V& out) {
  using M = decltype(V{} < V{});  // the matching int32 vector
  constexpr float kLo = -87.0f;
  const V lo = V{} + kLo;
  const V zero = V{};
  V xc = lo < x ? x : lo;  // NaN -> lo
  xc = xc < zero ? xc : zero;
  const V n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2)
  const V r = xc - n * 0.693359375f - n * -2.12194440e-4f;              // Cody-Waite x - n ln2
  V y = zero + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const M bits = (__builtin_convertvector(n, M) + 127) << 23;  // 2^n, n in [-126, 0]
  const V scale = __builtin_bit_cast(V, bits);                 // builtin: no by-value vector call
  out = x >= lo ? y * scale : zero;
}

// Scalar form with bit-identical results, for sparse candidate lists.
float ExpNonPositive(float x) {
  const F4 v = F4{} + x;
  F4 e;
  ExpNonPositive(v, e);
  return e[0];
}

// For each kBlock block b of x[0, n): out = exp((x - shift) * scale) (out == x allowed;
// null: don't store) and block_sums[b] = its sum (null: don't store). Returns the total.
// Both instances accumulate the same eight float lanes (one F8 or two F4) and add them
// up in the same order, so the sums match bit for bit. The lanes only ever hold one
// block (kBlock terms <= 1), so they lose nothing measurable before the double sums.
template <typename V>
QSHARD_ALWAYS_INLINE double ExpRowImpl(const float* x, float* out, int32_t n, float shift,
                                       float scale, double* block_sums) {
  constexpr int kLanes = kLanesOf<V>;
  constexpr int kGroup = 8;
  constexpr int kVecs = kGroup / kLanes;
  double total = 0.0;
  V v, e;
  std::array<float, kGroup> tail;
  for (int32_t b = 0; b < n; b += kBlock) {
    const int32_t end = std::min(n, b + kBlock);
    std::array<V, kVecs> acc{};
    int32_t i = b;
    for (; i + kGroup <= end; i += kGroup) {
      for (int k = 0; k < kVecs; ++k) {
        Load(x + i + k * kLanes, v);
        ExpNonPositive(V((v - shift) * scale), e);
        if (out != nullptr) Store(out + i + k * kLanes, e);
        acc[k] += e;
      }
    }
    if (i < end) {
      tail.fill(kNegInf);  // -inf padding maps to weight 0
      std::copy(x + i, x + end, tail.begin());
      for (int k = 0; k < kVecs; ++k) {
        Load(tail.data() + k * kLanes, v);
        ExpNonPositive(V((v - shift) * scale), e);
        Store(tail.data() + k * kLanes, e);
        acc[k] += e;
      }
      if (out != nullptr) std::copy(tail.begin(), tail.begin() + (end - i), out + i);
    }
    double sum = 0.0;
    for (int k = 0; k < kVecs; ++k) {
      for (int j = 0; j < kLanes; ++j) sum += acc[k][j];
    }
    if (block_sums != nullptr) block_sums[b / kBlock] = sum;
    total += sum;
  }
  return total;
}

// Largest value, ignoring NaN; -inf when there is none.
template <typename V>
QSHARD_ALWAYS_INLINE float MaxOfImpl(const float* x, int32_t n) {
  constexpr int kLanes = kLanesOf<V>;
  V m = V{} + kNegInf;
  V v;
  int32_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Load(x + i, v);
    m = v > m ? v : m;
  }
  if (i < n) {
    LoadPartial(x + i, n - i, kNegInf, v);
    m = v > m ? v : m;
  }
  float best = kNegInf;
  for (int j = 0; j < kLanes; ++j) best = m[j] > best ? m[j] : best;
  return best;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2"))) double ExpRowAvx2(const float* x, float* out, int32_t n,
                                                  float shift, float scale, double* block_sums) {
  return ExpRowImpl<F8>(x, out, n, shift, scale, block_sums);
}
__attribute__((target("avx2"))) float MaxOfAvx2(const float* x, int32_t n) {
  return MaxOfImpl<F8>(x, n);
}
bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

double ExpRow(const float* x, float* out, int32_t n, float shift, float scale, double* block_sums) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (HasAvx2()) return ExpRowAvx2(x, out, n, shift, scale, block_sums);
#endif
  return ExpRowImpl<F4>(x, out, n, shift, scale, block_sums);
}

float MaxOf(const float* x, int32_t n) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (HasAvx2()) return MaxOfAvx2(x, n);
#endif
  return MaxOfImpl<F4>(x, n);
}

QSHARD_ALWAYS_INLINE bool AnyLane(const F4& a, const F4& b) {
  const auto words = __builtin_bit_cast(std::array<uint64_t, 2>, a > b);
  return (words[0] | words[1]) != 0;
}

// Calls fn(id, value) for each id, ascending, whose value exceeds the threshold; fn
// returns the new threshold, and +inf ends the scan. One vector compare rejects four
// ids, so scans where few pass (top-k, argmax) cost about one read of the row. NaN
// never passes.
template <typename Fn>
void ScanAbove(const float* x, int32_t n, float threshold, Fn&& fn) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr int kLanes = kLanesOf<F4>;
  int32_t i = 0;
  F4 v;
  for (; i + kLanes <= n; i += kLanes) {
    Load(x + i, v);
    if (!AnyLane(v, F4{} + threshold)) continue;
    for (int32_t j = i; j < i + kLanes; ++j) {
      if (x[j] > threshold) {
        threshold = fn(j, x[j]);
        if (threshold == kInf) return;
      }
    }
  }
  for (; i < n; ++i) {
    if (x[i] > threshold) {
      threshold = fn(i, x[i]);
      if (threshold == kInf) return;
    }
  }
}

// The largest float below v, so that "> Below(v)" means ">= v".
float Below(float v) { return std::nextafter(v, kNegInf); }

// Index of the largest value, lowest id on ties, skipping NaN. When nothing beats -inf
// (everything blocked) returns the first -inf id, or 0 when all are NaN.
int32_t ArgMax(const float* x, int32_t n) {
  const float m = MaxOf(x, n);
  int32_t found = 0;
  if (m > kNegInf) {
    ScanAbove(x, n, Below(m), [&](int32_t id, float) {
      found = id;
      return std::numeric_limits<float>::infinity();
    });
    return found;
  }
  for (int32_t i = 0; i < n; ++i) {
    if (x[i] == kNegInf) return i;
  }
  return 0;
}

// log(sum(exp(x))) in double over the raw row; -inf and NaN entries contribute nothing.
double LogSumExp(const float* x, int32_t n) {
  const float m = MaxOf(x, n);
  if (std::isinf(m)) return m;  // empty (-inf) or +inf dominating everything
  const double sum = ExpRow(x, nullptr, n, m, 1.0f, nullptr);
  return static_cast<double>(m) + std::log(sum);
}

// The k-th largest value above -inf (NaN ignored), or -inf when fewer than k exist.
float KthLargest(const float* x, int32_t n, int32_t k, std::vector<float>& scratch) {
  scratch.clear();
  const size_t want = static_cast<size_t>(k);
  if (k <= kHeapTopK) {
    // Min-heap of the k best so far; once it's full almost every id fails the compare
    // against its top inside ScanAbove's vector test.
    ScanAbove(x, n, kNegInf, [&](int32_t, float v) {
      if (scratch.size() < want) {
        scratch.push_back(v);
        std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
      } else {
        std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
        scratch.back() = v;
        std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
      }
      return scratch.size() < want ? kNegInf : scratch.front();
    });
    return scratch.size() < want ? kNegInf : scratch.front();
  }
  ScanAbove(x, n, kNegInf, [&](int32_t, float v) {
    scratch.push_back(v);
    return kNegInf;
  });
  if (scratch.size() < want) return kNegInf;
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                   std::greater<float>());
  return scratch[k - 1];
}

// Uniform double in [0, 1) from the top 53 bits, so a seed gives the same draws with
// every standard library (std::uniform_real_distribution is implementation-defined).
double UniformUnit(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

absl::Status RangeError(const char* field, const char* range, double got) {
  return absl::InvalidArgumentError(
      absl::StrCat(std::string(field), " must be in ", std::string(range), ", got ", got));
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& p, int32_t vocab_size) {
  // Comparisons are written as !(in range) so NaN fails every check.
  if (!(p.temperature >= 0.0f && p.temperature <= kMaxTemperature)) {
    return RangeError("temperature", "[0, 100]", p.temperature);
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return RangeError("top_p", "(0, 1]", p.top_p);
  }
  if (p.top_k < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be -1 or 0 (off) or >= 1, got ", p.top_k));
  }
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) {
    return RangeError("min_p", "[0, 1]", p.min_p);
  }
  if (!(p.repetition_penalty > 0.0f && p.repetition_penalty <= kMaxRepetitionPenalty)) {
    return RangeError("repetition_penalty", "(0, 2]", p.repetition_penalty);
  }
  if (!(p.presence_penalty >= -kMaxAbsPenalty && p.presence_penalty <= kMaxAbsPenalty)) {
    return RangeError("presence_penalty", "[-2, 2]", p.presence_penalty);
  }
  if (!(p.frequency_penalty >= -kMaxAbsPenalty && p.frequency_penalty <= kMaxAbsPenalty)) {
    return RangeError("frequency_penalty", "[-2, 2]", p.frequency_penalty);
  }
  if (p.max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", p.max_tokens));
  }
  if (p.min_tokens < 0 || p.min_tokens > p.max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "min_tokens must be in [0, max_tokens=", p.max_tokens, "], got ", p.min_tokens));
  }
  if (p.logprobs < 0 || p.logprobs > kMaxLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs must be in [0, 20], got ", p.logprobs));
  }
  if (p.stop.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop must have at most 16 strings, got ", p.stop.size()));
  }
  for (size_t i = 0; i < p.stop.size(); ++i) {
    const size_t len = p.stop[i].size();
    if (len == 0 || len > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop[", i, "] must be 1 to 256 bytes long, got ", len, " bytes"));
    }
  }
  if (p.stop_token_ids.size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(
        absl::StrCat("stop_token_ids must have at most 64 ids, got ", p.stop_token_ids.size()));
  }
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i) {
    const int32_t id = p.stop_token_ids[i];
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids[", i, "] must be in [0, ", vocab_size, "), got ", id));
    }
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params) : params_(params) {
  if (params_.seed.has_value()) {
    rng_.seed(*params_.seed);
  } else {
    // random_device yields 32 bits per call; use two so unseeded requests get a full
    // 64-bit seed.
    std::random_device rd;
    const uint64_t seed = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    rng_.seed(seed);
  }
}

SampleResult Sampler::Sample(const float* logits, int32_t vocab, absl::Span<const int32_t> prompt,
                             absl::Span<const int32_t> output, absl::Span<const int32_t> blocked) {
  SampleResult result;
  if (logits == nullptr || vocab <= 0) return result;

  work_.assign(logits, logits + vocab);
  ApplyPenalties(vocab, prompt, output, blocked);

  if (params_.temperature < kGreedyTemperature) {
    // Greedy deliberately ignores top_k / top_p / min_p: none of them can remove the
    // argmax, so applying them would only cost time.
    result.token_id = ArgMax(work_.data(), vocab);
  } else {
    result.token_id = SampleFromWork(vocab);
  }

  // Logprobs are reported on the raw logits (vLLM's default "raw_logprobs"), so they
  // describe the model, not the sampling transform.
  const double lse = LogSumExp(logits, vocab);
  result.logprob = static_cast<float>(static_cast<double>(logits[result.token_id]) - lse);
  if (params_.logprobs > 0) FillTopLogprobs(logits, vocab, lse, &result);
  return result;
}

void Sampler::ApplyPenalties(int32_t vocab, absl::Span<const int32_t> prompt,
                             absl::Span<const int32_t> output, absl::Span<const int32_t> blocked) {
  for (int32_t id : blocked) {
    if (id >= 0 && id < vocab) work_[id] = kNegInf;
  }

  const float rep = params_.repetition_penalty;
  if (rep != 1.0f && rep > 0.0f) {
    if (seen_.size() < static_cast<size_t>(vocab)) seen_.resize(vocab, 0);
    // HF / vLLM apply the penalty once per distinct id in prompt + output, however often
    // it occurs; seen_ dedups and is reset below for just the touched ids.
    auto penalize = [&](absl::Span<const int32_t> ids) {
      for (int32_t id : ids) {
        if (id < 0 || id >= vocab || seen_[id]) continue;
        seen_[id] = 1;
        float& v = work_[id];
        v = v > 0.0f ? v / rep : v * rep;
      }
    };
    penalize(prompt);
    penalize(output);
    for (int32_t id : prompt) {
      if (id >= 0 && id < vocab) seen_[id] = 0;
    }
    for (int32_t id : output) {
      if (id >= 0 && id < vocab) seen_[id] = 0;
    }
  }

  const float freq = params_.frequency_penalty;
  const float presence = params_.presence_penalty;
  if (freq != 0.0f || presence != 0.0f) {
    if (counts_.size() < static_cast<size_t>(vocab)) counts_.resize(vocab, 0);
    for (int32_t id : output) {
      if (id >= 0 && id < vocab) ++counts_[id];
    }
    // Second pass applies each distinct id once and zeroes its count as it goes, which
    // also restores the all-zero invariant for the next call.
    for (int32_t id : output) {
      if (id < 0 || id >= vocab || counts_[id] == 0) continue;
      work_[id] -= freq * static_cast<float>(counts_[id]) + presence;
      counts_[id] = 0;
    }
  }
}

int32_t Sampler::SampleFromWork(int32_t vocab) {
  float* w = work_.data();
  const float max_v = MaxOf(w, vocab);
  if (!(max_v > kNegInf)) return ArgMax(w, vocab);  // everything blocked
  if (std::isinf(max_v)) return ArgMax(w, vocab);   // +inf takes all the mass

  // Candidates are either dense (every id; work_ holds weights, 0 for dead ids, with
  // block_sums_ per kBlock) or sparse (index_ lists them; only their work_ entries are
  // weights). Plain temperature sampling stays dense and never builds a list.
  bool dense = true;

  // top_k on the logits: temperature is a positive scale and doesn't change the order.
  // Like HF / vLLM, tokens tied with the k-th value are kept too.
  const int32_t k = params_.top_k;
  if (k > 0 && k < vocab) {
    const float kth = KthLargest(w, vocab, k, values_);
    index_.clear();
    // With fewer than k live ids kth is -inf, and Below(-inf) keeps them all.
    const float at_least_kth = Below(kth);
    ScanAbove(w, vocab, at_least_kth, [&](int32_t id, float) {
      index_.push_back(id);
      return at_least_kth;
    });
    dense = false;
  }

  // Unnormalized softmax of logits / temperature. The max maps to exactly 1, which
  // min_p below relies on.
  const float inv_t = 1.0f / params_.temperature;
  double total = 0.0;
  if (dense) {
    block_sums_.resize((vocab + kBlock - 1) / kBlock);
    total = ExpRow(w, w, vocab, max_v, inv_t, block_sums_.data());
  } else {
    for (int32_t id : index_) {
      w[id] = ExpNonPositive((w[id] - max_v) * inv_t);
      total += w[id];
    }
  }

  // top_p: keep the smallest set of highest-weight candidates whose mass reaches
  // top_p (ties broken towards the lower id). Ends sparse.
  if (params_.top_p < 1.0f) {
    const double target = static_cast<double>(params_.top_p) * total;
    if (dense) {
      // Sorting the vocabulary would dominate the step, and most of it can be ruled
      // out in one vector pass: the ids ranked at or below a token all weigh <= w, so
      // at least total - vocab * w ranks above it; once that reaches target the token
      // is out. The margin keeps float rounding on the safe (inclusive) side.
      const double floor_w = (total - target) / vocab * (1.0 - 1e-6);
      index_.clear();
      ScanAbove(w, vocab, static_cast<float>(floor_w), [&](int32_t id, float) {
        index_.push_back(id);
        return static_cast<float>(floor_w);
      });
      dense = false;
    }
    const auto by_weight = [w](int32_t a, int32_t b) {
      return w[a] > w[b] || (w[a] == w[b] && a < b);
    };
    // ids[0, sorted) are known to be kept (cum is their mass) and the rest is sorted
    // by weight: keeps the shortest prefix whose mass reaches target.
    const auto cut_sorted = [&](std::vector<int32_t>& ids, size_t sorted, double cum) {
      size_t keep = ids.size();  // rounding left the total just short: keep all
      for (size_t i = sorted; i < ids.size(); ++i) {
        cum += w[ids[i]];
        if (cum >= target) {
          keep = i + 1;
          break;
        }
      }
      ids.resize(keep);
    };
    if (index_.size() <= kSortTopP) {
      std::sort(index_.begin(), index_.end(), by_weight);
      cut_sorted(index_, 0, 0.0);
    } else {
      // Still too many to sort (a flat distribution). Positive floats order like their
      // bit patterns, so radix-select: bucket the ids by 10-12 bits at a time, find
      // the bucket where the mass crosses target, move the buckets above it to
      // scratch_ (all kept) and narrow index_ to that bucket, until it is small enough
      // to sort.
      constexpr std::array<int, 3> kShifts = {20, 10, 0};
      constexpr size_t kBuckets = 1024;  // (bits of 1.0f) >> 20 is 0x3f8
      std::array<double, kBuckets> mass;
      double cum = 0.0;
      scratch_.clear();
      for (int shift : kShifts) {
        if (index_.size() <= kSortTopP) break;
        const auto bucket = [shift](float v) {
          return (std::bit_cast<uint32_t>(v) >> shift) & (kBuckets - 1);
        };
        mass.fill(0.0);
        for (int32_t id : index_) mass[bucket(w[id])] += w[id];
        uint32_t cut = 0;
        for (size_t bk = kBuckets; bk-- > 0;) {
          if (cum + mass[bk] >= target) {
            cut = static_cast<uint32_t>(bk);
            break;
          }
          cum += mass[bk];
        }
        size_t narrowed = 0;
        for (int32_t id : index_) {
          const uint32_t bk = bucket(w[id]);
          if (bk > cut) {
            scratch_.push_back(id);
          } else if (bk == cut) {
            index_[narrowed++] = id;
          }
        }
        index_.resize(narrowed);
      }
      std::sort(index_.begin(), index_.end(), by_weight);
      const size_t above = scratch_.size();
      scratch_.insert(scratch_.end(), index_.begin(), index_.end());
      cut_sorted(scratch_, above, cum);
      index_.swap(scratch_);
    }
    total = 0.0;
    for (int32_t id : index_) total += w[id];
  }

  // min_p: p / p_max = weight / 1, so the threshold applies to the weights directly.
  // Clamping to 1 keeps the max (weight exactly 1) even for unvalidated params.
  if (params_.min_p > 0.0f) {
    const float min_w = std::min(params_.min_p, 1.0f);
    total = 0.0;
    if (dense) {
      const int32_t blocks = static_cast<int32_t>(block_sums_.size());
      for (int32_t b = 0; b < blocks; ++b) {
        const int32_t off = b * kBlock;
        const int32_t len = std::min(kBlock, vocab - off);
        constexpr int kLanes = kLanesOf<F4>;
        F4 acc = F4{};
        F4 v;
        int32_t i = off;
        for (; i + kLanes <= off + len; i += kLanes) {
          Load(w + i, v);
          v = v >= min_w ? v : F4{};
          Store(w + i, v);
          acc += v;
        }
        double sum = SumLanes(acc);
        for (; i < off + len; ++i) {
          w[i] = w[i] >= min_w ? w[i] : 0.0f;
          sum += w[i];
        }
        block_sums_[b] = sum;
        total += sum;
      }
    } else {
      auto keep_end =
          std::remove_if(index_.begin(), index_.end(), [&](int32_t id) { return w[id] < min_w; });
      index_.erase(keep_end, index_.end());
      for (int32_t id : index_) total += w[id];
    }
  }

  // Inverse-CDF draw over the renormalized survivors.
  const double u = UniformUnit(rng_) * total;
  double cum = 0.0;
  if (!dense) {
    for (int32_t id : index_) {
      cum += w[id];
      if (u < cum) return id;
    }
    return index_.empty() ? ArgMax(w, vocab) : index_.back();  // rounding slack at the top
  }
  const int32_t blocks = static_cast<int32_t>(block_sums_.size());
  int32_t b = 0;
  while (b + 1 < blocks && u >= cum + block_sums_[b]) cum += block_sums_[b++];
  const int32_t off = b * kBlock;
  const int32_t end = std::min(vocab, off + kBlock);
  int32_t last = -1;
  for (int32_t i = off; i < end; ++i) {
    if (w[i] <= 0.0f) continue;
    cum += w[i];
    last = i;
    if (u < cum) return i;
  }
  // Rounding slack (the block sum was accumulated in another order): the block's last
  // live id, or the global argmax when the block holds none.
  return last >= 0 ? last : ArgMax(w, vocab);
}

void Sampler::FillTopLogprobs(const float* logits, int32_t vocab, double log_sum_exp,
                              SampleResult* result) {
  const size_t n =
      std::min<size_t>(static_cast<size_t>(params_.logprobs), static_cast<size_t>(vocab));
  // Min-heap (worst on top) of the n best (value, id). Ids arrive ascending and only a
  // strictly larger value displaces the top, so ties resolve to the lower id.
  using Entry = std::pair<float, int32_t>;
  const auto better = [](const Entry& a, const Entry& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::vector<Entry> heap;
  heap.reserve(n);
  ScanAbove(logits, vocab, kNegInf, [&](int32_t id, float v) {
    if (heap.size() < n) {
      heap.emplace_back(v, id);
      std::push_heap(heap.begin(), heap.end(), better);
    } else {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {v, id};
      std::push_heap(heap.begin(), heap.end(), better);
    }
    return heap.size() < n ? kNegInf : heap.front().first;
  });
  std::sort(heap.begin(), heap.end(), better);
  // Fewer than n finite logits: pad with the -inf / NaN ids, lowest first, so the list
  // always has the requested size.
  for (int32_t i = 0; i < vocab && heap.size() < n; ++i) {
    if (!(logits[i] > kNegInf)) heap.emplace_back(kNegInf, i);
  }
  result->top.clear();
  result->top.reserve(n);
  for (const Entry& e : heap) {
    result->top.push_back(
        {e.second, static_cast<float>(static_cast<double>(e.first) - log_sum_exp)});
  }
}

}  // namespace qshard
