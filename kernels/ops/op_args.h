// Arguments of the compression ops. Both backends take these; pointers are
// host pointers for the CPU backend and device pointers for the CUDA backend.
#pragma once

#include <atomic>
#include <cstdint>

#include "kernels/common/tensor.h"
#include "kernels/ops/options.h"

namespace medakv {

// A caller's cancellation flag (nullptr: none). Long ops poll it between
// blocks of work, a few milliseconds apart at most; once it reads true they
// stop early and return CANCELLED, their outputs then unspecified. The CUDA
// backend checks it before it launches.
using CancelFlag = const std::atomic<bool>*;
inline bool IsSet(CancelFlag flag) { return flag != nullptr && flag->load(std::memory_order_relaxed); }

// Op 1: attention statistics of one layer from its queries.
struct AttentionStatsArgs {
  TensorView query;                         // [q_heads, q_tokens, head_dim]
  const int32_t* query_positions = nullptr;  // [q_tokens], each in [0, tokens)
  // [q_heads, q_tokens] or nullptr: per query head and row, the log-sum-exp of
  // its logits (scale * q.k) over keys it attends outside this cache (a probe
  // pass's own tokens). The scores' softmax adds e^outside_lse to its
  // denominator, so a row's probabilities are the attention it gives the
  // cache's keys out of all it gives; -inf adds nothing. The entropy does not
  // use it (softmax over the cache's keys alone).
  const float* outside_lse = nullptr;
  TensorView key;                           // [kv_heads, tokens, head_dim]
  const uint8_t* modality = nullptr;        // [tokens], 0 text, 1 visual
  float scale = 0.f;                        // logits = scale * q.k (> 0)
  EntropyHeads entropy_heads = EntropyHeads::kMeanAttention;
  EntropySource entropy_source = EntropySource::kCrossModal;
  // Only query rows with index >= score_rows_begin add to the scores (an
  // observation window); every row counts for the entropy.
  int64_t score_rows_begin = 0;
  ScoreAggregation aggregation = ScoreAggregation::kSum;  // over the scored rows and the group's heads
  CancelFlag cancelled = nullptr;
};

struct AttentionStatsOutput {
  float* scores = nullptr;  // [kv_heads, tokens]: sum (or max) over scored rows and the group's heads of A[i, t]
  float entropy = 0.f;      // E_l = E_TV + E_VT (or the causal entropy, see docs/algorithm.md)
  float entropy_tv = 0.f;   // text rows over visual keys (0 when no such row)
  float entropy_vt = 0.f;   // visual rows over text keys (0 when no such row)
  bool causal = false;      // whether E_l was computed as CAUSAL
};

// Op 4: per-head (or shared) selection of kept tokens in one layer.
struct SelectArgs {
  const float* scores = nullptr;      // [kv_heads, tokens]
  const uint8_t* modality = nullptr;  // [tokens]
  int64_t kv_heads = 0;
  int64_t tokens = 0;
  int64_t budget = 0;  // B_l in [1, tokens]
  double recent_fraction = 0.5;  // M = round(recent_fraction * B) most recent tokens kept...
  int64_t recent_tokens = -1;    // ...unless >= 0: then M = recent_tokens (SnapKV's window)
  int64_t sinks = 0;             // the first min(sinks, B) tokens are always kept (StreamingLLM)
  TextPrior text_prior = TextPrior::kAdditive;
  bool shared_selection = false;
};

// Op 5: merge evicted tokens into kept ones and compact into the output.
struct MergeArgs {
  TensorView key;                  // [kv_heads, tokens, head_dim]
  TensorView value;                // [kv_heads, tokens, head_dim], same dtype and layout as key
  const int32_t* kept = nullptr;   // [kv_heads, budget], strictly ascending per head
  int64_t budget = 0;
  MergeMode mode = MergeMode::kAverage;
  MergeThreshold threshold = MergeThreshold::kNone;
  CancelFlag cancelled = nullptr;
};

}  // namespace medakv
