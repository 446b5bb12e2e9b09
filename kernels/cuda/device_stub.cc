// Built when the CUDA language is not enabled: no device is ever reported.
#include "kernels/cuda/device.h"

namespace medakv::cuda {

bool Compiled() { return false; }
int DeviceCount() { return 0; }
absl::Status ConvertOnDevice(DType, DType, const void*, void*, int64_t) {
  return absl::FailedPreconditionError("medakv was built without CUDA");
}

}  // namespace medakv::cuda
