#include "runtime/backend/backend.h"

#include "absl/strings/str_cat.h"
#include "runtime/backend/cpu/cpu_backend.h"
#include "runtime/base/log.h"

#if defined(QSHARD_HAVE_CUDA_MODEL_BACKEND)
#include "runtime/backend/cuda/cuda_backend.h"
#endif

namespace qshard {

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const std::string& device) {
  if (device == "cpu") return CreateCpuBackend();
  if (device == "cuda" || device == "auto") {
#if defined(QSHARD_WITH_CUDA) && defined(QSHARD_HAVE_CUDA_MODEL_BACKEND)
    auto cuda = CreateCudaBackend();
    if (cuda.ok() || device == "cuda") return cuda;
    QSHARD_LOG(INFO) << "no usable GPU (" << cuda.status().message() << "); using the CPU";
#else
    if (device == "cuda") {
      return absl::UnimplementedError(
          "--device cuda: this build has no CUDA model backend yet; use --device cpu");
    }
#endif
    return CreateCpuBackend();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device: unknown value '", device, "'; expected cpu, cuda or auto"));
}

}  // namespace qshard
