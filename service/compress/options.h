// What a compression request asks for: the policy and every option of
// docs/algorithm.md, with the documented defaults.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/cpu/budget.h"
#include "kernels/ops/options.h"

namespace medakv {

// The policies of docs/algorithm.md; each is a composition of a budget rule, a
// scorer, a selector and a merger (service/compress/policy.h).
enum class PolicyKind : uint8_t {
  kFull = 0,          // keep everything (a pass-through, for comparison)
  kMeda = 1,          // entropy budgets, text prior, accumulated attention, recent window, AVERAGE merge
  kStreamingLlm = 2,  // uniform budgets; attention sinks + most recent tokens
  kH2O = 3,           // uniform; accumulated attention over all rows, heavy and recent halves
  kSnapKV = 4,        // uniform; pooled attention of the observation window, the window kept
  kPyramidKV = 5,     // SnapKV selection with pyramid (arithmetic) layer budgets
  kLookM = 6,         // uniform; keep-all-text prior, accumulated attention, recent half, PIVOTAL merge
  kAmber = 7,         // this project's (docs/amber.md): visible-mean attention, sinks, recent window, layer budgets
};

// How the accumulated attention of a token becomes its score (amber).
enum class ScoreNorm : uint8_t {
  kSum = 0,          // H2O: the plain sum over the query rows and the group's heads
  kVisibleMean = 1,  // the sum over the (row, head) pairs that can see the token: early tokens are not favoured
  kMax = 2,          // the largest attention one row and head gives it: a token a single probe row needs counts fully
};

// How amber splits the total budget round(rho L T) across layers.
enum class LayerBudget : uint8_t {
  kUniform = 0,  // round(rho T) each
  kMass = 1,     // to keep the most score mass (each layer's and head's scores normalised to sum 1)
  kEntropy = 2,  // MEDA's softmax of the entropy (tau, entropy_source, entropy_heads)
  kDepth = 3,    // a linear ramp over depth: the first layer depth_ratio, the last 1 / depth_ratio (relative)
  kGlobal = 4,   // the highest scores across every layer and kv head: each head keeps its own number of tokens
};

// The recent-window fractions amber's recent search tries, in this order
// (docs/amber.md): each kv head keeps the one whose selection holds the most
// attention of the last recent_search_rows query rows.
inline constexpr double kRecentSearchFractions[] = {0.125, 0.25, 0.375, 0.5, 0.625, 0.75};

// amber's defaults for the options below (docs/amber.md, bench/FIDELITY.md).
inline constexpr double kAmberDepthRatio = 0.8;
inline constexpr int64_t kAmberRecentSearchRows = 16;
inline constexpr double kMinDepthRatio = 0.01;  // depth_ratio in [0.01, 100]
// The logits scale: 0 (1/sqrt(head_dim)) or in (0, kMaxScale]. Attention
// logits are scale * q.k; a larger scale only makes every softmax one-hot
// and overflows float logits sooner.
inline constexpr float kMaxScale = 1e4f;
// SnapKV's pooling kernel: odd, in [1, kMaxPoolKernel]. Pooling costs
// kernel operations per token, and a kernel this wide already averages
// over more positions than a local smoothing means (SnapKV uses 5 to 7).
inline constexpr int64_t kMaxPoolKernel = 1023;

struct CompressOptions {
  PolicyKind policy = PolicyKind::kMeda;
  // Budget rule (rho, tau, alpha_min, alpha_max, exact_total).
  BudgetOptions budget;
  // Statistics.
  EntropyHeads entropy_heads = EntropyHeads::kMeanAttention;
  EntropySource entropy_source = EntropySource::kCrossModal;
  float scale = 0.f;  // logits scale; 0 means 1/sqrt(head_dim)
  // Selection.
  double recent_fraction = 0.5;  // both reference codes; the paper's text says 0.75
  TextPrior text_prior = TextPrior::kAdditive;
  bool shared_selection = false;
  // Merging.
  MergeMode merge = MergeMode::kAverage;
  MergeThreshold merge_threshold = MergeThreshold::kNone;
  // Baselines.
  int64_t sinks = 4;         // streaming_llm: attention sinks kept at the start
  int64_t window = 64;       // snapkv, pyramidkv: observation window (last query rows)
  int64_t pool_kernel = 5;   // snapkv, pyramidkv: average pooling over positions (odd)
  double pyramid_beta = 20;  // pyramidkv: min = (C - w) / beta
  // amber (docs/amber.md); the sinks above are kept too.
  ScoreNorm score_norm = ScoreNorm::kSum;
  LayerBudget layer_budget = LayerBudget::kUniform;
  double depth_ratio = 1.0;  // LayerBudget::kDepth: first layer's weight; the last layer's is its inverse
  int64_t recent_search_rows = 0;  // > 0: each head's recent window searched (above) on these last query rows
};

// The options a policy runs with when the request names only the policy:
// each baseline's own defaults (its paper or best-known implementation),
// e.g. look_m gets text_prior keep_all_text and merge pivotal. Fields the
// caller set explicitly are applied on top by the caller.
CompressOptions DefaultOptions(PolicyKind policy);

// What a request that names no policy runs when its query rows are a
// reconstruction pass (probe rows: query_outside_lse, or more rows than
// tokens; docs/amber.md "Reconstruction
// probes"): amber with score_norm max, layer_budget global, sinks 4 and no
// recent window (recent_search_rows 0, recent_fraction 0), rho 0.2; chosen on
// the tuning split of bench/realmodel/tasks (bench/FIDELITY.md).
CompressOptions ReconstructionOptions();

// Every option in range; messages name the option and the expected values.
[[nodiscard]] absl::Status ValidateOptions(const CompressOptions& options);

// Names as used on the command line and in logs (lower case, snake_case).
const char* PolicyName(PolicyKind p);
const char* EntropyHeadsName(EntropyHeads e);
const char* EntropySourceName(EntropySource e);
const char* TextPriorName(TextPrior p);
const char* MergeModeName(MergeMode m);
const char* MergeThresholdName(MergeThreshold m);
const char* ScoreNormName(ScoreNorm n);
const char* LayerBudgetName(LayerBudget b);

// Case-insensitive parsers; '-' and '_' are interchangeable.
absl::StatusOr<PolicyKind> ParsePolicy(absl::string_view s);
absl::StatusOr<EntropyHeads> ParseEntropyHeads(absl::string_view s);
absl::StatusOr<EntropySource> ParseEntropySource(absl::string_view s);
absl::StatusOr<TextPrior> ParseTextPrior(absl::string_view s);
absl::StatusOr<MergeMode> ParseMergeMode(absl::string_view s);
absl::StatusOr<MergeThreshold> ParseMergeThreshold(absl::string_view s);
absl::StatusOr<ScoreNorm> ParseScoreNorm(absl::string_view s);
absl::StatusOr<LayerBudget> ParseLayerBudget(absl::string_view s);

}  // namespace medakv
