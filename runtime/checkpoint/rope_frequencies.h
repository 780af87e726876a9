// File: rope_frequencies.h
// Rotary embedding inverse frequencies for the RoPE variants of the Llama family.
#ifndef QSHARD_RUNTIME_CHECKPOINT_ROPE_FREQUENCIES_H_
#define QSHARD_RUNTIME_CHECKPOINT_ROPE_FREQUENCIES_H_

#include <cstdint>
#include <vector>

#include "runtime/checkpoint/model_config.h"

namespace qshard {

// inv_freq [head_dim / 2]: theta^(-2i/D), then scaled per rope type (linear: / factor;
// llama3: low frequencies / factor, high kept, smooth blend between), as transformers
// computes them (double math, rounded to float).
std::vector<float> RopeInvFrequencies(const RopeConfig& rope, int64_t head_dim);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_CHECKPOINT_ROPE_FREQUENCIES_H_
