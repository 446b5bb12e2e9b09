// h2o (H2O, Zhang et al. 2023): uniform budgets; accumulated attention over
// every query row (plain sum); heavy hitters and recent tokens 1:1
// (recent_fraction 0.5); no text prior, no merge (DefaultOptions).
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan H2OPlan() { return {.budget = BudgetRule::kUniform, .scorer = Scorer::kAccumulated}; }

}  // namespace medakv
