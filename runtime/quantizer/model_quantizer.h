// File: model_quantizer.h
// `qshard quantize`: turns a 16-bit Llama checkpoint into a quantized one that qshard and
// other servers load (AutoGPTQ, AutoAWQ GEMM or compressed-tensors layout).
//
// Calibrating methods run the model itself (CPU backend) over the calibration text, one
// decoder layer at a time: pass l stops after layer l, whose linear inputs are observed
// (GPTQ: Hessians; AWQ: activation samples); layer l is then quantized and its linears are
// replaced in the running model by their quantized versions, so layer l+1 calibrates on the
// outputs of the already-quantized layers 0..l (AutoGPTQ's sequential order).
//
//   QuantizeOptions o;
//   o.model_dir = "models/kjv-llama-12m"; o.out_dir = "/tmp/q"; o.method = "gptq";
//   o.calib_file = "../shared/data/kjv-calib.txt";
//   QSHARD_ASSIGN_OR_RETURN(QuantizeReport r, QuantizeModel(o));
#ifndef QSHARD_RUNTIME_QUANTIZER_MODEL_QUANTIZER_H_
#define QSHARD_RUNTIME_QUANTIZER_MODEL_QUANTIZER_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qshard {

struct QuantizeOptions {
  std::string model_dir;  // a bf16 / fp16 / fp32 checkpoint
  std::string out_dir;    // must not exist, or be empty
  // rtn | gptq (AutoGPTQ layout), awq (AutoAWQ GEMM), fp8 | int8 (compressed-tensors,
  // per-channel weights, dynamic per-token activations). fp8 with calib_file runs GPTQ on
  // the e4m3 grid (same layout, better codes); without it, round-to-nearest.
  std::string method;
  int bits = 4;                // rtn / gptq: 4 or 8; awq: 4
  int64_t group_size = 128;    // -1: one group per output channel
  std::optional<bool> sym;     // default: symmetric for rtn / gptq, zero point for awq
  bool desc_act = false;       // gptq: act-order
  double damp_percent = 0.01;  // gptq: dampening, fraction of mean(diag(H))
  std::string calib_file;      // gptq / awq (required), fp8 (optional): one passage per line
  int64_t calib_tokens = 65536;   // tokens of calibration text used (at most)
  int64_t calib_seq_len = 512;    // tokens per calibration sequence
  int64_t awq_max_tokens = 8192;  // awq: activation samples kept per layer input
  // Evaluate the quantized model right after quantizing (perplexity protocol of the
  // shared fixtures, 256-token windows), when non-empty.
  std::string eval_text_file;
  // Progress lines ("layer 3 of 22 ... elapsed 12.0 s, ETA 30.1 s").
  std::function<void(const std::string&)> progress;
};

struct QuantizeReport {
  std::string method_description;  // QuantizationConfig::Describe() of what was written
  int64_t calib_tokens = 0;        // calibration tokens actually used
  int64_t bytes_written = 0;       // safetensors bytes
  int64_t linears_quantized = 0;
  double seconds = 0;
  // gptq: sum of the per-linear GPTQ losses; awq: mean relative loss reduction of the
  // scale search; 0 otherwise.
  double quality_metric = 0;
  std::optional<double> perplexity;  // with eval_text_file
};

// Validates the options (errors name the flag), quantizes and writes out_dir atomically
// (a temporary sibling folder renamed at the end; nothing is left behind on error).
absl::StatusOr<QuantizeReport> QuantizeModel(const QuantizeOptions& options);

}  // namespace qshard

#endif  // QSHARD_RUNTIME_QUANTIZER_MODEL_QUANTIZER_H_
