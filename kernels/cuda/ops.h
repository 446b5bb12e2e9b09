// The compression ops on the GPU, on device pointers (CUDA-free header).
// Each takes the same argument structs as the CPU backend (kernels/ops/
// op_args.h) with every array pointer on the current device, and runs on the
// given stream; outputs are complete when the call returns (scalar outputs
// such as the entropy are returned on the host).
//
// Shapes, enums and options are validated here (the same messages as the CPU
// backend). Array contents are NOT read for validation (query positions in
// range, kept positions ascending, finite scores): the caller guarantees
// them. CudaBackend (kernels/cuda/cuda_backend.cc) checks them on the host
// before it uploads, so requests never reach a kernel with bad contents.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops/op_args.h"

namespace medakv::cuda {

// head_dim values with compiled kernels for the statistics and the merge.
bool SupportedHeadDim(int64_t head_dim);
inline constexpr const char* kSupportedHeadDims = "64, 80, 96, 128 or 256";

[[nodiscard]] absl::Status AttentionStats(const AttentionStatsArgs& args, AttentionStatsOutput* out,
                                          Stream& stream);
[[nodiscard]] absl::Status ReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads,
                                        int64_t tokens, float* out, Stream& stream);
[[nodiscard]] absl::Status PoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length,
                                      int64_t kernel, float* out, Stream& stream);
[[nodiscard]] absl::Status SelectTokens(const SelectArgs& args, int32_t* kept, Stream& stream);
[[nodiscard]] absl::Status MergeAndGather(const MergeArgs& args, MutableTensorView out_key,
                                          MutableTensorView out_value, Stream& stream);

}  // namespace medakv::cuda
