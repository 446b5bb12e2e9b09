// Token selection (ALGORITHM.md, MEDA step 3): text prior, recent window,
// top-k per kv head (or shared), deterministic ties, ascending output.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/ops/select_math.h"

namespace medakv::cpu {
namespace {

absl::Status ValidateSelect(const SelectArgs& a, const int32_t* kept) {
  if (a.kv_heads <= 0 || a.tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("select: kv_heads and tokens must be > 0, got ", a.kv_heads, " and ", a.tokens));
  }
  if (a.tokens > INT32_MAX) {
    return absl::InvalidArgumentError(absl::StrCat("select: tokens (", a.tokens, ") exceed int32 positions"));
  }
  if (a.budget < 1 || a.budget > a.tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("select: budget must be in [1, tokens=", a.tokens, "], got ", a.budget));
  }
  if (!(a.recent_fraction >= 0.0 && a.recent_fraction <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("recent_fraction must be in [0, 1], got ", a.recent_fraction));
  }
  if (a.sinks < 0) return absl::InvalidArgumentError(absl::StrCat("select: sinks must be >= 0, got ", a.sinks));
  if (a.text_prior != TextPrior::kAdditive && a.text_prior != TextPrior::kKeepAllText &&
      a.text_prior != TextPrior::kNone) {
    return absl::InvalidArgumentError("select: unknown text_prior");
  }
  if (a.scores == nullptr || a.modality == nullptr || kept == nullptr) {
    return absl::InvalidArgumentError("select: scores, modality and output must be non-null");
  }
  return absl::OkStatus();
}

// Selects `budget` tokens of one head's scores [tokens]: the first `sinks`,
// the last `recent`, and the best of the rest; writes them ascending.
void SelectOne(const float* scores, const uint8_t* modality, int64_t tokens, int64_t budget, int64_t sinks,
               int64_t recent, TextPrior prior, int32_t* kept) {
  float max_score = -INFINITY;
  if (prior == TextPrior::kAdditive) {
    for (int64_t t = 0; t < tokens; ++t) max_score = std::max(max_score, RankableScore(scores[t]));
  }
  // [0, sinks) and [tokens - recent, tokens) are always kept; candidates are
  // [sinks, tokens - recent), indexed from 0 below.
  const int64_t pool = tokens - recent - sinks;
  const int64_t take = budget - recent - sinks;
  std::vector<float> adjusted(pool);
  std::vector<int8_t> cls(pool, 0);
  for (int64_t c = 0; c < pool; ++c) {
    const int64_t t = sinks + c;
    const bool text = modality[t] == static_cast<uint8_t>(Modality::kText);
    float s = RankableScore(scores[t]);
    if (prior == TextPrior::kAdditive && text) s += max_score;
    if (prior == TextPrior::kKeepAllText && text) cls[c] = 1;
    adjusted[c] = s;
  }
  std::vector<int32_t> order(pool);
  std::iota(order.begin(), order.end(), 0);
  auto before = [&](int32_t a, int32_t b) {
    return RanksBefore(cls[a], adjusted[a], a, cls[b], adjusted[b], b);
  };
  if (take > 0 && take < pool) std::nth_element(order.begin(), order.begin() + take, order.end(), before);
  int64_t n = 0;
  for (int64_t t = 0; t < sinks; ++t) kept[n++] = static_cast<int32_t>(t);
  for (int64_t i = 0; i < take; ++i) kept[n++] = static_cast<int32_t>(sinks + order[i]);
  std::sort(kept + sinks, kept + n);
  for (int64_t t = tokens - recent; t < tokens; ++t) kept[n++] = static_cast<int32_t>(t);
}

}  // namespace

absl::Status SelectTokens(const SelectArgs& a, int32_t* kept) {
  if (absl::Status s = ValidateSelect(a, kept); !s.ok()) return s;
  const int64_t sinks = std::min(a.sinks, a.budget);
  const int64_t recent = std::min(a.recent_tokens >= 0 ? a.recent_tokens : RecentCount(a.recent_fraction, a.budget),
                                  a.budget - sinks);
  if (a.shared_selection) {
    // One kept set for the layer: raw scores summed over heads, then the prior.
    std::vector<float> summed(a.tokens, 0.f);
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      for (int64_t t = 0; t < a.tokens; ++t) summed[t] += a.scores[h * a.tokens + t];
    }
    SelectOne(summed.data(), a.modality, a.tokens, a.budget, sinks, recent, a.text_prior, kept);
    for (int64_t h = 1; h < a.kv_heads; ++h) std::copy(kept, kept + a.budget, kept + h * a.budget);
    return absl::OkStatus();
  }
  ParallelFor(a.kv_heads, [&](int64_t h) {
    SelectOne(a.scores + h * a.tokens, a.modality, a.tokens, a.budget, sinks, recent, a.text_prior,
              kept + h * a.budget);
  });
  return absl::OkStatus();
}

}  // namespace medakv::cpu
