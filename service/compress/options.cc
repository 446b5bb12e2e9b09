#include "service/compress/options.h"

#include <cmath>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"

namespace medakv {
namespace {

template <typename E, size_t N>
absl::StatusOr<E> ParseEnum(absl::string_view what, absl::string_view s,
                            const std::pair<const char*, E> (&names)[N]) {
  const std::string key = absl::StrReplaceAll(absl::AsciiStrToLower(s), {{"-", "_"}});
  std::vector<std::string> accepted;
  for (const auto& [name, value] : names) {
    if (key == name) return value;
    accepted.push_back(name);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown ", what, " '", s, "' (expected one of: ", absl::StrJoin(accepted, ", "), ")"));
}

template <typename E, size_t N>
bool Known(E v, const std::pair<const char*, E> (&names)[N]) {
  for (const auto& entry : names) {
    if (entry.second == v) return true;
  }
  return false;
}

template <typename E, size_t N>
const char* EnumName(E v, const std::pair<const char*, E> (&names)[N]) {
  for (const auto& [name, value] : names) {
    if (value == v) return name;
  }
  return "unknown";
}

constexpr std::pair<const char*, PolicyKind> kPolicies[] = {
    {"full", PolicyKind::kFull},       {"meda", PolicyKind::kMeda},           {"streaming_llm", PolicyKind::kStreamingLlm},
    {"h2o", PolicyKind::kH2O},         {"snapkv", PolicyKind::kSnapKV},       {"pyramidkv", PolicyKind::kPyramidKV},
    {"look_m", PolicyKind::kLookM},    {"amber", PolicyKind::kAmber}};
constexpr std::pair<const char*, EntropyHeads> kEntropyHeads[] = {
    {"mean_attention", EntropyHeads::kMeanAttention}, {"mean_entropy", EntropyHeads::kMeanEntropy}};
constexpr std::pair<const char*, EntropySource> kEntropySources[] = {
    {"cross_modal", EntropySource::kCrossModal}, {"causal", EntropySource::kCausal}};
constexpr std::pair<const char*, TextPrior> kTextPriors[] = {
    {"additive", TextPrior::kAdditive}, {"keep_all_text", TextPrior::kKeepAllText}, {"none", TextPrior::kNone}};
constexpr std::pair<const char*, MergeMode> kMergeModes[] = {{"average", MergeMode::kAverage},
                                                             {"pivotal", MergeMode::kPivotal},
                                                             {"weighted", MergeMode::kWeighted},
                                                             {"none", MergeMode::kNone}};
constexpr std::pair<const char*, MergeThreshold> kMergeThresholds[] = {{"none", MergeThreshold::kNone},
                                                                       {"mean", MergeThreshold::kMean}};
constexpr std::pair<const char*, ScoreNorm> kScoreNorms[] = {
    {"sum", ScoreNorm::kSum}, {"visible_mean", ScoreNorm::kVisibleMean}, {"max", ScoreNorm::kMax}};
constexpr std::pair<const char*, LayerBudget> kLayerBudgets[] = {{"uniform", LayerBudget::kUniform},
                                                                 {"mass", LayerBudget::kMass},
                                                                 {"entropy", LayerBudget::kEntropy},
                                                                 {"depth", LayerBudget::kDepth},
                                                                 {"global", LayerBudget::kGlobal}};

}  // namespace

const char* PolicyName(PolicyKind p) { return EnumName(p, kPolicies); }
const char* EntropyHeadsName(EntropyHeads e) { return EnumName(e, kEntropyHeads); }
const char* EntropySourceName(EntropySource e) { return EnumName(e, kEntropySources); }
const char* TextPriorName(TextPrior p) { return EnumName(p, kTextPriors); }
const char* MergeModeName(MergeMode m) { return EnumName(m, kMergeModes); }
const char* MergeThresholdName(MergeThreshold m) { return EnumName(m, kMergeThresholds); }
const char* ScoreNormName(ScoreNorm n) { return EnumName(n, kScoreNorms); }
const char* LayerBudgetName(LayerBudget b) { return EnumName(b, kLayerBudgets); }

absl::StatusOr<PolicyKind> ParsePolicy(absl::string_view s) { return ParseEnum("policy", s, kPolicies); }
absl::StatusOr<EntropyHeads> ParseEntropyHeads(absl::string_view s) {
  return ParseEnum("entropy_heads", s, kEntropyHeads);
}
absl::StatusOr<EntropySource> ParseEntropySource(absl::string_view s) {
  return ParseEnum("entropy_source", s, kEntropySources);
}
absl::StatusOr<TextPrior> ParseTextPrior(absl::string_view s) { return ParseEnum("text_prior", s, kTextPriors); }
absl::StatusOr<MergeMode> ParseMergeMode(absl::string_view s) { return ParseEnum("merge", s, kMergeModes); }
absl::StatusOr<MergeThreshold> ParseMergeThreshold(absl::string_view s) {
  return ParseEnum("merge_threshold", s, kMergeThresholds);
}
absl::StatusOr<ScoreNorm> ParseScoreNorm(absl::string_view s) { return ParseEnum("score_norm", s, kScoreNorms); }
absl::StatusOr<LayerBudget> ParseLayerBudget(absl::string_view s) {
  return ParseEnum("layer_budget", s, kLayerBudgets);
}

CompressOptions ReconstructionOptions() {
  CompressOptions o = DefaultOptions(PolicyKind::kAmber);
  o.score_norm = ScoreNorm::kMax;
  o.layer_budget = LayerBudget::kGlobal;
  o.sinks = 4;
  o.recent_search_rows = 0;
  o.recent_fraction = 0.0;
  return o;
}

CompressOptions DefaultOptions(PolicyKind policy) {
  CompressOptions o;  // MEDA's defaults
  o.policy = policy;
  switch (policy) {
    case PolicyKind::kFull:
    case PolicyKind::kMeda:
      break;
    case PolicyKind::kStreamingLlm:
    case PolicyKind::kH2O:
    case PolicyKind::kSnapKV:
    case PolicyKind::kPyramidKV:
      o.text_prior = TextPrior::kNone;
      o.merge = MergeMode::kNone;
      break;
    case PolicyKind::kLookM:
      // LOOK-M: the paper's Eq. 8 and its code keep the union of text and top tokens.
      o.text_prior = TextPrior::kKeepAllText;
      o.merge = MergeMode::kPivotal;
      break;
    case PolicyKind::kAmber:
      // docs/amber.md: the defaults that won on the tuning prompts (bench/FIDELITY.md, "amber").
      o.text_prior = TextPrior::kNone;
      o.merge = MergeMode::kNone;
      o.score_norm = ScoreNorm::kSum;
      o.layer_budget = LayerBudget::kDepth;
      o.depth_ratio = kAmberDepthRatio;
      o.recent_search_rows = kAmberRecentSearchRows;
      o.recent_fraction = 0.5;  // used only where the recent search is off or cannot run
      o.sinks = 0;
      break;
  }
  return o;
}

absl::Status ValidateOptions(const CompressOptions& o) {
  if (!Known(o.policy, kPolicies)) return absl::InvalidArgumentError("policy: unknown value");
  if (absl::Status s = ValidateBudgetOptions(o.budget); !s.ok()) return s;
  if (!(o.recent_fraction >= 0.0 && o.recent_fraction <= 1.0)) {
    return absl::InvalidArgumentError(absl::StrCat("recent_fraction must be in [0, 1], got ", o.recent_fraction));
  }
  if (!(o.scale >= 0.f && o.scale <= kMaxScale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("scale must be in [0, ", kMaxScale, "] (0: 1/sqrt(head_dim)), got ", o.scale));
  }
  if (!(o.depth_ratio >= kMinDepthRatio && o.depth_ratio <= 1.0 / kMinDepthRatio)) {
    return absl::InvalidArgumentError(absl::StrCat("depth_ratio must be in [", kMinDepthRatio, ", ",
                                                   1.0 / kMinDepthRatio, "], got ", o.depth_ratio));
  }
  if (o.recent_search_rows < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("recent_search_rows must be >= 0, got ", o.recent_search_rows));
  }
  if (o.sinks < 0) return absl::InvalidArgumentError(absl::StrCat("sinks must be >= 0, got ", o.sinks));
  if (o.window < 1) return absl::InvalidArgumentError(absl::StrCat("window must be >= 1, got ", o.window));
  if (o.pool_kernel < 1 || o.pool_kernel > kMaxPoolKernel || o.pool_kernel % 2 == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pool_kernel must be odd and in [1, ", kMaxPoolKernel, "], got ", o.pool_kernel));
  }
  if (!(o.pyramid_beta >= kMinPyramidBeta && o.pyramid_beta <= kMaxPyramidBeta)) {
    return absl::InvalidArgumentError(absl::StrCat("pyramid_beta must be in [", kMinPyramidBeta, ", ",
                                                   kMaxPyramidBeta, "], got ", o.pyramid_beta));
  }
  if (!Known(o.entropy_heads, kEntropyHeads)) return absl::InvalidArgumentError("entropy_heads: unknown value");
  if (!Known(o.entropy_source, kEntropySources)) return absl::InvalidArgumentError("entropy_source: unknown value");
  if (!Known(o.text_prior, kTextPriors)) return absl::InvalidArgumentError("text_prior: unknown value");
  if (!Known(o.merge, kMergeModes)) return absl::InvalidArgumentError("merge: unknown value");
  if (!Known(o.merge_threshold, kMergeThresholds)) return absl::InvalidArgumentError("merge_threshold: unknown value");
  if (!Known(o.score_norm, kScoreNorms)) return absl::InvalidArgumentError("score_norm: unknown value");
  if (!Known(o.layer_budget, kLayerBudgets)) return absl::InvalidArgumentError("layer_budget: unknown value");
  if (o.policy == PolicyKind::kAmber && o.layer_budget == LayerBudget::kGlobal) {
    // Heads of a layer keep different numbers of tokens: the merge and a
    // shared selection both need every head to keep the same number.
    if (o.merge != MergeMode::kNone) {
      return absl::InvalidArgumentError(absl::StrCat("layer_budget global keeps a different number of tokens per kv "
                                                     "head: merge must be none, got ", MergeModeName(o.merge)));
    }
    if (o.shared_selection) {
      return absl::InvalidArgumentError(
          "layer_budget global keeps a different number of tokens per kv head: shared_selection must be false");
    }
  }
  return absl::OkStatus();
}

}  // namespace medakv
