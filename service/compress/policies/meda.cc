// meda (MEDA, NAACL 2025): cross-modal entropy budgets per layer; accumulated
// attention with the text prior (additive by default), the recent fraction
// (0.5) and AVERAGE merging of evicted tokens, all from the options.
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan MedaPlan() { return {.budget = BudgetRule::kEntropy, .scorer = Scorer::kAccumulated}; }

}  // namespace medakv
