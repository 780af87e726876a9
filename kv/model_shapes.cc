#include "kv/model_shapes.h"

#include <functional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace qshard {
namespace {

// Values from each model's published config.json on the Hugging Face hub.

ModelConfig Llama(int64_t hidden, int64_t intermediate, int64_t layers, int64_t heads,
                  int64_t kv_heads, int64_t vocab, int64_t max_pos) {
  ModelConfig c;
  c.architecture = "LlamaForCausalLM";
  c.model_type = "llama";
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.vocab_size = vocab;
  c.max_position_embeddings = max_pos;
  c.rms_norm_eps = 1e-5;
  c.dtype = DType::kBF16;
  return c;
}

// Llama 3.x: 128256-token vocab, rope_theta 500000, "llama3" frequency scaling from an
// original 8192-token context.
ModelConfig Llama3(int64_t hidden, int64_t intermediate, int64_t layers, int64_t heads,
                   int64_t kv_heads, double rope_factor) {
  ModelConfig c = Llama(hidden, intermediate, layers, heads, kv_heads, 128256, 131072);
  c.bos_token_id = 128000;
  c.eos_token_ids = {128001};
  c.rope.theta = 500000.0;
  c.rope.type = RopeType::kLlama3;
  c.rope.factor = rope_factor;
  c.rope.low_freq_factor = 1.0;
  c.rope.high_freq_factor = 4.0;
  c.rope.original_max_position_embeddings = 8192;
  return c;
}

// Llama 2 / Mistral / TinyLlama: SentencePiece 32000-token vocab with bos 1, eos 2.
ModelConfig SentencePieceLlama(int64_t hidden, int64_t intermediate, int64_t layers, int64_t heads,
                               int64_t kv_heads, int64_t max_pos) {
  ModelConfig c = Llama(hidden, intermediate, layers, heads, kv_heads, 32000, max_pos);
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  c.rope.theta = 10000.0;
  return c;
}

struct Shape {
  const char* name;
  std::function<ModelConfig()> make;
};

const std::vector<Shape>& Shapes() {
  static const std::vector<Shape>* shapes = new std::vector<Shape>{
      {"llama-3.1-8b", [] { return Llama3(4096, 14336, 32, 32, 8, 8.0); }},
      {"llama-3.1-70b", [] { return Llama3(8192, 28672, 80, 64, 8, 8.0); }},
      {"llama-3.2-1b",
       [] {
         ModelConfig c = Llama3(2048, 8192, 16, 32, 8, 32.0);
         c.tie_word_embeddings = true;
         return c;
       }},
      {"llama-2-7b",
       [] {
         ModelConfig c = SentencePieceLlama(4096, 11008, 32, 32, 32, 4096);
         c.dtype = DType::kF16;
         return c;
       }},
      // Mistral-7B-v0.1 (sliding window 4096 over a 32768 context; the window does not change
      // what a full-length sequence's KV cache needs in a paged cache without window eviction).
      {"mistral-7b",
       [] {
         ModelConfig c = SentencePieceLlama(4096, 14336, 32, 32, 8, 32768);
         c.architecture = "MistralForCausalLM";
         c.model_type = "mistral";
         return c;
       }},
      // Qwen2.5-7B: biases on q/k/v only (attention_bias covers them here).
      {"qwen2.5-7b",
       [] {
         ModelConfig c = Llama(3584, 18944, 28, 28, 4, 152064, 131072);
         c.architecture = "Qwen2ForCausalLM";
         c.model_type = "qwen2";
         c.rms_norm_eps = 1e-6;
         c.attention_bias = true;
         c.bos_token_id = 151643;
         c.eos_token_ids = {151643};
         c.rope.theta = 1000000.0;
         return c;
       }},
      // TinyLlama-1.1B (3T-token checkpoint / Chat v1.0).
      {"tinyllama-1.1b", [] { return SentencePieceLlama(2048, 5632, 22, 32, 4, 2048); }},
  };
  return *shapes;
}

}  // namespace

std::vector<std::string> ModelShapeNames() {
  std::vector<std::string> names;
  for (const Shape& s : Shapes()) names.push_back(s.name);
  return names;
}

absl::StatusOr<ModelConfig> ModelShapeByName(const std::string& name) {
  for (const Shape& s : Shapes()) {
    if (name == s.name) return s.make();
  }
  return absl::NotFoundError(absl::StrCat(
      "unknown model shape '", name, "'; known shapes: ", absl::StrJoin(ModelShapeNames(), ", ")));
}

}  // namespace qshard
