// File: linear_weights.h
// The weights of one linear layer as read from a checkpoint, in whatever format the
// checkpoint stores them. Backends turn this into a prepared LinearOp (possibly repacked).
#ifndef QSHARD_QUANT_LINEAR_WEIGHTS_H_
#define QSHARD_QUANT_LINEAR_WEIGHTS_H_

#include <cstdint>
#include <string>

#include "runtime/base/tensor.h"

namespace qshard {

enum class WeightFormat {
  kDense,  // weight [out, in] in bf16 / f16 / f32
};

struct LinearWeights {
  std::string name;  // module name, e.g. "model.layers.0.self_attn.q_proj"
  int64_t in_features = 0;
  int64_t out_features = 0;
  WeightFormat format = WeightFormat::kDense;
  Tensor weight;  // kDense: [out_features, in_features]
  Tensor bias;    // [out_features] or empty
};

}  // namespace qshard

#endif  // QSHARD_QUANT_LINEAR_WEIGHTS_H_
