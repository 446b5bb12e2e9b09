// Stream compaction of flagged positions, per head, in ascending order
// (cub::BlockScan): out[h, k] = the k-th t with flags[h, t] == want. Used for
// the kept list of the selection and the evicted list of the merge.
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/runtime.h"

namespace medakv::cuda {
namespace compact_detail {
namespace {  // one copy per translation unit (a kernel defined in a header)

constexpr int kThreads = 256;

// One block per head (grid-stride over heads).
__global__ void __launch_bounds__(kThreads)
    CompactKernel(const uint8_t* __restrict__ flags,  // [heads, tokens]
                  int64_t heads, int64_t tokens, uint8_t want, int32_t* __restrict__ out,  // [heads, out_len]
                  int64_t out_len, int64_t* __restrict__ counts) {                        // [heads]
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  for (int64_t h = blockIdx.x; h < heads; h += gridDim.x) {
    int64_t running = 0;
    for (int64_t t0 = 0; t0 < tokens; t0 += kThreads) {
      const int64_t t = t0 + threadIdx.x;
      const int f = (t < tokens && flags[h * tokens + t] == want) ? 1 : 0;
      int offset = 0, total = 0;
      Scan(temp).ExclusiveSum(f, offset, total);
      if (f && running + offset < out_len) out[h * out_len + running + offset] = static_cast<int32_t>(t);
      running += total;
      __syncthreads();  // temp is reused by the next scan
    }
    if (threadIdx.x == 0) counts[h] = running;
  }
}

}  // namespace
}  // namespace compact_detail

// Compacts and checks that every head had exactly out_len flagged positions
// (a mismatch is an internal error: the caller's flags are wrong).
inline absl::Status CompactFlags(const uint8_t* flags, int64_t heads, int64_t tokens, uint8_t want, int32_t* out,
                                 int64_t out_len, Stream& stream, const char* what) {
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer counts, DeviceBuffer::Allocate(sizeof(int64_t) * heads, stream));
  const unsigned blocks = static_cast<unsigned>(heads < (int64_t{1} << 20) ? heads : (int64_t{1} << 20));
  compact_detail::CompactKernel<<<blocks, compact_detail::kThreads, 0, static_cast<cudaStream_t>(stream.handle())>>>(
      flags, heads, tokens, want, out, out_len, counts.as<int64_t>());
  MEDAKV_CUDA_LAUNCH_CHECK();
  std::vector<int64_t> host(heads);
  MEDAKV_RETURN_IF_ERROR(stream.Download(host.data(), counts.data(), sizeof(int64_t) * heads));
  for (int64_t h = 0; h < heads; ++h) {
    if (host[h] != out_len) {
      return absl::InternalError(
          absl::StrCat(what, ": head ", h, " has ", host[h], " positions, expected ", out_len));
    }
  }
  return absl::OkStatus();
}

}  // namespace medakv::cuda
