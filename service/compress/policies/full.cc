// full: keep every token (a pass-through, for comparison).
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan FullPlan() { return {.budget = BudgetRule::kFull, .scorer = Scorer::kNone}; }

}  // namespace medakv
