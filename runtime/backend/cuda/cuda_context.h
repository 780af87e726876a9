// File: cuda_context.h
// Owning wrappers for the CUDA objects the backend holds (device memory, streams) and the
// device query. Everything that can fail returns absl::Status; nothing aborts, so a
// process without a GPU (CI, a laptop) can probe with CudaDeviceAvailable() and go on.
//
//   if (!cuda::CudaDeviceAvailable()) return;           // CPU-only machine
//   QSHARD_ASSIGN_OR_RETURN(cuda::DeviceInfo info, cuda::QueryDevice(0));
//   QSHARD_ASSIGN_OR_RETURN(cuda::CudaStream stream, cuda::CudaStream::Create());
//   QSHARD_ASSIGN_OR_RETURN(cuda::DeviceBuffer buf, cuda::DeviceBuffer::Allocate(bytes));
//   QSHARD_RETURN_IF_ERROR(buf.CopyFromHost(host_ptr, bytes, stream.get()));
#ifndef QSHARD_RUNTIME_BACKEND_CUDA_CUDA_CONTEXT_H_
#define QSHARD_RUNTIME_BACKEND_CUDA_CUDA_CONTEXT_H_

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qshard::cuda {

// True when the CUDA runtime loads, a driver is present and at least one device is
// visible. Never fails loudly: on a machine without a GPU or driver it returns false.
bool CudaDeviceAvailable();

// The value of the on/off environment switch `name` (QSHARD_CUDA_*): default_on switches are
// turned off by "0", default-off ones turned on by "1"; anything else leaves the default.
bool EnvSwitch(const char* name, bool default_on);

// A process-wide on/off switch that starts from EnvSwitch(name, default_on) and can be
// flipped at run time (tests, benchmarks); reads and writes are relaxed atomics. Kept in a
// function-local static, so the environment is read on first use:
//   EnvFlag& Flag() { static EnvFlag f("QSHARD_CUDA_X", false); return f; }
class EnvFlag {
 public:
  EnvFlag(const char* name, bool default_on) : on_(EnvSwitch(name, default_on)) {}
  void Set(bool on) { on_.store(on, std::memory_order_relaxed); }
  bool Get() const { return on_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> on_;
};

// What the backend needs to know about one device, read once at start.
struct DeviceInfo {
  int ordinal = 0;
  std::string name;  // "NVIDIA H100 80GB HBM3"
  int cc_major = 0;  // compute capability, e.g. 9.0 for Hopper
  int cc_minor = 0;
  int multiprocessors = 0;
  int64_t total_memory_bytes = 0;
  int64_t free_memory_bytes = 0;  // at query time
  int64_t l2_cache_bytes = 0;
  int64_t max_shared_memory_per_block_optin = 0;  // after cudaFuncSetAttribute opt-in
  int driver_version = 0;                         // e.g. 13000 for CUDA 13.0
  int runtime_version = 0;

  // "cuda:0 NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB, driver 13.0)"
  std::string ToString() const;
};

// Number of visible devices (0 when there is no driver or no device).
int CudaDeviceCount();
// Queries device `ordinal` and makes it current for the calling thread.
absl::StatusOr<DeviceInfo> QueryDevice(int ordinal = 0);

// Kernel scratch that ops grow lazily and share between calls (the linears' split-K
// partials, activation codes, act-order gathers) is baked into captured CUDA graphs as
// launch arguments. Whoever frees or replaces such a buffer bumps this process-wide
// generation, and the backend drops its graphs when it changes.
uint64_t ScratchGeneration();
void BumpScratchGeneration();

// Whether the linear kernels are launched with programmatic dependent launch (pdl.cuh):
// on by default where the current device has compute capability 9.0 or more, unless the
// environment sets QSHARD_CUDA_PDL=0; SetProgrammaticLaunch overrides both (benchmarks
// compare the two in one run).
bool ProgrammaticLaunchEnabled();
void SetProgrammaticLaunch(bool enabled);
// A per-thread veto on top of that (default: allowed): the CUDA backend allows PDL only for
// steps of few tokens, where it measured faster.
void SetProgrammaticLaunchForThisThread(bool allowed);

// An owning device allocation (cudaMalloc: 256-byte aligned). Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Allocates `bytes` on the current device (contents undefined). Zero bytes gives an
  // empty buffer with a null pointer.
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes);

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return bytes_; }

  // Blocking copies: they return once the data has arrived (the stream is synchronized),
  // so the host memory may be reused at once. `bytes` must not exceed size().
  absl::Status CopyFromHost(const void* src, size_t bytes, cudaStream_t stream);
  absl::Status CopyToHost(void* dst, size_t bytes, cudaStream_t stream) const;
  // Sets every byte to `value`, asynchronously on `stream` (0xFF poisons fp32/bf16 with NaN).
  absl::Status Fill(uint8_t value, cudaStream_t stream);

 private:
  void Release();

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// An owning non-blocking CUDA stream (it does not synchronize with the legacy default
// stream, so work on it overlaps with other libraries' default-stream work). Move-only.
class CudaStream {
 public:
  CudaStream() = default;
  ~CudaStream();
  CudaStream(CudaStream&& other) noexcept;
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;

  static absl::StatusOr<CudaStream> Create();

  cudaStream_t get() const { return stream_; }
  // Waits for all work queued so far; reports faults raised inside earlier kernels.
  absl::Status Synchronize() const;

 private:
  void Release();

  cudaStream_t stream_ = nullptr;
};

}  // namespace qshard::cuda

#endif  // QSHARD_RUNTIME_BACKEND_CUDA_CUDA_CONTEXT_H_
