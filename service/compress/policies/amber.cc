// amber, this project's policy (docs/amber.md): H2O's accumulated attention
// (or its visible mean, score_norm), each kv head's recent window searched on
// the last query rows' attention (recent_search_rows), top-k of the rest per
// kv head, layer budgets on a ramp over depth (or uniform, by score mass, by
// entropy, or per head across every layer and head: layer_budget); no text
// prior and no merge by default.
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan AmberPlan(LayerBudget layer_budget, int64_t recent_search_rows) {
  const BudgetRule rule = layer_budget == LayerBudget::kMass      ? BudgetRule::kMass
                          : layer_budget == LayerBudget::kEntropy ? BudgetRule::kEntropy
                          : layer_budget == LayerBudget::kDepth   ? BudgetRule::kDepth
                          : layer_budget == LayerBudget::kGlobal  ? BudgetRule::kGlobal
                                                                  : BudgetRule::kUniform;
  return {.budget = rule,
          .scorer = Scorer::kAccumulated,
          .recent = recent_search_rows > 0 ? RecentRule::kSearch : RecentRule::kFraction,
          .use_sinks = true};
}

}  // namespace medakv
