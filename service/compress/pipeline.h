// One prompt's cache through a policy: statistics per layer, budgets across
// layers, then selection, merging and compaction per layer (docs/algorithm.md).
#pragma once

#include <atomic>
#include <functional>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "kernels/common/tensor.h"
#include "service/compress/options.h"
#include "service/compress/policy.h"

namespace medakv {

enum class StatsForm : uint8_t {
  kQueries = 0,      // the worker sends queries; the service computes statistics
  kPrecomputed = 1,  // the worker sends accumulated attention and the entropy
};

// Query rows may stand after the cache: probes, such as the rows of a
// question asked after the context or of a pass that reconstructs it. A row's
// position is in [0, QueryPositionLimit(T)) and a layer has at most that many
// rows; a row at T or after sees every key of the cache, and counts with the
// modality of the cache's last token. Rows after the cache need explicit
// positions (the default is the last q_tokens positions of the cache).
inline int64_t QueryPositionLimit(int64_t tokens) { return 2 * tokens + 65536; }

struct LayerInput {
  TensorView key;    // [kv_heads, tokens, head_dim]
  TensorView value;  // [kv_heads, tokens, head_dim]
  // kQueries:
  TensorView query;  // [q_heads, q_tokens, head_dim], same dtype and layout as key
  // [q_tokens], each in [0, QueryPositionLimit(tokens)); empty means the last
  // q_tokens positions of the cache (then q_tokens <= tokens).
  std::vector<int32_t> query_positions;
  // kPrecomputed:
  const float* scores = nullptr;  // [score_heads, tokens], score_heads = kv_heads or q_heads
  int64_t score_heads = 0;
  float entropy = 0.f;
  // kQueries, optional: [q_heads, q_tokens] or empty. Per query head and row,
  // the log-sum-exp of its logits (the statistics' scale times q.k) over the
  // keys it attends outside the cache: a probe pass's own tokens (finite, or
  // -inf for none). The scores then count the attention each row gives the
  // cache's keys out of all the attention it gives (docs/algorithm.md).
  std::vector<float> query_outside_lse;
};

struct CacheInput {
  int64_t kv_heads = 0;
  int64_t q_heads = 0;
  int64_t head_dim = 0;
  int64_t tokens = 0;
  DType dtype = DType::kFloat16;
  Layout layout = Layout::kHND;
  std::vector<uint8_t> modality;  // [tokens], 0 text, 1 visual; empty means all text
  StatsForm stats = StatsForm::kQueries;
  std::vector<LayerInput> layers;  // one per layer
};

struct LayerResult {
  std::vector<uint8_t> key;        // [kv_heads, budget, head_dim] in the input dtype and layout
  std::vector<uint8_t> value;      // [kv_heads, budget, head_dim]
  // [kv_heads, budget], ascending per head. Where heads keep different
  // numbers of tokens (amber's layer_budget global) budget is the largest and
  // a shorter head's rows end in padding: position -1, zero key and value.
  std::vector<int32_t> positions;
  float entropy = 0.f;             // E_l
  double alpha = 1.0;              // alpha_l
  int64_t budget = 0;              // B_l
};

struct StageSeconds {
  double statistics = 0.0;
  double allocate = 0.0;
  double select_merge = 0.0;
};

struct CompressResult {
  std::vector<LayerResult> layers;
  StageSeconds seconds;
  int64_t tokens_in = 0;    // layers x tokens
  int64_t tokens_kept = 0;  // sum of budgets
};

// Rejects any inconsistent input with InvalidArgument naming the field,
// before any output memory is reserved.
[[nodiscard]] absl::Status ValidateCacheInput(const CacheInput& input);

// Every key, value and query element is finite: a NaN or an infinity would
// make the scores meaningless (keys, queries) or spread into the rows a merge
// averages (values). INVALID_ARGUMENT names the layer, tensor, head, token
// and dim of the first one. Compress and ComputeStatistics call it after
// ValidateCacheInput; precomputed scores and entropies are checked there.
[[nodiscard]] absl::Status CheckFiniteInput(const CacheInput& input);

// ---- the statistics stage -----------------------------------------------------------

// What the statistics stage (scores for the scorer, the entropy for the
// budgets and the results) reads of the options, once the policy's plan
// (PlanFor) is known. Two option sets with equal keys give bit-identical
// statistics on the same input, whatever else differs (rho, tau, the clamps,
// the selection and merge options, sinks, pyramid_beta, ...). Fields that the
// stage does not read for the plan stay at their zero values, so that e.g.
// snapkv and pyramidkv at the same window and kernel share a key.
struct StatisticsKey {
  bool computed = false;                                  // the plan needs statistics (a scorer or entropy budgets)
  Scorer scorer = Scorer::kNone;                          // the plan's scorer
  EntropySource entropy_source = EntropySource::kCausal;  // as the stage runs it: causal unless the budgets use it
  EntropyHeads entropy_heads = EntropyHeads::kMeanAttention;
  float scale = 0.f;        // options.scale (0: 1/sqrt(head_dim))
  int64_t window = 0;       // window-pooled scorer: the observation window; else 0
  int64_t pool_kernel = 0;  // window-pooled scorer: the pooling kernel; else 0
  int64_t recent_rows = 0;  // amber's recent search: options.recent_search_rows; else 0
  ScoreAggregation aggregation = ScoreAggregation::kSum;  // kMax for amber's score_norm max

  bool operator==(const StatisticsKey&) const = default;
  // "none", or e.g. "scorer=accumulated entropy=cross_modal/mean_attention scale=0".
  std::string ToString() const;
};

// The key of `options` (its policy's plan and the options the stage reads).
StatisticsKey StatisticsKeyFor(const CompressOptions& options);

// The per-layer result of the statistics stage for one input.
struct Statistics {
  StatisticsKey key;
  int64_t layers = 0, kv_heads = 0, tokens = 0;  // the input's shape
  std::vector<std::vector<float>> scores;        // [layers][kv_heads * tokens]; empty vectors when unused
  std::vector<float> entropy;                    // [layers] E_l; 0 when not computed
  // Amber's recent search (key.recent_rows > 0, query statistics): per layer
  // [kv_heads * tokens], the attention of the last min(recent_rows, q_tokens)
  // query rows summed over those rows and the group's heads. Empty otherwise
  // (precomputed statistics have no rows: the search falls back to
  // recent_fraction).
  std::vector<std::vector<float>> recent_scores;
  double seconds = 0.0;  // how long the stage took
};

// Stage 1 of Compress: validates the options and the input, then computes
// the statistics that `options` needs (docs/algorithm.md; nothing when the policy
// needs none). `cancelled` as for Compress.
[[nodiscard]] absl::StatusOr<Statistics> ComputeStatistics(const CacheInput& input, const CompressOptions& options,
                                                           const Backend& backend,
                                                           const std::atomic<bool>* cancelled = nullptr);

// ---- compression ----------------------------------------------------------------------

// `cancelled`, when given, is polled between layers: once it reads true the
// call returns CANCELLED and frees what it allocated.
// `statistics`, when given, replaces the statistics stage: they must come
// from ComputeStatistics of this same input with options of the same
// StatisticsKey (INVALID_ARGUMENT otherwise, for a key or a shape that
// differs; that the input is the same is the caller's promise). The result
// is then bit for bit the one without them; its statistics time is 0.
//
// `on_layer`, when given, is called on the calling thread for every layer
// as soon as its result is complete, in layer order, so that a caller can
// send it while the next layers are computed (the server's Compress stream).
// It may move the layer's key, value and positions out of `result` (the
// budget, entropy and alpha stay); an error it returns ends the call with
// that error.
using LayerCallback = std::function<absl::Status(int64_t layer, LayerResult& result)>;
[[nodiscard]] absl::StatusOr<CompressResult> Compress(const CacheInput& input, const CompressOptions& options,
                                                      const Backend& backend,
                                                      const std::atomic<bool>* cancelled = nullptr,
                                                      const Statistics* statistics = nullptr,
                                                      const LayerCallback* on_layer = nullptr);

// Expands (start, length) spans of visual tokens into a modality vector.
struct ModalitySpan {
  int64_t start = 0;
  int64_t length = 0;
  Modality modality = Modality::kVisual;
};
[[nodiscard]] absl::StatusOr<std::vector<uint8_t>> ModalityFromSpans(int64_t tokens,
                                                                     const std::vector<ModalitySpan>& spans);

}  // namespace medakv
