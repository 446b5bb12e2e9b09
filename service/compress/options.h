// What a compression request asks for: the policy and every option of
// ALGORITHM.md, with the documented defaults.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/cpu/budget.h"
#include "kernels/ops/options.h"

namespace medakv {

enum class PolicyKind : uint8_t {
  kFull = 0,  // keep everything (a pass-through, for comparison)
  kMeda = 1,  // MEDA: entropy budgets, text prior, accumulated attention, recent window, AVERAGE merge
};

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
};

// Every option in range; messages name the option and the expected values.
[[nodiscard]] absl::Status ValidateOptions(const CompressOptions& options);

// Names as used on the command line and in logs (lower case, snake_case).
const char* PolicyName(PolicyKind p);
const char* EntropyHeadsName(EntropyHeads e);
const char* EntropySourceName(EntropySource e);
const char* TextPriorName(TextPrior p);
const char* MergeModeName(MergeMode m);
const char* MergeThresholdName(MergeThreshold m);

// Case-insensitive parsers; '-' and '_' are interchangeable.
absl::StatusOr<PolicyKind> ParsePolicy(absl::string_view s);
absl::StatusOr<EntropyHeads> ParseEntropyHeads(absl::string_view s);
absl::StatusOr<EntropySource> ParseEntropySource(absl::string_view s);
absl::StatusOr<TextPrior> ParseTextPrior(absl::string_view s);
absl::StatusOr<MergeMode> ParseMergeMode(absl::string_view s);
absl::StatusOr<MergeThreshold> ParseMergeThreshold(absl::string_view s);

}  // namespace medakv
