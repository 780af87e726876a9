// File: sampling.cc
// Parameter validation and the CPU sampler (penalties, greedy, temperature, top-k, top-p,
// min-p, seeded multinomial draw, raw logprobs).
//
// Everything here runs once per sequence per decode step over vocabularies up to ~256k,
// so the dense passes are written as branch-free, lane-parallel loops the compiler can
// vectorize, and the selection steps avoid sorting the vocabulary.
#include "runtime/engine/sampling.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
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
constexpr int kLanes = 8;  // independent accumulators, so the loops vectorize

// top_k up to this uses a k-element heap (one compare per token in the common case);
// beyond it nth_element on a copy of the values is cheaper.
constexpr int32_t kHeapTopK = 1024;
// Candidate lists up to this are sorted outright for top_p; larger ones use buckets.
constexpr size_t kSortTopP = 4096;

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp), branch-free so the dense loops
// vectorize; libm's expf is a scalar call. Returns exactly 0 below -87 (where expf goes
// denormal; such weights are < 1e-38 of the max), for -inf and for NaN.
inline float ExpNonPositive(float x) {
  constexpr float kLo = -87.0f;
  float xc = kLo < x ? x : kLo;  // NaN -> kLo
  xc = xc < 0.0f ? xc : 0.0f;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2)
  const float r = xc - n * 0.693359375f - n * -2.12194440e-4f;  // Cody-Waite x - n ln2
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x >= kLo ? y * scale : 0.0f;
}

// out[i] = exp((x[i] - shift) * scale) for i < len (x == out allowed); returns the sum.
inline double ExpBlock(const float* x, float* out, int32_t len, float shift, float scale) {
  for (int32_t i = 0; i < len; ++i) out[i] = ExpNonPositive((x[i] - shift) * scale);
  std::array<float, kLanes> acc{};
  int32_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += out[i + j];
  }
  for (; i < len; ++i) acc[0] += out[i];
  double sum = 0.0;
  for (float a : acc) sum += a;
  return sum;
}

// Largest value, ignoring NaN; -inf when there is none.
float MaxOf(const float* x, int32_t n) {
  std::array<float, kLanes> m;
  m.fill(kNegInf);
  int32_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  }
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  float best = kNegInf;
  for (float v : m) best = v > best ? v : best;
  return best;
}

// Index of the largest value, lowest id on ties, skipping NaN. When nothing beats -inf
// (everything blocked) returns the first non-NaN id, or 0.
int32_t ArgMax(const float* x, int32_t n) {
  const float m = MaxOf(x, n);
  for (int32_t i = 0; i < n; ++i) {
    if (x[i] == m) return i;
  }
  return 0;  // only NaN left
}

// log(sum(exp(x))) in double over the raw row; -inf and NaN entries contribute nothing.
double LogSumExp(const float* x, int32_t n) {
  const float m = MaxOf(x, n);
  if (std::isinf(m)) return m;  // empty (-inf) or +inf dominating everything
  std::array<float, kBlock> buf;
  double sum = 0.0;
  for (int32_t b = 0; b < n; b += kBlock) {
    sum += ExpBlock(x + b, buf.data(), std::min(kBlock, n - b), m, 1.0f);
  }
  return static_cast<double>(m) + std::log(sum);
}

// The k-th largest non-NaN value above -inf, or -inf when fewer than k exist.
float KthLargest(const float* x, int32_t n, int32_t k, std::vector<float>& scratch) {
  scratch.clear();
  if (k <= kHeapTopK) {
    // Min-heap of the k best so far: after the first few thousand tokens almost every
    // token fails the single compare against the heap top.
    for (int32_t i = 0; i < n; ++i) {
      const float v = x[i];
      if (!(v > kNegInf)) continue;
      if (scratch.size() < static_cast<size_t>(k)) {
        scratch.push_back(v);
        std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
      } else if (v > scratch.front()) {
        std::pop_heap(scratch.begin(), scratch.end(), std::greater<float>());
        scratch.back() = v;
        std::push_heap(scratch.begin(), scratch.end(), std::greater<float>());
      }
    }
    return scratch.size() < static_cast<size_t>(k) ? kNegInf : scratch.front();
  }
  for (int32_t i = 0; i < n; ++i) {
    if (x[i] > kNegInf) scratch.push_back(x[i]);
  }
  if (scratch.size() < static_cast<size_t>(k)) return kNegInf;
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                   std::greater<float>());
  return scratch[k - 1];
}

// Uniform double in [0, 1) from the top 53 bits, so a seed gives the same draws with
// every standard library (std::uniform_real_distribution is implementation-defined).
double UniformUnit(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * 0x1.0p-53;
}

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
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be >= 1, got ", p.max_tokens));
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
      return absl::InvalidArgumentError(absl::StrCat(
          "stop[", i, "] must be 1 to 256 bytes long, got ", len, " bytes"));
    }
  }
  if (p.stop_token_ids.size() > kMaxStopTokenIds) {
    return absl::InvalidArgumentError(absl::StrCat(
        "stop_token_ids must have at most 64 ids, got ", p.stop_token_ids.size()));
  }
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i) {
    const int32_t id = p.stop_token_ids[i];
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop_token_ids[", i, "] must be in [0, ", vocab_size, "), got ", id));
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

SampleResult Sampler::Sample(const float* logits, int32_t vocab,
                             absl::Span<const int32_t> prompt,
                             absl::Span<const int32_t> output,
                             absl::Span<const int32_t> blocked) {
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
                             absl::Span<const int32_t> output,
                             absl::Span<const int32_t> blocked) {
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
    for (int32_t i = 0; i < vocab; ++i) {
      if (w[i] >= kth && w[i] > kNegInf) index_.push_back(i);
    }
    dense = false;
  }

  // Unnormalized softmax of logits / temperature. The max maps to exactly 1, which
  // min_p below relies on.
  const float inv_t = 1.0f / params_.temperature;
  double total = 0.0;
  if (dense) {
    const int32_t blocks = (vocab + kBlock - 1) / kBlock;
    block_sums_.resize(blocks);
    for (int32_t b = 0; b < blocks; ++b) {
      const int32_t off = b * kBlock;
      block_sums_[b] = ExpBlock(w + off, w + off, std::min(kBlock, vocab - off), max_v, inv_t);
      total += block_sums_[b];
    }
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
    const auto by_weight = [w](int32_t a, int32_t b) {
      return w[a] > w[b] || (w[a] == w[b] && a < b);
    };
    if (!dense && index_.size() <= kSortTopP) {
      std::sort(index_.begin(), index_.end(), by_weight);
      double cum = 0.0;
      size_t keep = index_.size();
      for (size_t i = 0; i < index_.size(); ++i) {
        cum += w[index_[i]];
        if (cum >= target) {
          keep = i + 1;
          break;
        }
      }
      index_.resize(keep);
    } else {
      // Sorting up to 256k candidates would dominate the step. Weights are positive
      // floats, whose bit patterns order like their values, so bucket by the top bits
      // (exponent + 3 mantissa bits): find the bucket where the mass crosses target,
      // keep every bucket above it and sort only that one.
      constexpr int kShift = 20;
      constexpr size_t kBuckets = (std::bit_cast<uint32_t>(1.0f) >> kShift) + 1;
      std::array<double, kBuckets> mass{};
      const auto bucket = [](float v) { return std::bit_cast<uint32_t>(v) >> kShift; };
      const auto for_each = [&](auto&& fn) {
        if (dense) {
          for (int32_t i = 0; i < vocab; ++i) {
            if (w[i] > 0.0f) fn(i);
          }
        } else {
          for (int32_t id : index_) {
            if (w[id] > 0.0f) fn(id);
          }
        }
      };
      for_each([&](int32_t id) { mass[bucket(w[id])] += w[id]; });
      double cum = 0.0;
      uint32_t cut = 0;
      for (size_t bk = kBuckets; bk-- > 0;) {
        if (cum + mass[bk] >= target) {
          cut = static_cast<uint32_t>(bk);
          break;
        }
        cum += mass[bk];
      }
      // scratch_ gets the ids above the cut bucket, values_-free boundary ids go to
      // the end of the same list and are sorted there.
      scratch_.clear();
      for_each([&](int32_t id) {
        if (bucket(w[id]) > cut) scratch_.push_back(id);
      });
      const size_t above = scratch_.size();
      for_each([&](int32_t id) {
        if (bucket(w[id]) == cut) scratch_.push_back(id);
      });
      std::sort(scratch_.begin() + above, scratch_.end(), by_weight);
      size_t keep = scratch_.size();  // rounding left the total just short: keep all
      for (size_t i = above; i < scratch_.size(); ++i) {
        cum += w[scratch_[i]];
        if (cum >= target) {
          keep = i + 1;
          break;
        }
      }
      scratch_.resize(keep);
      index_.swap(scratch_);
      dense = false;
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
        double sum = 0.0;
        for (int32_t i = off; i < off + len; ++i) {
          w[i] = w[i] >= min_w ? w[i] : 0.0f;
          sum += w[i];
        }
        block_sums_[b] = sum;
        total += sum;
      }
    } else {
      auto keep_end = std::remove_if(index_.begin(), index_.end(),
                                     [&](int32_t id) { return w[id] < min_w; });
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
  const size_t n = std::min<size_t>(static_cast<size_t>(params_.logprobs),
                                    static_cast<size_t>(vocab));
  // Min-heap (worst on top) of the n best (value, id) in one pass; ids arrive in
  // ascending order, so a later id only enters on a strictly larger value and ties
  // resolve to the lower id. NaN ranks as -inf.
  using Entry = std::pair<float, int32_t>;
  const auto better = [](const Entry& a, const Entry& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::vector<Entry> heap;
  heap.reserve(n);
  for (int32_t i = 0; i < vocab; ++i) {
    const float v = std::isnan(logits[i]) ? kNegInf : logits[i];
    if (heap.size() < n) {
      heap.emplace_back(v, i);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (v > heap.front().first) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {v, i};
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort(heap.begin(), heap.end(), better);
  result->top.clear();
  result->top.reserve(n);
  for (const Entry& e : heap) {
    result->top.push_back(
        {e.second, static_cast<float>(static_cast<double>(e.first) - log_sum_exp)});
  }
}

}  // namespace qshard
