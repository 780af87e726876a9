// The cublasLt* functions the CUDA backend calls, forwarding to libcublasLt opened with
// dlopen on first use (see cublaslt_loader.h for why it is not linked). Each function
// resolves its target once; when the library cannot be loaded every call returns
// CUBLAS_STATUS_NOT_INITIALIZED and CublasLtLoadError() says what was tried.
#include "runtime/backend/cuda/cublaslt_loader.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <mutex>
#include <string>
#include <vector>

namespace qshard::cuda {
namespace {

struct Library {
  void* handle = nullptr;
  std::string error;
};

// The versioned name first (the ABI this code was compiled against), then the same file
// next to the CUDA runtime this process already uses (a toolkit outside the loader's
// search path), then the unversioned development name.
Library Open() {
  Library lib;
  const std::string soname = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
  std::vector<std::string> candidates = {soname};
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&cudaGetDeviceCount), &info) != 0 &&
      info.dli_fname != nullptr) {
    std::string dir = info.dli_fname;
    const size_t slash = dir.rfind('/');
    if (slash != std::string::npos) candidates.push_back(dir.substr(0, slash + 1) + soname);
  }
  candidates.push_back("libcublasLt.so");
  for (const std::string& path : candidates) {
    lib.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib.handle != nullptr) return lib;
    const char* e = dlerror();
    lib.error += (lib.error.empty() ? "" : "; ") + std::string(e != nullptr ? e : path.c_str());
  }
  lib.error = "cannot load cuBLASLt (" + lib.error + ")";
  return lib;
}

const Library& Lib() {
  static const Library lib = Open();
  return lib;
}

std::mutex error_mu;
std::string symbol_error;  // guarded by error_mu

template <typename F>
F Resolve(const char* name) {
  const Library& lib = Lib();
  if (lib.handle == nullptr) return nullptr;
  void* p = dlsym(lib.handle, name);
  if (p == nullptr) {
    std::lock_guard<std::mutex> lock(error_mu);
    symbol_error = std::string("cuBLASLt has no ") + name;
  }
  return reinterpret_cast<F>(p);
}

}  // namespace

std::string CublasLtLoadError() {
  std::lock_guard<std::mutex> lock(error_mu);
  return Lib().handle == nullptr ? Lib().error : symbol_error;
}

}  // namespace qshard::cuda

// Definitions with the exact signatures of cublasLt.h; `f` is the library's function.
#define QSHARD_FORWARD(ret, name, fail, params, args)                                    \
  ret CUBLASWINAPI name params {                                                         \
    static const auto f = ::qshard::cuda::Resolve<decltype(&name)>(#name);             \
    return f != nullptr ? f args : fail;                                                 \
  }

extern "C" {

#define QSHARD_NO_LIB CUBLAS_STATUS_NOT_INITIALIZED
QSHARD_FORWARD(cublasStatus_t, cublasLtCreate, QSHARD_NO_LIB, (cublasLtHandle_t * handle), (handle))
QSHARD_FORWARD(cublasStatus_t, cublasLtDestroy, QSHARD_NO_LIB, (cublasLtHandle_t handle), (handle))
QSHARD_FORWARD(const char*, cublasLtGetStatusName, "CUBLAS_STATUS_NOT_INITIALIZED", (cublasStatus_t status),
               (status))
QSHARD_FORWARD(const char*, cublasLtGetStatusString, "cuBLASLt is not loaded", (cublasStatus_t status),
               (status))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmul, QSHARD_NO_LIB,
               (cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void* alpha,
                const void* A, cublasLtMatrixLayout_t Adesc, const void* B,
                cublasLtMatrixLayout_t Bdesc, const void* beta, const void* C,
                cublasLtMatrixLayout_t Cdesc, void* D, cublasLtMatrixLayout_t Ddesc,
                const cublasLtMatmulAlgo_t* algo, void* workspace, size_t workspace_bytes,
                cudaStream_t stream),
               (handle, desc, alpha, A, Adesc, B, Bdesc, beta, C, Cdesc, D, Ddesc, algo,
                workspace, workspace_bytes, stream))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmulAlgoGetHeuristic, QSHARD_NO_LIB,
               (cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t Adesc,
                cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc,
                cublasLtMatrixLayout_t Ddesc, cublasLtMatmulPreference_t pref, int requested,
                cublasLtMatmulHeuristicResult_t results[], int* returned),
               (handle, desc, Adesc, Bdesc, Cdesc, Ddesc, pref, requested, results, returned))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmulDescCreate, QSHARD_NO_LIB,
               (cublasLtMatmulDesc_t * desc, cublasComputeType_t compute, cudaDataType_t scale),
               (desc, compute, scale))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmulDescDestroy, QSHARD_NO_LIB, (cublasLtMatmulDesc_t desc), (desc))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmulDescSetAttribute, QSHARD_NO_LIB,
               (cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const void* buf,
                size_t bytes),
               (desc, attr, buf, bytes))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmulPreferenceCreate, QSHARD_NO_LIB,
               (cublasLtMatmulPreference_t * pref), (pref))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmulPreferenceDestroy, QSHARD_NO_LIB, (cublasLtMatmulPreference_t pref),
               (pref))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatmulPreferenceSetAttribute, QSHARD_NO_LIB,
               (cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                const void* buf, size_t bytes),
               (pref, attr, buf, bytes))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatrixLayoutCreate, QSHARD_NO_LIB,
               (cublasLtMatrixLayout_t * layout, cudaDataType type, uint64_t rows, uint64_t cols,
                int64_t ld),
               (layout, type, rows, cols, ld))
QSHARD_FORWARD(cublasStatus_t, cublasLtMatrixLayoutDestroy, QSHARD_NO_LIB, (cublasLtMatrixLayout_t layout),
               (layout))
#undef QSHARD_NO_LIB

}  // extern "C"
