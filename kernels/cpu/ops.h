// The CPU backend's ops. Each validates its arguments and returns
// InvalidArgument naming the field; nothing aborts.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/ops/op_args.h"

namespace medakv::cpu {

// Accumulated causal attention per kv head and the layer's entropy, tiled
// over keys in two passes (row log-sum-exp, then probabilities).
[[nodiscard]] absl::Status AttentionStats(const AttentionStatsArgs& args,
                                          AttentionStatsOutput* out);

// Sums worker-given scores [score_heads, tokens] over GQA groups into
// [kv_heads, tokens]; score_heads is kv_heads or q_heads. Rejects non-finite values.
[[nodiscard]] absl::Status ReduceScores(const float* scores, int64_t score_heads,
                                        int64_t kv_heads, int64_t tokens,
                                        float* out /* [kv_heads, tokens] */);

// SnapKV's pooling: out[h, t] = mean of in[h, u] over |u - t| <= kernel/2,
// zero-padded outside [0, length), for t < length; positions >= length (the
// observation window) are copied. in and out are [heads, tokens].
[[nodiscard]] absl::Status PoolScores(const float* in, int64_t heads, int64_t tokens, int64_t length,
                                      int64_t kernel, float* out);

// Kept positions [kv_heads, budget], ascending per head.
[[nodiscard]] absl::Status SelectTokens(const SelectArgs& args, int32_t* kept);

// Writes [kv_heads, budget, head_dim] keys and values in the input dtype and
// layout: kept tokens with evicted ones merged in (or copied, for kNone).
[[nodiscard]] absl::Status MergeAndGather(const MergeArgs& args, MutableTensorView out_key,
                                          MutableTensorView out_value);

}  // namespace medakv::cpu
