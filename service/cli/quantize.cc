// `qshard quantize`: writes a quantized checkpoint (AutoGPTQ, AutoAWQ GEMM or
// compressed-tensors layout) from a 16-bit one. See runtime/quantizer/model_quantizer.h.
#include <cstdio>

#include "absl/strings/str_format.h"
#include "runtime/base/log.h"
#include "runtime/quantizer/model_quantizer.h"
#include "service/cli/commands.h"

namespace qshard {

int QuantizeMain(int argc, char** argv) {
  FlagSet flags(
      "qshard quantize",
      "Quantizes a bf16/fp16 checkpoint and writes a complete model directory (config.json "
      "with quantization_config, model.safetensors, tokenizer files). rtn and gptq write the "
      "AutoGPTQ layout, awq the AutoAWQ GEMM layout, fp8 and int8 compressed-tensors "
      "(per-channel weights, dynamic per-token activations). gptq and awq calibrate on --calib "
      "layer by layer (later layers see the quantized earlier ones).");
  QuantizeOptions o;
  int64_t bits = 4;
  bool sym = false, asym = false;
  std::string log_level = "info";
  flags.AddString("model", &o.model_dir, "16-bit model directory", /*required=*/true);
  flags.AddString("out", &o.out_dir, "output directory (must not exist or be empty)",
                  /*required=*/true);
  flags.AddString("method", &o.method, "rtn | gptq | awq | fp8 | int8", /*required=*/true);
  flags.AddInt("bits", &bits, "weight bits for rtn / gptq (4 or 8) and awq (4)");
  flags.AddInt("group-size", &o.group_size, "weights per scale along the input (-1: per channel)");
  flags.AddBool("sym", &sym, "symmetric weights (default for rtn / gptq)");
  flags.AddBool("asym", &asym, "weights with a zero point (default for awq)");
  flags.AddBool("desc-act", &o.desc_act, "gptq: quantize columns in decreasing Hessian order");
  flags.AddDouble("damp-percent", &o.damp_percent, "gptq: dampening as a fraction of mean diag(H)");
  flags.AddString("calib", &o.calib_file,
                  "calibration text, one passage per line (gptq, awq; fp8: GPTQ on the e4m3 "
                  "grid instead of round-to-nearest)");
  flags.AddInt("calib-tokens", &o.calib_tokens, "calibration tokens to use (at most)");
  flags.AddInt("calib-seq-len", &o.calib_seq_len, "tokens per calibration sequence");
  flags.AddInt("awq-max-tokens", &o.awq_max_tokens,
               "awq: activation samples kept per layer input for the scale and clip searches");
  flags.AddString("eval-ppl", &o.eval_text_file,
                  "after quantizing, print the perplexity of this text (eval-ppl protocol)");
  flags.AddString("log-level", &log_level, "debug, info, warning or error");
  if (absl::Status st = flags.Parse(argc, argv); !st.ok()) return ReportFlagError("quantize", st);
  if (absl::Status st = ApplyLogLevel(log_level); !st.ok()) return ReportFlagError("quantize", st);
  if (sym && asym) {
    return ReportFlagError("quantize",
                           absl::InvalidArgumentError("--sym and --asym contradict each other"));
  }
  if (sym) o.sym = true;
  if (asym) o.sym = false;
  o.bits = static_cast<int>(bits);
  o.progress = [](const std::string& line) { QSHARD_LOG(INFO) << "quantize: " << line; };
  auto r = QuantizeModel(o);
  if (!r.ok()) return ReportFlagError("quantize", r.status());
  std::printf("wrote: %s\nquantization: %s\nlinears quantized: %lld\ncalibration tokens: %lld\n"
              "safetensors bytes: %lld\nseconds: %.1f\n",
              o.out_dir.c_str(), r->method_description.c_str(),
              static_cast<long long>(r->linears_quantized),
              static_cast<long long>(r->calib_tokens), static_cast<long long>(r->bytes_written),
              r->seconds);
  if (o.method == "gptq" || (o.method == "fp8" && !o.calib_file.empty())) {
    std::printf("gptq loss (sum over linears): %.6g\n", r->quality_metric);
  }
  if (o.method == "awq") {
    std::printf("awq scale search: mean loss reduction %.1f%%\n", 100.0 * r->quality_metric);
  }
  if (r->perplexity) std::printf("perplexity: %.4f\n", *r->perplexity);
  return 0;
}

}  // namespace qshard
