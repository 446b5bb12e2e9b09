// Device helpers shared by the CUDA kernels: launch checks, tiles of K/Q rows
// in shared memory as fp32, warp reductions, head_dim dispatch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/dtype.h"
#include "kernels/common/tensor.h"
#include "kernels/cuda/cuda_check.h"

namespace medakv::cuda {

inline constexpr int kWarp = 32;

// Threads of the tiled kernels: 8 warps; warp w handles the tile's rows
// w, w + 8, w + 16, w + 24 and lane l its column l.
inline constexpr int kTileThreads = 256;
inline constexpr int kTileRows = 32;
inline constexpr int kTileCols = 32;
inline constexpr int kRowsPerWarp = kTileRows / (kTileThreads / kWarp);  // 4

// Shared-memory stride of one fp32 row of head_dim D: odd, so that 32 lanes
// reading 32 different rows at the same column hit 32 different banks.
template <int D>
__host__ __device__ constexpr int SmemStride() {
  return D + 1;
}

// Loads rows [first, first + count) of `head` of `view` (storage type T) as
// fp32 into smem[r * stride + d] for r < kRowsInTile; rows past `limit` (or
// listed as -1 in `index`) are zero. `index`, when given, maps tile row r to
// the tensor row index[first + r] (gathers).
template <typename T, int D, int kRowsInTile>
__device__ __forceinline__ void LoadRowsF32(const TensorView& view, int64_t head, int64_t first, int64_t limit,
                                            const int32_t* __restrict__ index, float* __restrict__ smem) {
  constexpr int kStride = SmemStride<D>();
  for (int e = threadIdx.x; e < kRowsInTile * D; e += blockDim.x) {
    const int r = e / D, d = e - (e / D) * D;
    const int64_t row = first + r;
    float x = 0.f;
    if (row < limit) {
      const int64_t t = index != nullptr ? index[row] : row;
      if (t >= 0) x = ToFloat(static_cast<const T*>(view.Row(head, t))[d]);
    }
    smem[r * kStride + d] = x;
  }
}

__device__ __forceinline__ float WarpSum(float v) {
  // Fixed butterfly: every lane ends with the same value.
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of a grid-stride loop over n elements with 256 threads per block.
inline constexpr int kLinearThreads = 256;
inline unsigned LinearBlocks(int64_t n) {
  const int64_t blocks = CeilDiv(n > 0 ? n : 1, kLinearThreads);
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}
#define MEDAKV_GRID_STRIDE(idx, n)                                                                  \
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < (n); \
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Grid dimensions beyond these are split by the callers.
inline constexpr int64_t kMaxGridY = 65535;

// Calls f(std::integral_constant<int, D>) for the supported head_dim values.
template <typename F>
absl::Status DispatchHeadDim(int64_t head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 80:
      return f(std::integral_constant<int, 80>{});
    case 96:
      return f(std::integral_constant<int, 96>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 256:
      return f(std::integral_constant<int, 256>{});
    default:
      return absl::InvalidArgumentError(absl::StrCat("head_dim ", head_dim,
                                                     " has no CUDA kernel (supported: 64, 80, 96, 128, 256)"));
  }
}

// Calls f(T{}) with T the storage type of the dtype.
template <typename F>
absl::Status DispatchStorage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16:
      return f(Half{});
    case DType::kBFloat16:
      return f(BFloat16{});
    case DType::kFloat32:
      return f(float{});
  }
  return absl::InvalidArgumentError("unsupported dtype");
}

// After a launch: a launch error (bad configuration) as a Status.
#define MEDAKV_CUDA_LAUNCH_CHECK() MEDAKV_CUDA_RETURN_IF_ERROR(cudaGetLastError())

// Dynamic shared memory above 48 KiB must be opted into per kernel.
template <typename Kernel>
absl::Status AllowSharedMemory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    MEDAKV_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  return absl::OkStatus();
}

// Streaming multiprocessors of the current device (for grid sizing).
int MultiprocessorCount();

}  // namespace medakv::cuda
