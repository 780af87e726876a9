// File: small_model.h
// The small random-weights model shape the GPU model tests share: 2 layers, GQA (4 query
// heads over 2 KV heads), head_dim 64, vocab 1000 — small enough for the CPU reference,
// with every dimension a multiple of what the quantized kernels tile by.
#ifndef QSHARD_TESTS_RUNTIME_MODEL_CUDA_SMALL_MODEL_H_
#define QSHARD_TESTS_RUNTIME_MODEL_CUDA_SMALL_MODEL_H_

#include <cstdint>

#include "runtime/checkpoint/model_config.h"

namespace qshard::testing {

inline ModelConfig SmallGpuTestShape(int64_t max_positions) {
  ModelConfig c;
  c.model_type = "llama";
  c.hidden_size = 256;
  c.intermediate_size = 768;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 1000;
  c.max_position_embeddings = max_positions;
  c.rms_norm_eps = 1e-5;
  c.eos_token_ids = {2};
  c.dtype = DType::kBF16;
  return c;
}

}  // namespace qshard::testing

#endif  // QSHARD_TESTS_RUNTIME_MODEL_CUDA_SMALL_MODEL_H_
