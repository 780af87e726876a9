// File: model_shapes.h
// Published shapes of well-known models as ModelConfig values, for planning memory
// (`qshard plan --shape NAME`) and for dummy-weight benchmarks (`--load-format dummy
// --shape NAME`) without downloading a checkpoint.
//
//   QSHARD_ASSIGN_OR_RETURN(ModelConfig cfg, ModelShapeByName("llama-3.1-8b"));
#ifndef QSHARD_KV_MODEL_SHAPES_H_
#define QSHARD_KV_MODEL_SHAPES_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/checkpoint/model_config.h"

namespace qshard {

// The config.json of the named model (base, not instruct, variants): dimensions, vocab,
// context length, RoPE (with Llama 3.1/3.2 "llama3" scaling), tying, biases, dtype, bos/eos.
// An unknown name is NotFound listing every known name.
absl::StatusOr<ModelConfig> ModelShapeByName(const std::string& name);
// The known names, in a stable order.
std::vector<std::string> ModelShapeNames();

}  // namespace qshard

#endif  // QSHARD_KV_MODEL_SHAPES_H_
