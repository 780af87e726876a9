// The 2-layer Llama shape (hidden 256, 4 heads of 64, 2 KV heads, vocabulary 512) the CPU
// model tests build random models of: every format's tile and group sizes divide it, and a
// model builds and runs in milliseconds.
#ifndef QSHARD_TESTS_RUNTIME_MODEL_TINY_SHAPE_H_
#define QSHARD_TESTS_RUNTIME_MODEL_TINY_SHAPE_H_

#include "runtime/checkpoint/model_config.h"

namespace qshard::testing {

inline ModelConfig TinyLlamaShape() {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = 256;
  c.intermediate_size = 512;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.vocab_size = 512;
  c.max_position_embeddings = 128;
  c.rms_norm_eps = 1e-5;
  return c;
}

}  // namespace qshard::testing

#endif  // QSHARD_TESTS_RUNTIME_MODEL_TINY_SHAPE_H_
