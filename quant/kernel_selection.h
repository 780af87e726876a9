// File: kernel_selection.h
// The seed's decision flowchart as a pure function: from the device, the checkpoint's
// quantization and the --quantization flag to the linear-layer kernel and why.
//
//   | device                        | checkpoint / flag                 | kernel                  |
//   | sm89 (Ada), sm90+ (Hopper+)   | fp8 ckpt or --quantization fp8    | FP8 W8A8 (cuBLASLt)     |
//   | sm80+                         | gptq / awq / pack-quantized 4|8b  | Marlin-style W4A16/W8A16|
//   | sm80-86                       | fp8 checkpoint                    | FP8 weight-only (Marlin)|
//   | sm75+                         | int8 W8A8                         | INT8 GEMM (cuBLASLt)    |
//   | CPU                           | any                               | SIMD fused dequant      |
//
//   auto choice = SelectKernel(DeviceInfo::Cuda(90, 80e9), ckpt_quant, "auto").value();
//   QSHARD_LOG(INFO) << "Using " << choice.kernel << ": " << choice.reason;
#ifndef QSHARD_QUANT_KERNEL_SELECTION_H_
#define QSHARD_QUANT_KERNEL_SELECTION_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "quant/quant_config.h"

namespace qshard {

struct DeviceInfo {
  bool cuda = false;
  int sm = 0;                 // compute capability x 10 + minor (sm_90 -> 90); 0 on the CPU
  int64_t memory_bytes = 0;
  static DeviceInfo Cpu() { return {}; }
  static DeviceInfo Cuda(int sm, int64_t memory_bytes = 0) { return {true, sm, memory_bytes}; }
  std::string Name() const;   // "cpu", "sm90"
};

struct KernelChoice {
  std::string kernel;   // stable id: "fp8-w8a8-cublaslt", "marlin-w4a16", "cpu-simd-gptq", ...
  std::string method;   // the effective quantization method ("none", "fp8", "gptq", ...)
  std::string reason;   // one sentence for the log line and `qshard inspect`
  std::string warning;  // non-empty when the flag picks a slower path than auto-detection
  // Online quantization at load time (--quantization fp8|int8 on a 16-bit checkpoint).
  bool quantize_at_load = false;
};

// requested: "auto" (or ""), "none", "fp8", "int8", "gptq", "awq", "compressed-tensors".
// Errors: an unknown value, a flag that contradicts the checkpoint (the message says what
// the checkpoint holds), and device/format pairs no kernel serves.
absl::StatusOr<KernelChoice> SelectKernel(const DeviceInfo& device,
                                          const QuantizationConfig& checkpoint,
                                          const std::string& requested);

}  // namespace qshard

#endif  // QSHARD_QUANT_KERNEL_SELECTION_H_
