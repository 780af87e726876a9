#include "runtime/checkpoint/rope_frequencies.h"

#include <cmath>

namespace qshard {

std::vector<float> RopeInvFrequencies(const RopeConfig& rope, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<float> out(half);
  const double kPi = 3.14159265358979323846;
  for (int64_t i = 0; i < half; ++i) {
    // transformers computes base ** (arange(0, dim, 2).float() / dim) in float32.
    float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    double inv = 1.0 / std::pow(rope.theta, static_cast<double>(exponent));
    switch (rope.type) {
      case RopeType::kDefault:
        break;
      case RopeType::kLinear:
        inv /= rope.factor;
        break;
      case RopeType::kLlama3: {
        // Llama 3.1: wavelengths longer than old_len / low_freq_factor are slowed by
        // `factor`; shorter than old_len / high_freq_factor kept; smooth blend between.
        const double old_len = static_cast<double>(rope.original_max_position_embeddings);
        const double low_wavelen = old_len / rope.low_freq_factor;
        const double high_wavelen = old_len / rope.high_freq_factor;
        const double wavelen = 2.0 * kPi / inv;
        if (wavelen > low_wavelen) {
          inv /= rope.factor;
        } else if (wavelen >= high_wavelen) {
          double smooth = (old_len / wavelen - rope.low_freq_factor) /
                          (rope.high_freq_factor - rope.low_freq_factor);
          inv = (1.0 - smooth) * inv / rope.factor + smooth * inv;
        }
        break;
      }
    }
    out[i] = static_cast<float>(inv);
  }
  return out;
}

}  // namespace qshard
