// Token selection on the GPU (docs/algorithm.md, MEDA step 3): the text prior,
// sinks and recent window, then per-head top-k by a segmented radix sort of
// 64-bit keys (cub::DeviceSegmentedRadixSort) whose order is exactly the CPU
// backend's RanksBefore (SelectSortKey in kernels/ops/select_math.h: class,
// then score, then the later position). The chosen positions are flagged and
// compacted in ascending order. The adjusted scores are the CPU's bit for
// bit (one exact max, one addition), so the kept sets are equal.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/cuda/compact.cuh"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/ops/select_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cuda {
namespace {

// Raw scores summed over heads in head order (shared selection).
__global__ void SumHeadsKernel(const float* __restrict__ scores, int64_t heads, int64_t tokens,
                               float* __restrict__ out) {
  MEDAKV_GRID_STRIDE(t, tokens) {
    float s = 0.f;
    for (int64_t h = 0; h < heads; ++h) s += scores[h * tokens + t];
    out[t] = s;
  }
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return b > a ? b : a; }
};

// max over t of RankableScore(scores[h, t]), one block per head.
__global__ void HeadMaxKernel(const float* __restrict__ scores, int64_t heads, int64_t tokens,
                              float* __restrict__ out) {
  using Reduce = cub::BlockReduce<float, kLinearThreads>;
  __shared__ typename Reduce::TempStorage temp;
  for (int64_t h = blockIdx.x; h < heads; h += gridDim.x) {
    float m = -INFINITY;
    for (int64_t t = threadIdx.x; t < tokens; t += blockDim.x) m = MaxOp()(m, RankableScore(scores[h * tokens + t]));
    const float total = Reduce(temp).Reduce(m, MaxOp());
    if (threadIdx.x == 0) out[h] = total;
    __syncthreads();
  }
}

// keys[h, c] for candidate positions t = sinks + c, c < pool.
__global__ void SelectKeysKernel(const float* __restrict__ scores, const uint8_t* __restrict__ modality,
                                 int64_t heads, int64_t tokens, int64_t sinks, int64_t pool,
                                 const float* __restrict__ head_max,  // [heads] or null (no additive prior)
                                 bool keep_all_text, uint64_t* __restrict__ keys) {
  MEDAKV_GRID_STRIDE(idx, heads * pool) {
    const int64_t h = idx / pool, t = sinks + (idx - h * pool);
    const bool text = modality[t] == static_cast<uint8_t>(Modality::kText);
    float s = RankableScore(scores[h * tokens + t]);
    if (head_max != nullptr && text) s += head_max[h];
    keys[idx] = SelectSortKey(keep_all_text && text ? 1 : 0, s, t);
  }
}

// flags[h, t] = 1 for sinks, the recent window and (all_candidates) every
// candidate; 0 elsewhere.
__global__ void MarkWindowsKernel(int64_t heads, int64_t tokens, int64_t sinks, int64_t recent, bool all_candidates,
                                  uint8_t* __restrict__ flags) {
  MEDAKV_GRID_STRIDE(idx, heads * tokens) {
    const int64_t t = idx % tokens;
    flags[idx] = (all_candidates || t < sinks || t >= tokens - recent) ? 1 : 0;
  }
}

// flags[h, position of the i-th ranked key] = 1 for i < take.
__global__ void MarkChosenKernel(const uint64_t* __restrict__ sorted, int64_t heads, int64_t tokens, int64_t pool,
                                 int64_t take, uint8_t* __restrict__ flags) {
  MEDAKV_GRID_STRIDE(idx, heads * take) {
    const int64_t h = idx / take, i = idx - h * take;
    flags[h * tokens + SortKeyPosition(sorted[h * pool + i])] = 1;
  }
}

__global__ void SegmentOffsetsKernel(int64_t segments, int64_t length, int* __restrict__ offsets) {
  MEDAKV_GRID_STRIDE(i, segments + 1) { offsets[i] = static_cast<int>(i * length); }
}

}  // namespace

// Sorts `heads` segments of `length` 64-bit keys each, descending, in
// batches that keep CUB's int item count in range.
static absl::Status SortSegmentsDescending(const uint64_t* in, uint64_t* out, int64_t heads, int64_t length, int end_bit,
                                    Stream& stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(heads, INT_MAX / std::max<int64_t>(length, 1)));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer offsets, DeviceBuffer::Allocate(sizeof(int) * (batch + 1), stream));
  SegmentOffsetsKernel<<<LinearBlocks(batch + 1), kLinearThreads, 0, st>>>(batch, length, offsets.as<int>());
  MEDAKV_CUDA_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  MEDAKV_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, temp_bytes, in, out, static_cast<int>(batch * length), static_cast<int>(batch), offsets.as<int>(),
      offsets.as<int>() + 1, 0, end_bit, st));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer temp, DeviceBuffer::Allocate(temp_bytes, stream));
  for (int64_t h0 = 0; h0 < heads; h0 += batch) {
    const int64_t n = std::min(batch, heads - h0);
    size_t bytes = temp.size();
    MEDAKV_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortKeysDescending(
        temp.data(), bytes, in + h0 * length, out + h0 * length, static_cast<int>(n * length),
        static_cast<int>(n), offsets.as<int>(), offsets.as<int>() + 1, 0, end_bit, st));
  }
  return absl::OkStatus();
}

absl::Status SelectTokens(const SelectArgs& a, int32_t* kept, Stream& stream) {
  MEDAKV_RETURN_IF_ERROR(ValidateSelect(a, kept));
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const SelectCounts counts = SelectWindowCounts(a);
  const int64_t sinks = counts.sinks, recent = counts.recent, tokens = a.tokens, budget = a.budget;
  const int64_t pool = tokens - recent - sinks, take = budget - recent - sinks;
  const int64_t heads = a.shared_selection ? 1 : a.kv_heads;

  const float* scores = a.scores;
  DeviceBuffer summed;
  if (a.shared_selection) {
    MEDAKV_ASSIGN_OR_RETURN(summed, DeviceBuffer::Allocate(sizeof(float) * tokens, stream));
    SumHeadsKernel<<<LinearBlocks(tokens), kLinearThreads, 0, st>>>(a.scores, a.kv_heads, tokens, summed.as<float>());
    MEDAKV_CUDA_LAUNCH_CHECK();
    scores = summed.as<float>();
  }
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer flags, DeviceBuffer::Allocate(heads * tokens, stream));
  const bool ranked = take > 0 && take < pool;
  MarkWindowsKernel<<<LinearBlocks(heads * tokens), kLinearThreads, 0, st>>>(heads, tokens, sinks, recent,
                                                                             /*all_candidates=*/take > 0 && !ranked,
                                                                             flags.as<uint8_t>());
  MEDAKV_CUDA_LAUNCH_CHECK();
  if (ranked) {
    DeviceBuffer head_max;
    if (a.text_prior == TextPrior::kAdditive) {
      MEDAKV_ASSIGN_OR_RETURN(head_max, DeviceBuffer::Allocate(sizeof(float) * heads, stream));
      HeadMaxKernel<<<static_cast<unsigned>(std::min<int64_t>(heads, 1 << 20)), kLinearThreads, 0, st>>>(
          scores, heads, tokens, head_max.as<float>());
      MEDAKV_CUDA_LAUNCH_CHECK();
    }
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer keys, DeviceBuffer::Allocate(sizeof(uint64_t) * heads * pool, stream));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer sorted, DeviceBuffer::Allocate(sizeof(uint64_t) * heads * pool, stream));
    SelectKeysKernel<<<LinearBlocks(heads * pool), kLinearThreads, 0, st>>>(
        scores, a.modality, heads, tokens, sinks, pool, head_max.as<float>(),
        a.text_prior == TextPrior::kKeepAllText, keys.as<uint64_t>());
    MEDAKV_CUDA_LAUNCH_CHECK();
    MEDAKV_RETURN_IF_ERROR(SortSegmentsDescending(keys.as<uint64_t>(), sorted.as<uint64_t>(), heads, pool, 64, stream));
    MarkChosenKernel<<<LinearBlocks(heads * take), kLinearThreads, 0, st>>>(sorted.as<uint64_t>(), heads, tokens,
                                                                            pool, take, flags.as<uint8_t>());
    MEDAKV_CUDA_LAUNCH_CHECK();
  }
  MEDAKV_RETURN_IF_ERROR(CompactFlags(flags.as<uint8_t>(), heads, tokens, 1, kept, budget, stream, "select"));
  for (int64_t h = 1; h < a.kv_heads && a.shared_selection; ++h) {
    MEDAKV_RETURN_IF_ERROR(stream.CopyOnDevice(kept + h * budget, kept, sizeof(int32_t) * budget));
  }
  return stream.Synchronize();
}

}  // namespace medakv::cuda
