// The kernel-selection matrix: devices (CPU, sm75 .. sm100) x checkpoint formats x flags.
#include "gtest/gtest.h"
#include "quant/kernel_selection.h"

namespace qshard {
namespace {

QuantizationConfig Parse(const std::string& json) {
  auto q = ParseQuantizationConfig(json, "test config.json");
  EXPECT_TRUE(q.ok()) << q.status();
  return q.ok() ? *q : QuantizationConfig();
}

QuantizationConfig None() { return QuantizationConfig(); }
QuantizationConfig Gptq4() {
  return Parse(R"({"quant_method":"gptq","bits":4,"group_size":128,"sym":true,"desc_act":false})");
}
QuantizationConfig Gptq8() {
  return Parse(R"({"quant_method":"gptq","bits":8,"group_size":128,"sym":true,"desc_act":false})");
}
QuantizationConfig Awq4() {
  return Parse(R"({"quant_method":"awq","bits":4,"group_size":128,"zero_point":true,"version":"gemm"})");
}
QuantizationConfig Fp8() {
  return Parse(R"({"quant_method":"fp8","activation_scheme":"dynamic"})");
}

struct Row {
  DeviceInfo device;
  const char* format;
  const char* want;  // kernel id, or "error"
};

TEST(KernelSelectionTest, MatrixOfDevicesAndFormats) {
  const DeviceInfo cpu = DeviceInfo::Cpu(), sm75 = DeviceInfo::Cuda(75), sm80 = DeviceInfo::Cuda(80),
                   sm86 = DeviceInfo::Cuda(86), sm89 = DeviceInfo::Cuda(89),
                   sm90 = DeviceInfo::Cuda(90), sm100 = DeviceInfo::Cuda(100);
  const Row rows[] = {
      {cpu, "none", "cpu-simd-dense"},     {cpu, "gptq4", "cpu-simd-w4a16"},
      {cpu, "awq4", "cpu-simd-w4a16"},     {cpu, "fp8", "cpu-simd-fp8"},
      {cpu, "gptq8", "cpu-simd-w8a16"},
      {sm75, "none", "cublaslt-fp16"},     {sm75, "gptq4", "error"},
      {sm75, "awq4", "error"},             {sm75, "fp8", "error"},
      {sm80, "none", "cublaslt-bf16"},     {sm80, "gptq4", "marlin-w4a16"},
      {sm80, "awq4", "marlin-w4a16"},      {sm80, "gptq8", "marlin-w8a16"},
      {sm80, "fp8", "fp8-weight-only-marlin"},
      {sm86, "none", "cublaslt-bf16"},     {sm86, "gptq4", "marlin-w4a16"},
      {sm86, "fp8", "fp8-weight-only-marlin"},
      {sm89, "none", "cublaslt-bf16"},     {sm89, "gptq4", "marlin-w4a16"},
      {sm89, "fp8", "fp8-w8a8-cublaslt"},
      {sm90, "none", "cublaslt-bf16"},     {sm90, "gptq4", "marlin-w4a16"},
      {sm90, "awq4", "marlin-w4a16"},      {sm90, "fp8", "fp8-w8a8-cublaslt"},
      {sm100, "none", "cublaslt-bf16"},    {sm100, "awq4", "marlin-w4a16"},
      {sm100, "fp8", "fp8-w8a8-cublaslt"},
  };
  for (const Row& r : rows) {
    const std::string f = r.format;
    QuantizationConfig q = f == "none" ? None()
                           : f == "gptq4" ? Gptq4()
                           : f == "gptq8" ? Gptq8()
                           : f == "awq4"  ? Awq4()
                                          : Fp8();
    auto c = SelectKernel(r.device, q, "auto");
    if (std::string(r.want) == "error") {
      EXPECT_FALSE(c.ok()) << r.device.Name() << " " << f;
      if (!c.ok()) {
        EXPECT_NE(c.status().message().find("7.5"), std::string::npos) << c.status();
      }
    } else {
      ASSERT_TRUE(c.ok()) << r.device.Name() << " " << f << ": " << c.status();
      EXPECT_EQ(c->kernel, r.want) << r.device.Name() << " " << f;
      EXPECT_FALSE(c->reason.empty());
    }
  }
}

TEST(KernelSelectionTest, MarlinReasonNamesTheFormat) {
  auto c = SelectKernel(DeviceInfo::Cuda(80), Gptq4(), "auto");
  ASSERT_TRUE(c.ok());
  EXPECT_NE(c->reason.find("Using Marlin kernel for gptq 4-bit"), std::string::npos) << c->reason;
}

TEST(KernelSelectionTest, OnlineQuantizationFlags) {
  auto fp8 = SelectKernel(DeviceInfo::Cuda(90), None(), "fp8");
  ASSERT_TRUE(fp8.ok());
  EXPECT_EQ(fp8->kernel, "fp8-w8a8-cublaslt");
  EXPECT_TRUE(fp8->quantize_at_load);
  EXPECT_TRUE(fp8->warning.empty());
  // int8 on Hopper works but fp8 would be faster: a warning, not an error.
  auto int8 = SelectKernel(DeviceInfo::Cuda(90), None(), "int8");
  ASSERT_TRUE(int8.ok());
  EXPECT_EQ(int8->kernel, "int8-w8a8-cublaslt");
  EXPECT_NE(int8->warning.find("slower"), std::string::npos);
  auto int8_turing = SelectKernel(DeviceInfo::Cuda(75), None(), "int8");
  ASSERT_TRUE(int8_turing.ok());
  EXPECT_TRUE(int8_turing->warning.empty());
  // fp8 on Ampere is weight-only: allowed with a warning.
  auto fp8_a100 = SelectKernel(DeviceInfo::Cuda(80), None(), "fp8");
  ASSERT_TRUE(fp8_a100.ok());
  EXPECT_EQ(fp8_a100->kernel, "fp8-weight-only-marlin");
  EXPECT_FALSE(fp8_a100->warning.empty());
  auto cpu = SelectKernel(DeviceInfo::Cpu(), None(), "int8");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(cpu->kernel, "cpu-simd-int8");
}

TEST(KernelSelectionTest, ContradictionsAreErrorsSayingWhatTheCheckpointHolds) {
  auto a = SelectKernel(DeviceInfo::Cuda(90), Gptq4(), "fp8");
  ASSERT_FALSE(a.ok());
  EXPECT_NE(a.status().message().find("gptq 4-bit"), std::string::npos) << a.status();
  auto b = SelectKernel(DeviceInfo::Cuda(90), None(), "gptq");
  ASSERT_FALSE(b.ok());
  EXPECT_NE(b.status().message().find("unquantized"), std::string::npos) << b.status();
  auto c = SelectKernel(DeviceInfo::Cuda(90), Fp8(), "none");
  ASSERT_FALSE(c.ok());
  auto d = SelectKernel(DeviceInfo::Cuda(90), Awq4(), "gptq");
  ASSERT_FALSE(d.ok());
  auto e = SelectKernel(DeviceInfo::Cuda(90), None(), "nf4");
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().message().find("expected auto, none, fp8"), std::string::npos);
  // Matching explicit flags are fine.
  EXPECT_TRUE(SelectKernel(DeviceInfo::Cuda(90), Gptq4(), "gptq").ok());
  EXPECT_TRUE(SelectKernel(DeviceInfo::Cuda(90), Fp8(), "fp8").ok());
  EXPECT_TRUE(SelectKernel(DeviceInfo::Cuda(90), None(), "none").ok());
}

TEST(KernelSelectionTest, ImpossibleDevicesAreErrors) {
  auto old = SelectKernel(DeviceInfo::Cuda(70), None(), "auto");
  ASSERT_FALSE(old.ok());
  EXPECT_NE(old.status().message().find("7.0"), std::string::npos);
  auto marlin = SelectKernel(DeviceInfo::Cuda(75), Awq4(), "auto");
  ASSERT_FALSE(marlin.ok());
  EXPECT_NE(marlin.status().message().find("8.0"), std::string::npos) << marlin.status();
}

}  // namespace
}  // namespace qshard
