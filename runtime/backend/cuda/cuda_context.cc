#include "runtime/backend/cuda/cuda_context.h"

#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/backend/cuda/cuda_check.h"
#include "runtime/backend/cuda/cublaslt_loader.h"

namespace qshard::cuda {
namespace internal {

absl::Status CudaErrorToStatus(cudaError_t err, const char* expr, const char* file, int line) {
  const std::string message = absl::StrCat(std::string(expr), " failed at ", std::string(file), ":",
                                           line, ": ", std::string(cudaGetErrorName(err)), " (",
                                           std::string(cudaGetErrorString(err)), ")");
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(message);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorDevicesUnavailable:
      return absl::UnavailableError(message);
    case cudaErrorInvalidValue:
    case cudaErrorInvalidConfiguration:
      return absl::InvalidArgumentError(message);
    default:
      return absl::InternalError(message);
  }
}

absl::Status CublasErrorToStatus(cublasStatus_t status, const char* expr, const char* file,
                                 int line) {
  const std::string load_error = CublasLtLoadError();
  const std::string message = absl::StrCat(
      std::string(expr), " failed at ", std::string(file), ":", line, ": ",
      std::string(cublasLtGetStatusName(status)), " (",
      std::string(cublasLtGetStatusString(status)), ")",
      load_error.empty() ? "" : absl::StrCat(": ", load_error));
  switch (status) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::ResourceExhaustedError(message);
    case CUBLAS_STATUS_INVALID_VALUE:
      return absl::InvalidArgumentError(message);
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return absl::UnimplementedError(message);
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace internal

int CudaDeviceCount() {
  int count = 0;
  // Without a driver this returns cudaErrorInsufficientDriver / cudaErrorNoDevice; the
  // error is not sticky, but clear it so no later check reports it as its own.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

bool CudaDeviceAvailable() { return CudaDeviceCount() > 0; }

std::string DeviceInfo::ToString() const {
  const double gib = static_cast<double>(total_memory_bytes) / (1024.0 * 1024.0 * 1024.0);
  return absl::StrFormat("cuda:%d %s (sm_%d%d, %d SMs, %.1f GiB, driver %d.%d)", ordinal, name,
                         cc_major, cc_minor, multiprocessors, gib, driver_version / 1000,
                         (driver_version % 1000) / 10);
}

bool EnvSwitch(const char* name, bool default_on) {
  const char* env = std::getenv(name);
  if (env == nullptr) return default_on;
  const std::string_view v(env);
  return default_on ? v != "0" : v == "1";
}

absl::StatusOr<DeviceInfo> QueryDevice(int ordinal) {
  const int count = CudaDeviceCount();
  if (ordinal < 0 || ordinal >= count) {
    return absl::NotFoundError(
        absl::StrCat("CUDA device ", ordinal, " not found (", count, " visible)"));
  }
  QSHARD_CUDA_RETURN_IF_ERROR(cudaSetDevice(ordinal));
  cudaDeviceProp prop{};
  QSHARD_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, ordinal));
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));

  DeviceInfo info;
  info.ordinal = ordinal;
  info.name = prop.name;
  info.cc_major = prop.major;
  info.cc_minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  info.total_memory_bytes = static_cast<int64_t>(total_bytes);
  info.free_memory_bytes = static_cast<int64_t>(free_bytes);
  info.l2_cache_bytes = prop.l2CacheSize;
  info.max_shared_memory_per_block_optin = static_cast<int64_t>(prop.sharedMemPerBlockOptin);
  QSHARD_CUDA_RETURN_IF_ERROR(cudaDriverGetVersion(&info.driver_version));
  QSHARD_CUDA_RETURN_IF_ERROR(cudaRuntimeGetVersion(&info.runtime_version));
  return info;
}

// ---------------------------------------------------------------------------
// DeviceBuffer
// ---------------------------------------------------------------------------

DeviceBuffer::~DeviceBuffer() { Release(); }

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::Release() {
  if (ptr_ != nullptr) {
    // A destructor cannot report: a failing cudaFree means the context is already broken
    // (sticky error), which the next checked call reports.
    (void)cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
}

namespace {
std::atomic<uint64_t> g_scratch_generation{0};
}  // namespace

uint64_t ScratchGeneration() { return g_scratch_generation.load(std::memory_order_acquire); }
void BumpScratchGeneration() { g_scratch_generation.fetch_add(1, std::memory_order_acq_rel); }

namespace {
// -1: not decided yet; 0 / 1: off / on.
std::atomic<int> g_pdl{-1};
thread_local bool t_pdl_allowed = true;
}  // namespace

void SetProgrammaticLaunchForThisThread(bool allowed) { t_pdl_allowed = allowed; }

bool ProgrammaticLaunchEnabled() {
  if (!t_pdl_allowed) return false;
  int v = g_pdl.load(std::memory_order_acquire);
  if (v < 0) {
    int device = 0, major = 0;
    const bool env_off = !EnvSwitch("QSHARD_CUDA_PDL", /*default_on=*/true);
    v = (!env_off && cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
             cudaSuccess &&
         major >= 9)
            ? 1
            : 0;
    g_pdl.store(v, std::memory_order_release);
  }
  return v == 1;
}

void SetProgrammaticLaunch(bool enabled) {
  g_pdl.store(enabled ? 1 : 0, std::memory_order_release);
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  DeviceBuffer buf;
  if (bytes == 0) return buf;
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // an allocation failure is not sticky: clear it
    return internal::CudaErrorToStatus(err, absl::StrCat("cudaMalloc(", bytes, " bytes)").c_str(),
                                       __FILE__, __LINE__);
  }
  buf.ptr_ = p;
  buf.bytes_ = bytes;
  return buf;
}

absl::Status DeviceBuffer::CopyFromHost(const void* src, size_t bytes, cudaStream_t stream) {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyFromHost: ", bytes, " bytes into a buffer of ", bytes_));
  }
  if (bytes == 0) return absl::OkStatus();
  QSHARD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ptr_, src, bytes, cudaMemcpyHostToDevice, stream));
  QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status DeviceBuffer::CopyToHost(void* dst, size_t bytes, cudaStream_t stream) const {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyToHost: ", bytes, " bytes from a buffer of ", bytes_));
  }
  if (bytes == 0) return absl::OkStatus();
  QSHARD_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, ptr_, bytes, cudaMemcpyDeviceToHost, stream));
  QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status DeviceBuffer::Fill(uint8_t value, cudaStream_t stream) {
  if (bytes_ == 0) return absl::OkStatus();
  QSHARD_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ptr_, value, bytes_, stream));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// CudaStream
// ---------------------------------------------------------------------------

CudaStream::~CudaStream() { Release(); }

CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    Release();
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

void CudaStream::Release() {
  if (stream_ != nullptr) {
    (void)cudaStreamDestroy(stream_);  // see DeviceBuffer::Release for why unchecked
    stream_ = nullptr;
  }
}

absl::StatusOr<CudaStream> CudaStream::Create() {
  CudaStream s;
  QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s.stream_, cudaStreamNonBlocking));
  return s;
}

absl::Status CudaStream::Synchronize() const {
  QSHARD_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
  return absl::OkStatus();
}

}  // namespace qshard::cuda
