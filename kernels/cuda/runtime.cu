#include "kernels/cuda/runtime.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "kernels/common/status.h"
#include "kernels/cuda/cuda_check.h"

namespace medakv::cuda {
namespace {

// Once per process: the current device's default memory pool keeps what is
// freed (release threshold: never), so cudaMallocAsync reuses it.
absl::Status ConfigurePoolOnce() {
  static std::once_flag once;
  static absl::Status status;
  std::call_once(once, [] {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    cudaMemPool_t pool = nullptr;
    if (err == cudaSuccess) err = cudaDeviceGetDefaultMemPool(&pool, device);
    uint64_t threshold = UINT64_MAX;
    if (err == cudaSuccess) err = cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold);
    status.Update(CudaStatus(err, "configuring the device memory pool", __FILE__, __LINE__));
  });
  return status;
}

cudaStream_t S(void* s) { return static_cast<cudaStream_t>(s); }
cudaEvent_t E(void* e) { return static_cast<cudaEvent_t>(e); }

}  // namespace

absl::StatusOr<std::unique_ptr<Stream>> Stream::Create() {
  MEDAKV_RETURN_IF_ERROR(ConfigurePoolOnce());
  std::unique_ptr<Stream> s(new Stream());
  cudaStream_t stream = nullptr;
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  s->stream_ = stream;
  for (int i = 0; i < kStaging; ++i) {
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&s->staging_[i], kStagingBytes, cudaHostAllocDefault));
    cudaEvent_t ev = nullptr;
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    s->events_[i] = ev;
  }
  return s;
}

Stream::~Stream() {
  if (stream_ != nullptr) (void)cudaStreamSynchronize(S(stream_));
  for (int i = 0; i < kStaging; ++i) {
    if (events_[i] != nullptr) (void)cudaEventDestroy(E(events_[i]));
    if (staging_[i] != nullptr) (void)cudaFreeHost(staging_[i]);
  }
  if (stream_ != nullptr) (void)cudaStreamDestroy(S(stream_));
}

absl::Status Stream::Synchronize() {
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(S(stream_)));
  return absl::OkStatus();
}

absl::Status Stream::Upload(void* device_dst, const void* host_src, size_t bytes) {
  const char* src = static_cast<const char*>(host_src);
  char* dst = static_cast<char*>(device_dst);
  int slot = 0;
  for (size_t off = 0; off < bytes; off += kStagingBytes, slot ^= 1) {
    const size_t n = std::min(kStagingBytes, bytes - off);
    // The slot's previous DMA must be done before its memory is refilled.
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(E(events_[slot])));
    std::memcpy(staging_[slot], src + off, n);
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst + off, staging_[slot], n, cudaMemcpyHostToDevice, S(stream_)));
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(E(events_[slot]), S(stream_)));
  }
  // Both slots drained: the caller may reuse or free the host buffer, and
  // the staging buffers are free for the next copy.
  for (int i = 0; i < kStaging; ++i) MEDAKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(E(events_[i])));
  return absl::OkStatus();
}

absl::Status Stream::Download(void* host_dst, const void* device_src, size_t bytes) {
  const char* src = static_cast<const char*>(device_src);
  char* dst = static_cast<char*>(host_dst);
  // Chunk k is copied into slot k % 2 while the host drains chunk k - 1.
  size_t pending_off = 0, pending_n = 0;
  int pending_slot = -1, slot = 0;
  for (size_t off = 0; off < bytes; off += kStagingBytes, slot ^= 1) {
    const size_t n = std::min(kStagingBytes, bytes - off);
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(staging_[slot], src + off, n, cudaMemcpyDeviceToHost, S(stream_)));
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(E(events_[slot]), S(stream_)));
    if (pending_slot >= 0) {
      MEDAKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(E(events_[pending_slot])));
      std::memcpy(dst + pending_off, staging_[pending_slot], pending_n);
    }
    pending_off = off;
    pending_n = n;
    pending_slot = slot;
  }
  if (pending_slot >= 0) {
    MEDAKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(E(events_[pending_slot])));
    std::memcpy(dst + pending_off, staging_[pending_slot], pending_n);
  }
  return absl::OkStatus();
}

absl::Status Stream::CopyOnDevice(void* device_dst, const void* device_src, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device_dst, device_src, bytes, cudaMemcpyDeviceToDevice, S(stream_)));
  return absl::OkStatus();
}

absl::Status Stream::Memset(void* device_dst, int value, size_t bytes) {
  if (bytes == 0) return absl::OkStatus();
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(device_dst, value, bytes, S(stream_)));
  return absl::OkStatus();
}

absl::StatusOr<void*> AllocateLongLived(size_t bytes, Stream& stream) {
  void* ptr = nullptr;
  const cudaError_t err = cudaMallocAsync(&ptr, bytes, S(stream.handle()));
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // not sticky: clear it so that later launch checks do not see it
    return absl::ResourceExhaustedError(
        absl::StrCat("the CUDA device has no room for ", bytes, " more bytes: ", cudaGetErrorString(err)));
  }
  MEDAKV_CUDA_RETURN_IF_ERROR(err);
  if (absl::Status s = stream.Synchronize(); !s.ok()) {
    (void)cudaFreeAsync(ptr, S(stream.handle()));
    return s;
  }
  return ptr;
}

absl::Status FreeLongLived(void* ptr, Stream& stream) {
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaFreeAsync(ptr, S(stream.handle())));
  return absl::OkStatus();
}

absl::StatusOr<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes, Stream& stream) {
  DeviceBuffer b;
  b.stream_ = stream.handle();
  b.bytes_ = bytes;
  if (bytes == 0) return b;
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&b.ptr_, bytes, S(stream.handle())));
  return b;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    Reset();
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    stream_ = o.stream_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (ptr_ != nullptr) (void)cudaFreeAsync(ptr_, S(stream_));
  ptr_ = nullptr;
  bytes_ = 0;
}

}  // namespace medakv::cuda
