// The CUDA runtime as the backend uses it, behind a CUDA-free header so that
// host code (the backend wrapper, tests, benchmarks) needs no CUDA headers:
//   * Stream: one caller's CUDA stream plus its pinned host staging buffers.
//   * DeviceBuffer: stream-ordered device memory from the device's memory
//     pool (cudaMallocAsync; the pool keeps freed memory, so after warm-up no
//     request reaches cudaMalloc on the hot path).
//   * Copies between host and device through pinned staging: a pageable host
//     buffer is copied in 8 MiB chunks into two pinned buffers in turn, so
//     the host's memcpy of one chunk overlaps the DMA of the previous one.
// Every CUDA error becomes an absl::Status carrying CUDA's message; nothing
// aborts. Without CUDA compiled in, every call is FAILED_PRECONDITION.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace medakv::cuda {

class Stream {
 public:
  static absl::StatusOr<std::unique_ptr<Stream>> Create();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  void* handle() const { return stream_; }  // cudaStream_t
  [[nodiscard]] absl::Status Synchronize();

  // Host -> device and device -> host copies through the pinned staging
  // buffers; both return when the copy has completed (the host buffer may
  // be reused at once). Device -> device is asynchronous on the stream.
  [[nodiscard]] absl::Status Upload(void* device_dst, const void* host_src, size_t bytes);
  [[nodiscard]] absl::Status Download(void* host_dst, const void* device_src, size_t bytes);
  [[nodiscard]] absl::Status CopyOnDevice(void* device_dst, const void* device_src, size_t bytes);
  [[nodiscard]] absl::Status Memset(void* device_dst, int value, size_t bytes);

 private:
  Stream() = default;
  void* stream_ = nullptr;
  static constexpr int kStaging = 2;
  void* staging_[kStaging] = {nullptr, nullptr};  // pinned host buffers
  void* events_[kStaging] = {nullptr, nullptr};   // last copy through each
};

// Device memory owned by one stream; freed in stream order when destroyed.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, Stream& stream);
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  ~DeviceBuffer() { Reset(); }
  void Reset();

  void* data() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  void* stream_ = nullptr;
};

// Long-lived device memory (the cache store's device tier): taken from the
// device's memory pool in `stream`'s order and synchronized before returning,
// so that any stream may use it at once. RESOURCE_EXHAUSTED when the device
// is out of memory. FreeLongLived gives it back in `stream`'s order (no
// device-wide synchronization); the caller must have finished using it.
[[nodiscard]] absl::StatusOr<void*> AllocateLongLived(size_t bytes, Stream& stream);
[[nodiscard]] absl::Status FreeLongLived(void* ptr, Stream& stream);

// Size of the staging chunks.
inline constexpr size_t kStagingBytes = size_t{8} << 20;

}  // namespace medakv::cuda
