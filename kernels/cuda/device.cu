#include "kernels/cuda/device.h"

#include <cuda_runtime.h>

namespace medakv::cuda {

bool Compiled() { return true; }

int DeviceCount() {
  int count = 0;
  // No driver or no device is an answer, not an error: there is no GPU.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error
    return 0;
  }
  return count;
}

}  // namespace medakv::cuda

namespace medakv::cuda {

int MultiprocessorCount() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  return count > 0 ? count : 1;
}

}  // namespace medakv::cuda
