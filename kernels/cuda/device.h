// CUDA device discovery. Safe to call in every build: without CUDA compiled
// in, or without a device, DeviceCount() is 0. Never includes cuda_runtime.h.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"

namespace medakv::cuda {

// Whether this binary was built with the CUDA backend.
bool Compiled();

// Number of usable CUDA devices (0 when none, or when the driver is missing).
int DeviceCount();

// Converts `count` elements from dtype `from` to dtype `to` on the current
// device, through the shared MEDAKV_HOST_DEVICE conversions; host pointers in
// and out (the copy to and from the device is done here). Used by the gpu
// tests to check that device arithmetic matches the host bit for bit.
[[nodiscard]] absl::Status ConvertOnDevice(DType from, DType to, const void* src, void* dst,
                                           int64_t count);

}  // namespace medakv::cuda
