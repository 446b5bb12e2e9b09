// Element-wise dtype conversion on the device through the shared
// MEDAKV_HOST_DEVICE functions of kernels/common/dtype.h.
#include <cuda_runtime.h>

#include <memory>

#include "kernels/common/dtype.h"
#include "kernels/common/tensor_util.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/device.h"

namespace medakv::cuda {
namespace {

template <typename From, typename To>
__global__ void ConvertKernel(const From* __restrict__ src,  // [count]
                              To* __restrict__ dst,          // [count]
                              int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    dst[i] = FromFloat<To>(ToFloat(src[i]));
  }
}

template <typename From, typename To>
cudaError_t LaunchConvert(const void* src, void* dst, int64_t count, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks64 = (count + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(blocks64 < 65535 ? blocks64 : 65535);
  ConvertKernel<From, To><<<blocks, kThreads, 0, stream>>>(static_cast<const From*>(src),
                                                            static_cast<To*>(dst), count);
  return cudaGetLastError();
}

struct DeviceFree {
  void operator()(void* p) const { cudaFree(p); }
};

}  // namespace

absl::Status ConvertOnDevice(DType from, DType to, const void* src, void* dst, int64_t count) {
  if (count < 0) return absl::InvalidArgumentError("count must be >= 0");
  if (count == 0) return absl::OkStatus();
  if (src == nullptr || dst == nullptr) return absl::InvalidArgumentError("null buffer");
  const size_t in_bytes = static_cast<size_t>(count) * DTypeSize(from);
  const size_t out_bytes = static_cast<size_t>(count) * DTypeSize(to);
  void* d_in = nullptr;
  void* d_out = nullptr;
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&d_in, in_bytes));
  std::unique_ptr<void, DeviceFree> in_guard(d_in);
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&d_out, out_bytes));
  std::unique_ptr<void, DeviceFree> out_guard(d_out);
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(d_in, src, in_bytes, cudaMemcpyHostToDevice));
  cudaError_t err = cudaErrorInvalidValue;
  absl::Status dispatch = DispatchDType(from, [&](auto in_tag) {
    using In = decltype(in_tag);
    (void)DispatchDType(to, [&](auto out_tag) {
      using Out = decltype(out_tag);
      err = LaunchConvert<In, Out>(d_in, d_out, count, nullptr);
    });
  });
  if (!dispatch.ok()) return dispatch;
  MEDAKV_CUDA_RETURN_IF_ERROR(err);
  MEDAKV_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, d_out, out_bytes, cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

}  // namespace medakv::cuda
