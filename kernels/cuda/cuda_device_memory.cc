// DeviceMemory on the current CUDA device (kernels/common/device_memory.h):
// every allocation, free and copy leases a stream of its own from a pool, so
// that copies of different entries run at once and none waits for another
// request's kernels.
#include <memory>

#include "kernels/common/device_memory.h"
#include "kernels/common/status.h"
#include "kernels/cuda/runtime.h"
#include "kernels/cuda/stream_pool.h"

namespace medakv {
namespace {

class CudaDeviceMemory final : public DeviceMemory {
 public:
  std::string_view Name() const override { return "cuda"; }

 protected:
  absl::StatusOr<void*> AllocateRaw(size_t bytes) override {
    MEDAKV_ASSIGN_OR_RETURN(cuda::StreamPool::Lease lease, pool_.Acquire());
    return cuda::AllocateLongLived(bytes, *lease);
  }

  void FreeRaw(void* ptr, size_t) override {
    // A destructor's path: an error here (a broken context) cannot be
    // returned, and the memory is lost with the context anyway.
    absl::StatusOr<cuda::StreamPool::Lease> lease = pool_.Acquire();
    if (lease.ok()) (void)cuda::FreeLongLived(ptr, **lease);
  }

  absl::Status Upload(void* device_dst, const void* host_src, size_t bytes) override {
    MEDAKV_ASSIGN_OR_RETURN(cuda::StreamPool::Lease lease, pool_.Acquire());
    return (*lease).Upload(device_dst, host_src, bytes);
  }

  absl::Status Download(void* host_dst, const void* device_src, size_t bytes) override {
    MEDAKV_ASSIGN_OR_RETURN(cuda::StreamPool::Lease lease, pool_.Acquire());
    return (*lease).Download(host_dst, device_src, bytes);
  }

 private:
  cuda::StreamPool pool_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<DeviceMemory>> MakeCudaDeviceMemory() {
  auto memory = std::make_shared<CudaDeviceMemory>();
  // One allocation up front: a device that cannot be used fails here, at start-up.
  MEDAKV_ASSIGN_OR_RETURN(DeviceBlock probe, memory->Allocate(256));
  probe.Reset();
  return memory;
}

}  // namespace medakv
