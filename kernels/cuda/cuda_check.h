// CUDA error handling: every CUDA call's error becomes an absl::Status with
// the file, line and CUDA's message. Nothing aborts. Include only from .cu files.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace medakv::cuda {

inline absl::Status CudaStatus(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(file, ":", line, ": ", expr, ": ", cudaGetErrorName(err), ": ",
                                          cudaGetErrorString(err)));
}

}  // namespace medakv::cuda

#define MEDAKV_CUDA_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                       \
    ::absl::Status medakv_cuda_status_ = ::medakv::cuda::CudaStatus((expr), #expr, __FILE__, __LINE__); \
    if (!medakv_cuda_status_.ok()) return medakv_cuda_status_;                               \
  } while (false)
