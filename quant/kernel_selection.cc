#include "quant/kernel_selection.h"

#include "absl/strings/str_cat.h"

namespace qshard {
namespace {

// The families a checkpoint + flag resolve to, independent of the device.
enum class Family { kDense, kFp8, kInt8, kWeightInt };

std::string SmText(int sm) { return absl::StrCat(sm / 10, ".", sm % 10); }

Family FamilyOf(const QuantizationConfig& q) {
  switch (q.method) {
    case QuantMethod::kNone:
      return Family::kDense;
    case QuantMethod::kFp8:
      return Family::kFp8;
    case QuantMethod::kInt8:
      return Family::kInt8;
    case QuantMethod::kGptq:
    case QuantMethod::kAwq:
      return Family::kWeightInt;
    case QuantMethod::kCompressedTensors:
      if (q.compressed_format == CompressedFormat::kFloatQuantized) return Family::kFp8;
      if (q.compressed_format == CompressedFormat::kIntQuantized &&
          q.activation != ActivationScheme::kNone) {
        return Family::kInt8;
      }
      return Family::kWeightInt;
  }
  return Family::kDense;
}

}  // namespace

std::string DeviceInfo::Name() const { return cuda ? absl::StrCat("sm", sm) : "cpu"; }

absl::StatusOr<KernelChoice> SelectKernel(const DeviceInfo& device,
                                          const QuantizationConfig& ckpt,
                                          const std::string& requested) {
  const std::string req = requested.empty() ? "auto" : requested;
  const std::string held = ckpt.quantized() ? ckpt.Describe() : "unquantized 16-bit weights";
  KernelChoice c;
  Family family = FamilyOf(ckpt);
  c.method = std::string(QuantMethodName(ckpt.method));

  // 1) Reconcile the flag with the checkpoint.
  if (req == "fp8" || req == "int8") {
    if (!ckpt.quantized()) {
      family = req == "fp8" ? Family::kFp8 : Family::kInt8;
      c.method = req;
      c.quantize_at_load = true;
    } else if (FamilyOf(ckpt) != (req == "fp8" ? Family::kFp8 : Family::kInt8)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--quantization ", req, " contradicts the checkpoint, which holds ", held,
          " (from ", ckpt.source, "); drop the flag or use --quantization auto"));
    }
  } else if (req == "gptq" || req == "awq" || req == "compressed-tensors") {
    const bool match = (req == "gptq" && ckpt.method == QuantMethod::kGptq) ||
                       (req == "awq" && ckpt.method == QuantMethod::kAwq) ||
                       (req == "compressed-tensors" &&
                        ckpt.method == QuantMethod::kCompressedTensors);
    if (!match) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--quantization ", req, " needs a ", req, " checkpoint, but this one holds ", held,
          (ckpt.quantized() ? "" : "; quantize it first with `qshard quantize`")));
    }
  } else if (req == "none") {
    if (ckpt.quantized()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--quantization none contradicts the checkpoint, which holds ", held,
          "; qshard runs quantized checkpoints in their own format"));
    }
  } else if (req != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("--quantization: unknown value '", req,
                     "'; expected auto, none, fp8, int8, gptq, awq or compressed-tensors"));
  }

  // 2) The device decides the kernel.
  if (!device.cuda) {
    switch (family) {
      case Family::kDense:
        c.kernel = "cpu-simd-dense";
        c.reason = "16-bit weights on the CPU: fp32 math on bf16/fp16 weights read in place";
        break;
      case Family::kFp8:
        c.kernel = "cpu-simd-fp8";
        c.reason = "FP8 weights on the CPU: fused e4m3 dequantize-and-multiply";
        break;
      case Family::kInt8:
        c.kernel = "cpu-simd-int8";
        c.reason = "INT8 W8A8 on the CPU: per-token int8 activations, integer dot products";
        break;
      case Family::kWeightInt:
        c.kernel = absl::StrCat("cpu-simd-w", ckpt.bits, "a16");
        c.reason = absl::StrCat(held, " on the CPU: fused dequantize-and-multiply, no "
                                      "dequantized copy kept");
        break;
    }
    return c;
  }
  const int sm = device.sm;
  if (sm < 75) {
    return absl::FailedPreconditionError(absl::StrCat(
        "compute capability ", SmText(sm), " is not supported (qshard needs 7.5 or newer)"));
  }
  switch (family) {
    case Family::kDense:
      c.kernel = sm >= 80 ? "cublaslt-bf16" : "cublaslt-fp16";
      c.reason = sm >= 80 ? "16-bit weights: cuBLASLt BF16 GEMM"
                          : "16-bit weights on Turing (no bf16 tensor cores): cuBLASLt FP16 GEMM";
      return c;
    case Family::kFp8:
      if (sm >= 89) {
        c.kernel = "fp8-w8a8-cublaslt";
        c.reason = absl::StrCat("FP8 tensor cores on sm", sm,
                                ": per-token e4m3 activations x per-channel e4m3 weights "
                                "(cuBLASLt, own GEMV for decode)");
      } else if (sm >= 80) {
        c.kernel = "fp8-weight-only-marlin";
        c.reason = absl::StrCat("no FP8 tensor cores on sm", sm,
                                ": FP8 weights dequantized inside a Marlin-style W8A16 kernel");
      } else {
        return absl::FailedPreconditionError(absl::StrCat(
            "FP8 needs compute capability 8.0 or newer (weight-only) or 8.9+ (W8A8); this GPU "
            "is ", SmText(sm)));
      }
      if (c.quantize_at_load && sm < 89) {
        c.warning = "--quantization fp8 on a GPU without FP8 tensor cores runs weight-only: "
                    "expect little speed-up over bf16";
      }
      return c;
    case Family::kInt8:
      c.kernel = "int8-w8a8-cublaslt";
      c.reason = absl::StrCat("INT8 tensor cores on sm", sm,
                              ": per-token int8 activations x per-channel int8 weights");
      if (c.quantize_at_load && sm >= 89) {
        c.warning = absl::StrCat("--quantization int8 on sm", sm,
                                 " is slower than --quantization fp8 (FP8 W8A8 with the same "
                                 "memory and better accuracy)");
      }
      return c;
    case Family::kWeightInt:
      if (sm < 80) {
        return absl::FailedPreconditionError(absl::StrCat(
            held, " needs the Marlin-style kernel, which needs compute capability 8.0 or "
                  "newer (async copies, bf16 tensor cores); this GPU is ",
            SmText(sm)));
      }
      if (ckpt.bits != 4 && ckpt.bits != 8) {
        return absl::InvalidArgumentError(
            absl::StrCat(held, ": only 4- and 8-bit weights have a GPU kernel"));
      }
      c.kernel = ckpt.bits == 4 ? "marlin-w4a16" : "marlin-w8a16";
      c.reason = absl::StrCat("Using Marlin kernel for ", held,
                              ": weights repacked into tensor-core fragments, dequantized in "
                              "the GEMM main loop");
      return c;
  }
  return c;
}

}  // namespace qshard
