// Attention statistics on the GPU (docs/algorithm.md, MEDA step 1 and the score
// of step 3), the CPU backend's two-pass scheme in tiles:
//   pass 1 (StatsPass1Kernel): per (query head, 32-row tile, key split) the
//     online softmax states (max, sum, sum of e^x x) of every row, causal and
//     cross-modal, over 32-key tiles held in shared memory as fp32; lanes
//     combine their states with OnlineSoftmaxEntropy::Merge in a fixed
//     butterfly, and StatsMergeKernel merges the splits in order: log-sum-exp
//     and the per-head entropies that need no second look;
//   pass 2a (StatsScoresKernel): per (kv head, 32-key tile), the accumulated
//     probabilities of the scored rows over the group's heads; each block owns
//     its columns and sums in a fixed order (no atomics: deterministic);
//   pass 2b (StatsEntropyPartialKernel, MEAN_ATTENTION only): per 64-key span
//     and row, the entropy terms of the head-averaged cross-modal row, summed
//     per row in span order by StatsRowEntropyKernel.
// The arithmetic (dot products, online softmax, probabilities, entropy terms)
// is kernels/ops/attention_math.h, the functions the CPU backend calls.
#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/status.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops.h"
#include "kernels/ops/attention_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cuda {
namespace {

constexpr int kSpan = 2 * kTileCols;  // keys per pass-2b block

struct SoftmaxPartial {
  float c_max, c_sum, c_dx;  // causal
  float x_max, x_sum, x_dx;  // cross-modal
};

__device__ __forceinline__ void ShuffleMerge(OnlineSoftmaxEntropy& s, int offset) {
  OnlineSoftmaxEntropy o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
  o.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
  o.sum_dx = __shfl_xor_sync(0xffffffffu, s.sum_dx, offset);
  s.Merge(o);
}

// Largest query position among rows [r0, r0 + kTileRows) (-1 when none).
__device__ __forceinline__ int64_t TileLastPosition(const int32_t* __restrict__ pos, int64_t r0, int64_t rows) {
  int64_t last = -1;
  for (int r = 0; r < kTileRows && r0 + r < rows; ++r) last = max(last, static_cast<int64_t>(pos[r0 + r]));
  return last;
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads)
    StatsPass1Kernel(TensorView query,                    // [q_heads, rows, D]
                     TensorView key,                      // [kv_heads, tokens, D]
                     const int32_t* __restrict__ pos,     // [rows]
                     const uint8_t* __restrict__ mod,     // [tokens]
                     float scale, bool cross, int64_t group, int64_t split_len, int splits,
                     SoftmaxPartial* __restrict__ partial) {  // [q_heads, rows, splits]
  extern __shared__ float smem[];
  constexpr int kStride = SmemStride<D>();
  float* q_s = smem;                        // [kTileRows][kStride]
  float* k_s = smem + kTileRows * kStride;  // [kTileCols][kStride]
  const int64_t rows = query.tokens, tokens = key.tokens;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t h = blockIdx.y, g = h / group;
  const int z = blockIdx.z;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  LoadRowsF32<T, D, kTileRows>(query, h, r0, rows, nullptr, q_s);
  int64_t my_pos[kRowsPerWarp];
  uint8_t my_mod[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    const int64_t i = r0 + warp + 8 * k;
    my_pos[k] = i < rows ? pos[i] : -1;
    my_mod[k] = my_pos[k] >= 0 ? mod[my_pos[k]] : 0;
  }
  const int64_t kbeg = static_cast<int64_t>(z) * split_len;
  const int64_t kstop = min(min(tokens, kbeg + split_len), TileLastPosition(pos, r0, rows) + 1);

  OnlineSoftmaxEntropy sc[kRowsPerWarp], sx[kRowsPerWarp];
  for (int64_t j0 = kbeg; j0 < kstop; j0 += kTileCols) {
    __syncthreads();  // the previous tile is consumed (and q_s written)
    LoadRowsF32<T, D, kTileCols>(key, g, j0, kstop, nullptr, k_s);
    __syncthreads();
    const int64_t j = j0 + lane;
    if (j < kstop) {
      const uint8_t mj = mod[j];
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        if (j <= my_pos[k]) {
          const float logit = scale * DotF32(q_s + (warp + 8 * k) * kStride, k_s + lane * kStride, D);
          sc[k].Add(logit);
          if (cross && CrossModal(my_mod[k], mj)) sx[k].Add(logit);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) {
    for (int off = kWarp / 2; off > 0; off /= 2) {
      ShuffleMerge(sc[k], off);
      ShuffleMerge(sx[k], off);
    }
    const int64_t i = r0 + warp + 8 * k;
    if (lane == 0 && i < rows) {
      partial[(h * rows + i) * splits + z] =
          SoftmaxPartial{sc[k].max, sc[k].sum, sc[k].sum_dx, sx[k].max, sx[k].sum, sx[k].sum_dx};
    }
  }
}

// Per (head, row): the splits merged in order.
__global__ void StatsMergeKernel(const SoftmaxPartial* __restrict__ partial, int64_t n, int splits, bool causal,
                                 const float* __restrict__ outside_lse, float* __restrict__ lse_causal,
                                 float* __restrict__ lse_cross, float* __restrict__ entropy,
                                 uint8_t* __restrict__ cross_nonempty) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n) return;
  OnlineSoftmaxEntropy sc, sx;
  for (int z = 0; z < splits; ++z) {
    const SoftmaxPartial p = partial[idx * splits + z];
    OnlineSoftmaxEntropy a, b;
    a.max = p.c_max, a.sum = p.c_sum, a.sum_dx = p.c_dx;
    b.max = p.x_max, b.sum = p.x_sum, b.sum_dx = p.x_dx;
    sc.Merge(a);
    sx.Merge(b);
  }
  // The scores' normaliser: the causal log-sum-exp, plus the row's mass outside the cache.
  lse_causal[idx] = outside_lse != nullptr ? LogAddExp(sc.Lse(), outside_lse[idx]) : sc.Lse();
  lse_cross[idx] = sx.Lse();
  entropy[idx] = causal ? sc.Entropy() : sx.Entropy();
  cross_nonempty[idx] = sx.Empty() ? 0 : 1;
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads)
    StatsScoresKernel(TensorView query, TensorView key, const int32_t* __restrict__ pos,
                      const float* __restrict__ lse_causal,  // [q_heads, rows]
                      float scale, int64_t group, int64_t score_rows_begin, bool max_score,
                      float* __restrict__ scores) {  // [kv_heads, tokens]
  extern __shared__ float smem[];
  constexpr int kStride = SmemStride<D>();
  float* q_s = smem;                         // [kTileRows][kStride]
  float* k_s = q_s + kTileRows * kStride;    // [kTileCols][kStride]
  float* red = k_s + kTileCols * kStride;    // [8][kWarp]
  const int64_t rows = query.tokens, tokens = key.tokens;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t g = blockIdx.y;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t j = j0 + lane;

  LoadRowsF32<T, D, kTileCols>(key, g, j0, tokens, nullptr, k_s);
  float acc = 0.f;
  for (int64_t r0 = (score_rows_begin / kTileRows) * kTileRows; r0 < rows; r0 += kTileRows) {
    if (TileLastPosition(pos, r0, rows) < j0) continue;  // uniform over the block
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      __syncthreads();
      LoadRowsF32<T, D, kTileRows>(query, h, r0, rows, nullptr, q_s);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const int64_t i = r0 + warp + 8 * k;
        if (i < rows && i >= score_rows_begin && j < tokens && j <= pos[i]) {
          const float logit = scale * DotF32(q_s + (warp + 8 * k) * kStride, k_s + lane * kStride, D);
          const float p = SoftmaxProb(logit, lse_causal[h * rows + i]);
          acc = max_score ? fmaxf(acc, p) : acc + p;
        }
      }
    }
  }
  red[warp * kWarp + lane] = acc;
  __syncthreads();
  if (warp == 0 && j < tokens) {
    float s = 0.f;
    for (int w = 0; w < kTileThreads / kWarp; ++w) {
      s = max_score ? fmaxf(s, red[w * kWarp + lane]) : s + red[w * kWarp + lane];
    }
    scores[g * tokens + j] = s;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads)
    StatsEntropyPartialKernel(TensorView query, TensorView key, const int32_t* __restrict__ pos,
                              const uint8_t* __restrict__ mod, const float* __restrict__ lse_cross,
                              const uint8_t* __restrict__ row_valid,  // [rows]
                              float scale, int64_t group, float inv_heads,
                              float* __restrict__ partial) {  // [spans, rows], zeroed
  extern __shared__ float smem[];
  constexpr int kStride = SmemStride<D>();
  float* q_s = smem;                       // [kTileRows][kStride]
  float* k_s = q_s + kTileRows * kStride;  // [kSpan][kStride]
  const int64_t rows = query.tokens, tokens = key.tokens, q_heads = query.heads;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kSpan;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    if (TileLastPosition(pos, r0, rows) < j0) continue;  // uniform over the block
    float abar[kRowsPerWarp][2] = {};
    int64_t loaded = -1;
    for (int64_t h = 0; h < q_heads; ++h) {
      const int64_t g = h / group;
      __syncthreads();
      if (g != loaded) {
        LoadRowsF32<T, D, kSpan>(key, g, j0, tokens, nullptr, k_s);
        loaded = g;
      }
      LoadRowsF32<T, D, kTileRows>(query, h, r0, rows, nullptr, q_s);
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const int64_t i = r0 + warp + 8 * k;
        if (i >= rows || !row_valid[i]) continue;
        const int64_t pi = pos[i];
        const uint8_t mi = mod[pi];
        const float lx = lse_cross[h * rows + i];
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const int64_t j = j0 + s * kWarp + lane;
          if (j < tokens && j <= pi && CrossModal(mi, mod[j])) {
            const float logit =
                scale * DotF32(q_s + (warp + 8 * k) * kStride, k_s + (s * kWarp + lane) * kStride, D);
            abar[k][s] += SoftmaxProb(logit, lx);
          }
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) {
      const float e = WarpSum(EntropyTerm(abar[k][0] * inv_heads) + EntropyTerm(abar[k][1] * inv_heads));
      const int64_t i = r0 + warp + 8 * k;
      if (lane == 0 && i < rows) partial[blockIdx.x * rows + i] = e;
    }
  }
}

__global__ void StatsRowEntropyKernel(const float* __restrict__ partial, int64_t spans, int64_t rows,
                                      double* __restrict__ row_entropy) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  double e = 0.0;
  for (int64_t s = 0; s < spans; ++s) e += partial[s * rows + i];
  row_entropy[i] = e;
}

template <typename T, int D>
absl::Status RunStats(const AttentionStatsArgs& a, AttentionStatsOutput* out, Stream& stream, bool causal,
                      bool mean_attention, const std::vector<uint8_t>& modality) {
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const int64_t kv_heads = a.key.heads, tokens = a.key.tokens;
  const int64_t q_heads = a.query.heads, rows = a.query.tokens, group = q_heads / kv_heads;
  constexpr int kStride = SmemStride<D>();

  // Pass 1, split over keys so that short query tiles still fill the device.
  const int64_t row_tiles = CeilDiv(rows, kTileRows);
  const int64_t base = row_tiles * q_heads;
  const int64_t want = CeilDiv(4 * MultiprocessorCount(), base);
  int64_t splits = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, tokens / 256));
  const int64_t split_len = CeilDiv(CeilDiv(tokens, splits), kTileCols) * kTileCols;
  splits = CeilDiv(tokens, split_len);
  if (row_tiles > INT32_MAX || q_heads > kMaxGridY || splits > kMaxGridY || kv_heads > kMaxGridY) {
    return absl::InvalidArgumentError(absl::StrCat("attention stats: shape too large for the CUDA grid (q_heads ",
                                                   q_heads, ", rows ", rows, ")"));
  }
  const int64_t n = q_heads * rows;
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer partial,
                          DeviceBuffer::Allocate(sizeof(SoftmaxPartial) * n * splits, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer lse_c, DeviceBuffer::Allocate(sizeof(float) * n, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer lse_x, DeviceBuffer::Allocate(sizeof(float) * n, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer ent, DeviceBuffer::Allocate(sizeof(float) * n, stream));
  MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer nonempty, DeviceBuffer::Allocate(n, stream));

  const size_t smem1 = sizeof(float) * (kTileRows + kTileCols) * kStride;
  MEDAKV_RETURN_IF_ERROR(AllowSharedMemory(StatsPass1Kernel<T, D>, smem1));
  StatsPass1Kernel<T, D><<<dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(q_heads),
                               static_cast<unsigned>(splits)),
                          kTileThreads, smem1, st>>>(a.query, a.key, a.query_positions, a.modality, a.scale,
                                                     !causal, group, split_len, static_cast<int>(splits),
                                                     partial.as<SoftmaxPartial>());
  MEDAKV_CUDA_LAUNCH_CHECK();
  StatsMergeKernel<<<static_cast<unsigned>(CeilDiv(n, 256)), 256, 0, st>>>(
      partial.as<SoftmaxPartial>(), n, static_cast<int>(splits), causal, a.outside_lse, lse_c.as<float>(),
      lse_x.as<float>(), ent.as<float>(), nonempty.as<uint8_t>());
  MEDAKV_CUDA_LAUNCH_CHECK();

  // Pass 2a: the scores.
  const int64_t key_tiles = CeilDiv(tokens, kTileCols);
  const size_t smem2 = sizeof(float) * ((kTileRows + kTileCols) * kStride + kTileThreads);
  MEDAKV_RETURN_IF_ERROR(AllowSharedMemory(StatsScoresKernel<T, D>, smem2));
  StatsScoresKernel<T, D><<<dim3(static_cast<unsigned>(key_tiles), static_cast<unsigned>(kv_heads)), kTileThreads,
                            smem2, st>>>(a.query, a.key, a.query_positions, lse_c.as<float>(), a.scale, group,
                                         a.score_rows_begin, a.aggregation == ScoreAggregation::kMax,
                                         out->scores);
  MEDAKV_CUDA_LAUNCH_CHECK();

  // Per-row entropies, reduced on the host exactly as the CPU backend does.
  std::vector<float> head_entropy(n);
  std::vector<uint8_t> head_nonempty(n);
  MEDAKV_RETURN_IF_ERROR(stream.Download(head_entropy.data(), ent.data(), sizeof(float) * n));
  MEDAKV_RETURN_IF_ERROR(stream.Download(head_nonempty.data(), nonempty.data(), n));
  std::vector<double> row_entropy(rows, 0.0);
  std::vector<uint8_t> row_valid(rows, 0);
  for (int64_t i = 0; i < rows; ++i) {
    double sum_h = 0.0;
    bool valid = true;
    for (int64_t h = 0; h < q_heads; ++h) {
      sum_h += head_entropy[h * rows + i];
      valid = valid && head_nonempty[h * rows + i] != 0;
    }
    row_valid[i] = (causal || valid) ? 1 : 0;
    row_entropy[i] = sum_h / static_cast<double>(q_heads);
  }

  if (mean_attention) {
    const int64_t spans = CeilDiv(tokens, kSpan);
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer valid_d, DeviceBuffer::Allocate(rows, stream));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer partial2, DeviceBuffer::Allocate(sizeof(float) * spans * rows, stream));
    MEDAKV_ASSIGN_OR_RETURN(DeviceBuffer row_ent_d, DeviceBuffer::Allocate(sizeof(double) * rows, stream));
    MEDAKV_RETURN_IF_ERROR(stream.Upload(valid_d.data(), row_valid.data(), rows));
    MEDAKV_RETURN_IF_ERROR(stream.Memset(partial2.data(), 0, partial2.size()));
    const size_t smem3 = sizeof(float) * (kTileRows + kSpan) * kStride;
    MEDAKV_RETURN_IF_ERROR(AllowSharedMemory(StatsEntropyPartialKernel<T, D>, smem3));
    StatsEntropyPartialKernel<T, D><<<static_cast<unsigned>(spans), kTileThreads, smem3, st>>>(
        a.query, a.key, a.query_positions, a.modality, lse_x.as<float>(), valid_d.as<uint8_t>(), a.scale, group,
        1.f / static_cast<float>(q_heads), partial2.as<float>());
    MEDAKV_CUDA_LAUNCH_CHECK();
    StatsRowEntropyKernel<<<static_cast<unsigned>(CeilDiv(rows, 256)), 256, 0, st>>>(
        partial2.as<float>(), spans, rows, row_ent_d.as<double>());
    MEDAKV_CUDA_LAUNCH_CHECK();
    MEDAKV_RETURN_IF_ERROR(stream.Download(row_entropy.data(), row_ent_d.data(), sizeof(double) * rows));
  }

  double sum_tv = 0.0, sum_vt = 0.0, sum_all = 0.0;
  int64_t n_tv = 0, n_vt = 0;
  std::vector<int32_t> pos(rows);
  MEDAKV_RETURN_IF_ERROR(stream.Download(pos.data(), a.query_positions, sizeof(int32_t) * rows));
  for (int64_t i = 0; i < rows; ++i) {
    const double e = row_entropy[i];
    if (causal) {
      sum_all += e;
    } else if (row_valid[i]) {
      if (modality[pos[i]] == 0) {
        sum_tv += e;
        ++n_tv;
      } else {
        sum_vt += e;
        ++n_vt;
      }
    }
  }
  out->causal = causal;
  if (causal) {
    out->entropy_tv = out->entropy_vt = 0.f;
    out->entropy = static_cast<float>(sum_all / static_cast<double>(rows));
  } else {
    out->entropy_tv = n_tv > 0 ? static_cast<float>(sum_tv / n_tv) : 0.f;
    out->entropy_vt = n_vt > 0 ? static_cast<float>(sum_vt / n_vt) : 0.f;
    out->entropy = out->entropy_tv + out->entropy_vt;
  }
  return stream.Synchronize();
}

}  // namespace

bool SupportedHeadDim(int64_t d) { return d == 64 || d == 80 || d == 96 || d == 128 || d == 256; }

absl::Status AttentionStats(const AttentionStatsArgs& a, AttentionStatsOutput* out, Stream& stream) {
  MEDAKV_RETURN_IF_ERROR(ValidateAttentionStats(a, out, /*check_data=*/false));
  if (a.query.dtype != a.key.dtype) {
    return absl::InvalidArgumentError("attention stats: query and key must have the same dtype on the CUDA backend");
  }
  std::vector<uint8_t> modality(a.key.tokens);
  MEDAKV_RETURN_IF_ERROR(stream.Download(modality.data(), a.modality, modality.size()));
  const bool any_visual = std::any_of(modality.begin(), modality.end(), [](uint8_t m) { return m != 0; });
  const bool causal = !any_visual || a.entropy_source == EntropySource::kCausal;
  const bool mean_attention = !causal && a.entropy_heads == EntropyHeads::kMeanAttention;
  return DispatchHeadDim(a.key.head_dim, [&](auto dim) {
    return DispatchStorage(a.key.dtype, [&](auto tag) {
      return RunStats<decltype(tag), decltype(dim)::value>(a, out, stream, causal, mean_attention, modality);
    });
  });
}

}  // namespace medakv::cuda
