// Long-lived device memory, as the cache store's device tier keeps it
// (docs/store.md, "Tiers"): allocations that outlive any one request, and
// synchronous copies between them and host memory. CUDA-free header.
//
// Two implementations:
//   * MakeCudaDeviceMemory(): the current CUDA device (kernels/cuda). Blocks
//     come from cudaMallocAsync on the device's memory pool and are copied
//     through pinned staging on streams of their own, so a copy of one
//     entry overlaps other requests' work and freeing never synchronizes the
//     device.
//   * MakeEmulatedDeviceMemory(): host memory standing in for a device, so
//     that the device tier's paths (placement, eviction, copies, accounting)
//     are tested on machines without a GPU. It counts what is allocated and
//     can refuse allocations beyond a limit, as a full device would.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace medakv {

class DeviceBlock;

class DeviceMemory : public std::enable_shared_from_this<DeviceMemory> {
 public:
  virtual ~DeviceMemory() = default;
  virtual std::string_view Name() const = 0;  // "cuda", "emulated"

  // `bytes` of device memory (a 0-byte block is valid and holds nothing).
  // RESOURCE_EXHAUSTED when the device has no room; another error with the
  // device's message when it fails otherwise. Create the memory with one of
  // the Make functions (it must be owned by a shared_ptr).
  [[nodiscard]] absl::StatusOr<DeviceBlock> Allocate(size_t bytes);

  // Synchronous copies: when they return the copy is complete and the host
  // buffer may be reused. The ranges must lie within the block
  // (INVALID_ARGUMENT otherwise).
  [[nodiscard]] absl::Status CopyToDevice(DeviceBlock& dst, size_t offset, const void* src, size_t bytes);
  [[nodiscard]] absl::Status CopyToHost(void* dst, const DeviceBlock& src, size_t offset, size_t bytes);

 protected:
  // The implementation's primitives; ranges already checked, bytes > 0.
  virtual absl::StatusOr<void*> AllocateRaw(size_t bytes) = 0;
  virtual void FreeRaw(void* ptr, size_t bytes) = 0;
  virtual absl::Status Upload(void* device_dst, const void* host_src, size_t bytes) = 0;
  virtual absl::Status Download(void* host_dst, const void* device_src, size_t bytes) = 0;

 private:
  friend class DeviceBlock;
};

// One allocation of a DeviceMemory; move-only, freed when destroyed. Holds
// its memory object, so it may outlive every other reference to it.
class DeviceBlock {
 public:
  DeviceBlock() = default;
  DeviceBlock(DeviceBlock&& o) noexcept { *this = std::move(o); }
  DeviceBlock& operator=(DeviceBlock&& o) noexcept;
  DeviceBlock(const DeviceBlock&) = delete;
  DeviceBlock& operator=(const DeviceBlock&) = delete;
  ~DeviceBlock() { Reset(); }
  void Reset();

  size_t size() const { return bytes_; }
  // The device address (not dereferenceable on the host for CUDA memory).
  void* device_data() const { return ptr_; }
  // The memory it belongs to; null for an empty block.
  DeviceMemory* memory() const { return memory_.get(); }

 private:
  friend class DeviceMemory;
  std::shared_ptr<DeviceMemory> memory_;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Host memory as a device (see above). `limit_bytes` > 0: allocations that
// would take the total allocated past it are RESOURCE_EXHAUSTED.
class EmulatedDeviceMemory;
std::shared_ptr<EmulatedDeviceMemory> MakeEmulatedDeviceMemory(int64_t limit_bytes = 0);

class EmulatedDeviceMemory final : public DeviceMemory {
 public:
  explicit EmulatedDeviceMemory(int64_t limit_bytes) : limit_bytes_(limit_bytes) {}
  std::string_view Name() const override { return "emulated"; }
  int64_t allocated_bytes() const { return allocated_.load(); }  // live blocks' bytes
  int64_t allocated_blocks() const { return blocks_.load(); }     // live blocks of > 0 bytes
  int64_t copies() const { return copies_.load(); }               // CopyToDevice + CopyToHost calls

 protected:
  absl::StatusOr<void*> AllocateRaw(size_t bytes) override;
  void FreeRaw(void* ptr, size_t bytes) override;
  absl::Status Upload(void* device_dst, const void* host_src, size_t bytes) override;
  absl::Status Download(void* host_dst, const void* device_src, size_t bytes) override;

 private:
  const int64_t limit_bytes_;
  std::atomic<int64_t> allocated_{0};
  std::atomic<int64_t> blocks_{0};
  std::atomic<int64_t> copies_{0};
};

// The current CUDA device. FAILED_PRECONDITION when this binary was built
// without CUDA; a CUDA error when the device cannot be used.
[[nodiscard]] absl::StatusOr<std::shared_ptr<DeviceMemory>> MakeCudaDeviceMemory();

}  // namespace medakv
