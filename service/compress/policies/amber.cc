// amber, this project's policy (docs/amber.md): accumulated attention
// averaged over the (row, head) pairs that can see each token (score_norm
// visible_mean), the first `sinks` tokens and a recent window always kept,
// top-k of the rest per kv head, no text prior and no merge by default;
// layer budgets uniform, by score mass or by entropy (layer_budget).
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan AmberPlan(LayerBudget layer_budget) {
  const BudgetRule rule = layer_budget == LayerBudget::kMass      ? BudgetRule::kMass
                          : layer_budget == LayerBudget::kEntropy ? BudgetRule::kEntropy
                                                                  : BudgetRule::kUniform;
  return {.budget = rule, .scorer = Scorer::kAccumulated, .recent = RecentRule::kFraction, .use_sinks = true};
}

}  // namespace medakv
