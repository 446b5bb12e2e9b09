// Argument checks of the compression ops, shared by both backends so that a
// bad request gets the same INVALID_ARGUMENT message whichever backend runs.
// `check_data` = false skips the checks that read array contents (positions,
// kept lists, score values): the CUDA device-pointer ops check shapes only,
// and the CUDA backend runs the data checks on the host before uploading.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/ops/op_args.h"

namespace medakv {

[[nodiscard]] absl::Status ValidateAttentionStats(const AttentionStatsArgs& args, const AttentionStatsOutput* out,
                                                  bool check_data = true);
[[nodiscard]] absl::Status ValidateReduceScores(const float* scores, int64_t score_heads, int64_t kv_heads,
                                                int64_t tokens, const float* out, bool check_data = true);
[[nodiscard]] absl::Status ValidatePoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length,
                                              int64_t kernel, const float* out);
[[nodiscard]] absl::Status ValidateSelect(const SelectArgs& args, const int32_t* kept);
[[nodiscard]] absl::Status ValidateMerge(const MergeArgs& args, const MutableTensorView& out_key,
                                         const MutableTensorView& out_value, bool check_data = true);

// The sinks and recent-window sizes of a selection (docs/algorithm.md): sinks =
// min(sinks, B); recent = min(recent_tokens or round(recent_fraction B), B - sinks).
struct SelectCounts {
  int64_t sinks = 0;
  int64_t recent = 0;
};
SelectCounts SelectWindowCounts(const SelectArgs& args);

}  // namespace medakv
