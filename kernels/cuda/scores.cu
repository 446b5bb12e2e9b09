// Worker-given scores summed over GQA groups, and SnapKV's pooling, on the
// GPU. Both sum in the CPU backend's order, so results equal it bit for bit.
#include <cuda_runtime.h>

#include "kernels/common/status.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/ops/pool_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cuda {
namespace {

__global__ void ReduceScoresKernel(const float* __restrict__ scores,  // [score_heads, tokens]
                                   int64_t group, int64_t kv_heads, int64_t tokens,
                                   float* __restrict__ out) {  // [kv_heads, tokens]
  MEDAKV_GRID_STRIDE(idx, kv_heads * tokens) {
    const int64_t g = idx / tokens, t = idx - g * tokens;
    float s = 0.f;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) s += scores[h * tokens + t];
    out[idx] = s;
  }
}

__global__ void PoolScoresKernel(const float* __restrict__ in, int64_t heads, int64_t tokens, int64_t length,
                                 int64_t kernel, float* __restrict__ out) {
  MEDAKV_GRID_STRIDE(idx, heads * tokens) {
    const int64_t h = idx / tokens, t = idx - h * tokens;
    const float* row = in + h * tokens;
    out[idx] = t < length ? PooledScore(row, length, t, kernel) : row[t];
  }
}

}  // namespace

absl::Status ReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads, int64_t tokens, float* out,
                          Stream& stream) {
  MEDAKV_RETURN_IF_ERROR(ValidateReduceScores(scores, score_heads, kv_heads, tokens, out, /*check_data=*/false));
  const int64_t n = kv_heads * tokens;
  ReduceScoresKernel<<<LinearBlocks(n), kLinearThreads, 0, static_cast<cudaStream_t>(stream.handle())>>>(
      scores, score_heads / kv_heads, kv_heads, tokens, out);
  MEDAKV_CUDA_LAUNCH_CHECK();
  return stream.Synchronize();
}

absl::Status PoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length, int64_t kernel, float* out,
                        Stream& stream) {
  MEDAKV_RETURN_IF_ERROR(ValidatePoolScores(in, heads, tokens, length, kernel, out));
  const int64_t n = heads * tokens;
  PoolScoresKernel<<<LinearBlocks(n), kLinearThreads, 0, static_cast<cudaStream_t>(stream.handle())>>>(
      in, heads, tokens, length, kernel, out);
  MEDAKV_CUDA_LAUNCH_CHECK();
  return stream.Synchronize();
}

}  // namespace medakv::cuda
