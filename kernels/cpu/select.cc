// Token selection (docs/algorithm.md, MEDA step 3): text prior, recent window,
// top-k per kv head (or shared), deterministic ties, ascending output.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/cpu/ops.h"
#include "kernels/cpu/parallel.h"
#include "kernels/ops/select_math.h"
#include "kernels/ops/validate.h"

namespace medakv::cpu {
namespace {


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
  const SelectCounts counts = SelectWindowCounts(a);
  const int64_t sinks = counts.sinks, recent = counts.recent;
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
