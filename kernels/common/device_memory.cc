#include "kernels/common/device_memory.h"

#include <cstring>
#include <new>
#include <utility>

#include "absl/strings/str_cat.h"

namespace medakv {
namespace {

absl::Status CheckRange(const char* what, const DeviceBlock& block, size_t offset, size_t bytes) {
  if (offset > block.size() || bytes > block.size() - offset) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": [", offset, ", ", offset, " + ", bytes,
                                                   ") is outside the block of ", block.size(), " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DeviceBlock> DeviceMemory::Allocate(size_t bytes) {
  DeviceBlock block;
  if (bytes == 0) return block;
  absl::StatusOr<void*> ptr = AllocateRaw(bytes);
  if (!ptr.ok()) return ptr.status();
  block.memory_ = shared_from_this();
  block.ptr_ = *ptr;
  block.bytes_ = bytes;
  return block;
}

absl::Status DeviceMemory::CopyToDevice(DeviceBlock& dst, size_t offset, const void* src, size_t bytes) {
  if (absl::Status s = CheckRange("copy to device", dst, offset, bytes); !s.ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  if (dst.memory_.get() != this) return absl::InvalidArgumentError("copy to device: the block is not of this memory");
  return Upload(static_cast<char*>(dst.ptr_) + offset, src, bytes);
}

absl::Status DeviceMemory::CopyToHost(void* dst, const DeviceBlock& src, size_t offset, size_t bytes) {
  if (absl::Status s = CheckRange("copy to host", src, offset, bytes); !s.ok()) return s;
  if (bytes == 0) return absl::OkStatus();
  if (src.memory_.get() != this) return absl::InvalidArgumentError("copy to host: the block is not of this memory");
  return Download(dst, static_cast<const char*>(src.ptr_) + offset, bytes);
}

DeviceBlock& DeviceBlock::operator=(DeviceBlock&& o) noexcept {
  if (this != &o) {
    Reset();
    memory_ = std::move(o.memory_);
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceBlock::Reset() {
  if (ptr_ != nullptr) memory_->FreeRaw(ptr_, bytes_);
  memory_.reset();
  ptr_ = nullptr;
  bytes_ = 0;
}

std::shared_ptr<EmulatedDeviceMemory> MakeEmulatedDeviceMemory(int64_t limit_bytes) {
  return std::make_shared<EmulatedDeviceMemory>(limit_bytes);
}

absl::StatusOr<void*> EmulatedDeviceMemory::AllocateRaw(size_t bytes) {
  const int64_t n = static_cast<int64_t>(bytes);
  int64_t before = allocated_.load();
  do {
    if (limit_bytes_ > 0 && (n > limit_bytes_ || before > limit_bytes_ - n)) {
      return absl::ResourceExhaustedError(absl::StrCat("emulated device memory: ", bytes, " bytes do not fit (",
                                                       before, " of ", limit_bytes_, " bytes allocated)"));
    }
  } while (!allocated_.compare_exchange_weak(before, before + n));
  void* ptr = ::operator new(bytes, std::nothrow);
  if (ptr == nullptr) {
    allocated_.fetch_sub(n);
    return absl::ResourceExhaustedError(absl::StrCat("emulated device memory: out of host memory for ", bytes,
                                                     " bytes"));
  }
  blocks_.fetch_add(1);
  return ptr;
}

void EmulatedDeviceMemory::FreeRaw(void* ptr, size_t bytes) {
  ::operator delete(ptr);
  allocated_.fetch_sub(static_cast<int64_t>(bytes));
  blocks_.fetch_sub(1);
}

absl::Status EmulatedDeviceMemory::Upload(void* device_dst, const void* host_src, size_t bytes) {
  copies_.fetch_add(1);
  std::memcpy(device_dst, host_src, bytes);
  return absl::OkStatus();
}

absl::Status EmulatedDeviceMemory::Download(void* host_dst, const void* device_src, size_t bytes) {
  copies_.fetch_add(1);
  std::memcpy(host_dst, device_src, bytes);
  return absl::OkStatus();
}

}  // namespace medakv
