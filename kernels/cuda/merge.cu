// Merging evicted tokens into kept ones and compaction, on the GPU
// (docs/algorithm.md, MEDA step 4; LOOK-M's PIVOTAL and WEIGHTED rules):
//   1. evicted positions per head (flags of the kept list, compacted);
//   2. kept keys as fp32 and their norms;
//   3. MergeArgmaxKernel: the most similar kept key of every evicted key, a
//      tiled all-pairs cosine in shared memory with BetterTarget's total
//      order (ties to the lower kept index, NaN never wins), reduced over
//      lanes (any order gives the same winner);
//   4. MEAN threshold: per-token head-averaged cosine, the mean over tokens
//      summed on the host in the CPU's order;
//   5. (target, evicted index) pairs sorted per head (64-bit keys, so the
//      order is total and needs no stable sort), each target's segment found
//      by binary search;
//   6. per (kept row, element) the contributions summed in ascending evicted
//      order, finalised and written in the input dtype and layout.
// This file is compiled with --fmad=false: with no fused multiply-adds the
// dot products, cosines and sums round exactly as the CPU backend's (same
// functions, same order), so the output equals the CPU's bit for bit.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/cuda/compact.cuh"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/ops/attention_math.h"
#include "kernels/ops/merge_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cuda {
namespace {

template <typename T>
__global__ void GatherKernel(TensorView in, const int32_t* __restrict__ kept, int64_t budget,
                             MutableTensorView out) {
  const int64_t d = in.head_dim;
  MEDAKV_GRID_STRIDE(idx, in.heads * budget * d) {
    const int64_t row = idx / d, x = idx - row * d;
    const int64_t h = row / budget, b = row - h * budget;
    static_cast<T*>(out.Row(h, b))[x] = static_cast<const T*>(in.Row(h, kept[row]))[x];
  }
}

__global__ void MarkKeptKernel(const int32_t* __restrict__ kept, int64_t heads, int64_t budget, int64_t tokens,
                               uint8_t* __restrict__ flags) {  // zeroed [heads, tokens]
  MEDAKV_GRID_STRIDE(idx, heads * budget) {
    const int64_t h = idx / budget;
    flags[h * tokens + kept[idx]] = 1;
  }
}

// One warp per kept row: fp32 copy and norm.
template <typename T, int D>
__global__ void KeptRowsKernel(TensorView key, const int32_t* __restrict__ kept, int64_t budget,
                               float* __restrict__ kept_f32,     // [heads, budget, D]
                               float* __restrict__ kept_norm) {  // [heads, budget]
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
       row < key.heads * budget; row += warps) {
    const int64_t h = row / budget;
    const T* src = static_cast<const T*>(key.Row(h, kept[row]));
    float* dst = kept_f32 + row * D;
    for (int x = lane; x < D; x += kWarp) dst[x] = ToFloat(src[x]);
    __syncwarp();
    if (lane == 0) kept_norm[row] = sqrtf(DotF32(dst, dst, D));
    __syncwarp();
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads)
    MergeArgmaxKernel(TensorView key, const int32_t* __restrict__ evicted,  // [heads, evicted_len]
                      int64_t evicted_len, const float* __restrict__ kept_f32, const float* __restrict__ kept_norm,
                      int64_t budget, int32_t* __restrict__ target,  // [heads, evicted_len]
                      float* __restrict__ cosine) {                  // [heads, evicted_len]
  extern __shared__ float smem[];
  constexpr int kStride = SmemStride<D>();
  float* e_s = smem;                          // [kTileRows][kStride]
  float* k_s = e_s + kTileRows * kStride;     // [kTileCols][kStride]
  float* e_norm = k_s + kTileCols * kStride;  // [kTileRows]
  float* k_norm = e_norm + kTileRows;         // [kTileCols]
  const int64_t h = blockIdx.y;
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  LoadRowsF32<T, D, kTileRows>(key, h, e0, evicted_len, evicted + h * evicted_len, e_s);
  __syncthreads();
  if (threadIdx.x < kTileRows) {
    const float* r = e_s + threadIdx.x * kStride;
    e_norm[threadIdx.x] = sqrtf(DotF32(r, r, D));
  }
  float best[kRowsPerWarp];
  int64_t best_j[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) best[k] = NAN, best_j[k] = 0;
  for (int64_t b0 = 0; b0 < budget; b0 += kTileCols) {
    __syncthreads();
    for (int e = threadIdx.x; e < kTileCols * D; e += blockDim.x) {
      const int c = e / D, x = e - (e / D) * D;
      k_s[c * kStride + x] = b0 + c < budget ? kept_f32[(h * budget + b0 + c) * D + x] : 0.f;
    }
    if (threadIdx.x < kTileCols) {
      k_norm[threadIdx.x] = b0 + threadIdx.x < budget ? kept_norm[h * budget + b0 + threadIdx.x] : 0.f;
    }
    __syncthreads();
    const int64_t j = b0 + lane;
    if (j < budget) {
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const int r = warp + 8 * k;
        const float c =
            CosineFromDot(DotF32(e_s + r * kStride, k_s + lane * kStride, D), e_norm[r], k_norm[lane]);
        if (BetterTarget(c, j, best[k], best_j[k])) best[k] = c, best_j[k] = j;
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, best[k], off);
      const int64_t oj = __shfl_xor_sync(0xffffffffu, best_j[k], off);
      if (BetterTarget(ov, oj, best[k], best_j[k])) best[k] = ov, best_j[k] = oj;
    }
    const int64_t e = e0 + warp + 8 * k;
    if (lane == 0 && e < evicted_len) {
      target[h * evicted_len + e] = static_cast<int32_t>(best_j[k]);
      cosine[h * evicted_len + e] = best[k] != best[k] ? 0.f : best[k];
    }
  }
}

// MEAN threshold, per token: the mean over the heads that evicted it of
// the best cosine (double, heads in order, as the CPU backend).
__global__ void TokenMeanCosineKernel(const uint8_t* __restrict__ kept_flags, const float* __restrict__ dense_cos,
                                      int64_t heads, int64_t tokens, double* __restrict__ mean_cos,
                                      int32_t* __restrict__ count) {
  MEDAKV_GRID_STRIDE(t, tokens) {
    double s = 0.0;
    int32_t n = 0;
    for (int64_t h = 0; h < heads; ++h) {
      if (kept_flags[h * tokens + t] == 0) {
        s += dense_cos[h * tokens + t];
        ++n;
      }
    }
    mean_cos[t] = n > 0 ? s / n : 0.0;
    count[t] = n;
  }
}

__global__ void ScatterCosineKernel(const int32_t* __restrict__ evicted, const float* __restrict__ cosine,
                                    int64_t heads, int64_t evicted_len, int64_t tokens,
                                    float* __restrict__ dense_cos) {
  MEDAKV_GRID_STRIDE(idx, heads * evicted_len) {
    const int64_t h = idx / evicted_len;
    dense_cos[h * tokens + evicted[idx]] = cosine[idx];
  }
}

// Sort keys: (target << 32) | evicted index; evicted tokens that are not
// merged (MEAN threshold) get target = budget, past every segment.
__global__ void PairKeysKernel(const int32_t* __restrict__ target, const int32_t* __restrict__ evicted,
                               const double* __restrict__ mean_cos,  // [tokens] or null
                               double threshold, int64_t heads, int64_t evicted_len, int64_t budget,
                               uint64_t* __restrict__ keys) {
  MEDAKV_GRID_STRIDE(idx, heads * evicted_len) {
    const int64_t i = idx % evicted_len;
    const bool merge = mean_cos == nullptr || mean_cos[evicted[idx]] >= threshold;
    const uint64_t t = merge ? static_cast<uint64_t>(target[idx]) : static_cast<uint64_t>(budget);
    keys[idx] = (t << 32) | static_cast<uint64_t>(i);
  }
}

__device__ __forceinline__ int64_t LowerBound(const uint64_t* __restrict__ a, int64_t n, uint64_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < v) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void SegmentBoundsKernel(const uint64_t* __restrict__ sorted, int64_t heads, int64_t evicted_len,
                                    int64_t budget, int64_t* __restrict__ begin, int64_t* __restrict__ end) {
  MEDAKV_GRID_STRIDE(idx, heads * budget) {
    const int64_t h = idx / budget, j = idx - h * budget;
    const uint64_t* s = sorted + h * evicted_len;
    begin[idx] = LowerBound(s, evicted_len, static_cast<uint64_t>(j) << 32);
    end[idx] = LowerBound(s, evicted_len, static_cast<uint64_t>(j + 1) << 32);
  }
}

template <typename T>
__global__ void AccumulateKernel(TensorView key, TensorView value, const int32_t* __restrict__ kept,
                                 const int32_t* __restrict__ evicted, const float* __restrict__ cosine,
                                 const uint64_t* __restrict__ sorted, const int64_t* __restrict__ seg_begin,
                                 const int64_t* __restrict__ seg_end, const float* __restrict__ kept_f32,
                                 int64_t budget, int64_t evicted_len, MergeMode mode, MutableTensorView out_key,
                                 MutableTensorView out_value) {
  const int64_t d = key.head_dim;
  MEDAKV_GRID_STRIDE(idx, key.heads * budget * d) {
    const int64_t row = idx / d, x = idx - row * d;
    const int64_t h = row / budget, j = row - h * budget;
    const int64_t kj = kept[row];
    const int64_t n = seg_end[row] - seg_begin[row];
    if (n == 0) {
      static_cast<T*>(out_key.Row(h, j))[x] = static_cast<const T*>(key.Row(h, kj))[x];
      static_cast<T*>(out_value.Row(h, j))[x] = static_cast<const T*>(value.Row(h, kj))[x];
      continue;
    }
    const float kk = kept_f32[row * d + x];
    const float vj = ToFloat(static_cast<const T*>(value.Row(h, kj))[x]);
    float sk = 0.f, sv = 0.f;
    for (int64_t m = seg_begin[row]; m < seg_end[row]; ++m) {
      const int64_t i = static_cast<int64_t>(sorted[h * evicted_len + m] & 0xffffffffu);
      const int64_t e = evicted[h * evicted_len + i];
      const float c = cosine[h * evicted_len + i];
      sk += MergeContribution(mode, c, ToFloat(static_cast<const T*>(key.Row(h, e))[x]), kk);
      sv += MergeContribution(mode, c, ToFloat(static_cast<const T*>(value.Row(h, e))[x]), vj);
    }
    static_cast<T*>(out_key.Row(h, j))[x] = FromFloat<T>(MergeFinalize(kk, sk, n));
    static_cast<T*>(out_value.Row(h, j))[x] = FromFloat<T>(MergeFinalize(vj, sv, n));
  }
}

__global__ void SegmentOffsetsKernel(int64_t segments, int64_t length, int* __restrict__ offsets) {
  MEDAKV_GRID_STRIDE(i, segments + 1) { offsets[i] = static_cast<int>(i * length); }
}

absl::Status SortSegmentsAscending(const uint64_t* in, uint64_t* out, int64_t heads, int64_t length, int end_bit,
                                   Stream& stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(heads, INT_MAX / std::max<int64_t>(length, 1)));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer offsets, DeviceBuffer::Allocate(sizeof(int) * (batch + 1), stream));
  SegmentOffsetsKernel<<<LinearBlocks(batch + 1), kLinearThreads, 0, st>>>(batch, length, offsets.as<int>());
  MEDAKV_CUDA_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  MEDAKV_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortKeys(
      nullptr, temp_bytes, in, out, static_cast<int>(batch * length), static_cast<int>(batch), offsets.as<int>(),
      offsets.as<int>() + 1, 0, end_bit, st));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer temp, DeviceBuffer::Allocate(temp_bytes, stream));
  for (int64_t h0 = 0; h0 < heads; h0 += batch) {
    const int64_t n = std::min(batch, heads - h0);
    size_t bytes = temp.size();
    MEDAKV_CUDA_RETURN_IF_ERROR(cub::DeviceSegmentedRadixSort::SortKeys(
        temp.data(), bytes, in + h0 * length, out + h0 * length, static_cast<int>(n * length), static_cast<int>(n),
        offsets.as<int>(), offsets.as<int>() + 1, 0, end_bit, st));
  }
  return absl::OkStatus();
}

int BitsFor(int64_t v) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) <= v) ++bits;
  return bits;
}

template <typename T, int D>
absl::Status RunMerge(const MergeArgs& a, const MutableTensorView& out_key, const MutableTensorView& out_value,
                      Stream& stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const int64_t heads = a.key.heads, tokens = a.key.tokens, budget = a.budget, evicted_len = tokens - budget;
  if (heads > kMaxGridY) {
    return absl::InvalidArgumentError(absl::StrCat("merge: ", heads, " heads exceed the CUDA grid"));
  }
  // 1. Evicted positions.
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer flags, DeviceBuffer::Allocate(heads * tokens, stream));
  MEDAKV_RETURN_IF_ERROR(stream.Memset(flags.data(), 0, flags.size()));
  MarkKeptKernel<<<LinearBlocks(heads * budget), kLinearThreads, 0, st>>>(a.kept, heads, budget, tokens,
                                                                          flags.as<uint8_t>());
  MEDAKV_CUDA_LAUNCH_CHECK();
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer evicted, DeviceBuffer::Allocate(sizeof(int32_t) * heads * evicted_len, stream));
  MEDAKV_RETURN_IF_ERROR(
      CompactFlags(flags.as<uint8_t>(), heads, tokens, 0, evicted.as<int32_t>(), evicted_len, stream, "merge"));

  // 2. Kept keys in fp32, and norms.
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer kept_f32, DeviceBuffer::Allocate(sizeof(float) * heads * budget * D, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer kept_norm, DeviceBuffer::Allocate(sizeof(float) * heads * budget, stream));
  KeptRowsKernel<T, D><<<LinearBlocks(heads * budget * kWarp), kLinearThreads, 0, st>>>(
      a.key, a.kept, budget, kept_f32.as<float>(), kept_norm.as<float>());
  MEDAKV_CUDA_LAUNCH_CHECK();

  // 3. Best targets.
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer target, DeviceBuffer::Allocate(sizeof(int32_t) * heads * evicted_len, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer cosine, DeviceBuffer::Allocate(sizeof(float) * heads * evicted_len, stream));
  constexpr int kStride = SmemStride<D>();
  const size_t smem = sizeof(float) * ((kTileRows + kTileCols) * kStride + kTileRows + kTileCols);
  MEDAKV_RETURN_IF_ERROR(AllowSharedMemory(MergeArgmaxKernel<T, D>, smem));
  const int64_t e_tiles = CeilDiv(evicted_len, kTileRows);
  if (e_tiles > INT32_MAX) return absl::InvalidArgumentError("merge: too many evicted tokens for the CUDA grid");
  MergeArgmaxKernel<T, D><<<dim3(static_cast<unsigned>(e_tiles), static_cast<unsigned>(heads)), kTileThreads, smem,
                            st>>>(a.key, evicted.as<int32_t>(), evicted_len, kept_f32.as<float>(),
                                  kept_norm.as<float>(), budget, target.as<int32_t>(), cosine.as<float>());
  MEDAKV_CUDA_LAUNCH_CHECK();

  // 4. MEAN threshold.
  DeviceBuffer mean_cos;
  double threshold = 0.0;
  if (a.threshold == MergeThreshold::kMean) {
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer dense, DeviceBuffer::Allocate(sizeof(float) * heads * tokens, stream));
    MEDAKV_ASSIGN_OR_RETURN(mean_cos, DeviceBuffer::Allocate(sizeof(double) * tokens, stream));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer count, DeviceBuffer::Allocate(sizeof(int32_t) * tokens, stream));
    ScatterCosineKernel<<<LinearBlocks(heads * evicted_len), kLinearThreads, 0, st>>>(
        evicted.as<int32_t>(), cosine.as<float>(), heads, evicted_len, tokens, dense.as<float>());
    MEDAKV_CUDA_LAUNCH_CHECK();
    TokenMeanCosineKernel<<<LinearBlocks(tokens), kLinearThreads, 0, st>>>(
        flags.as<uint8_t>(), dense.as<float>(), heads, tokens, mean_cos.as<double>(), count.as<int32_t>());
    MEDAKV_CUDA_LAUNCH_CHECK();
    std::vector<double> host_mean(tokens);
    std::vector<int32_t> host_count(tokens);
    MEDAKV_RETURN_IF_ERROR(stream.Download(host_mean.data(), mean_cos.data(), sizeof(double) * tokens));
    MEDAKV_RETURN_IF_ERROR(stream.Download(host_count.data(), count.data(), sizeof(int32_t) * tokens));
    double total = 0.0;
    int64_t n = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      if (host_count[t] > 0) {
        total += host_mean[t];
        ++n;
      }
    }
    threshold = n > 0 ? total / static_cast<double>(n) : 0.0;
  }

  // 5. Segments of (target, evicted index), ascending.
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer keys, DeviceBuffer::Allocate(sizeof(uint64_t) * heads * evicted_len, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer sorted, DeviceBuffer::Allocate(sizeof(uint64_t) * heads * evicted_len, stream));
  PairKeysKernel<<<LinearBlocks(heads * evicted_len), kLinearThreads, 0, st>>>(
      target.as<int32_t>(), evicted.as<int32_t>(), mean_cos.as<double>(), threshold, heads, evicted_len, budget,
      keys.as<uint64_t>());
  MEDAKV_CUDA_LAUNCH_CHECK();
  MEDAKV_RETURN_IF_ERROR(SortSegmentsAscending(keys.as<uint64_t>(), sorted.as<uint64_t>(), heads, evicted_len,
                                               32 + BitsFor(budget), stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer seg_begin, DeviceBuffer::Allocate(sizeof(int64_t) * heads * budget, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer seg_end, DeviceBuffer::Allocate(sizeof(int64_t) * heads * budget, stream));
  SegmentBoundsKernel<<<LinearBlocks(heads * budget), kLinearThreads, 0, st>>>(
      sorted.as<uint64_t>(), heads, evicted_len, budget, seg_begin.as<int64_t>(), seg_end.as<int64_t>());
  MEDAKV_CUDA_LAUNCH_CHECK();

  // 6. Accumulate, finalise, write.
  AccumulateKernel<T><<<LinearBlocks(heads * budget * D), kLinearThreads, 0, st>>>(
      a.key, a.value, a.kept, evicted.as<int32_t>(), cosine.as<float>(), sorted.as<uint64_t>(),
      seg_begin.as<int64_t>(), seg_end.as<int64_t>(), kept_f32.as<float>(), budget, evicted_len, a.mode, out_key,
      out_value);
  MEDAKV_CUDA_LAUNCH_CHECK();
  return stream.Synchronize();
}

}  // namespace

absl::Status MergeAndGather(const MergeArgs& a, MutableTensorView out_key, MutableTensorView out_value,
                            Stream& stream) {
  MEDAKV_RETURN_IF_ERROR(ValidateMerge(a, out_key, out_value, /*check_data=*/false));
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  if (a.mode == MergeMode::kNone || a.budget == a.key.tokens) {
    return DispatchStorage(a.key.dtype, [&](auto tag) -> absl::Status {
      using T = decltype(tag);
      const int64_t n = a.key.heads * a.budget * a.key.head_dim;
      GatherKernel<T><<<LinearBlocks(n), kLinearThreads, 0, st>>>(a.key, a.kept, a.budget, out_key);
      MEDAKV_CUDA_LAUNCH_CHECK();
      GatherKernel<T><<<LinearBlocks(n), kLinearThreads, 0, st>>>(a.value, a.kept, a.budget, out_value);
      MEDAKV_CUDA_LAUNCH_CHECK();
      return stream.Synchronize();
    });
  }
  return DispatchHeadDim(a.key.head_dim, [&](auto dim) {
    return DispatchStorage(a.key.dtype, [&](auto tag) {
      return RunMerge<decltype(tag), decltype(dim)::value>(a, out_key, out_value, stream);
    });
  });
}

}  // namespace medakv::cuda
