// snapkv (SnapKV, Li et al. 2024, its public implementation): uniform budgets;
// attention of the last `window` query rows (default 64; all rows if fewer),
// averaged over the rows and the query heads of each GQA group, average-pooled
// over positions (kernel 5, zero padding, same length) outside the window;
// top-k per kv head; the window's own tokens are always kept inside the budget
// (a budget below the window keeps the most recent B tokens).
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan SnapKVPlan() {
  return {.budget = BudgetRule::kUniform, .scorer = Scorer::kWindowPooled, .recent = RecentRule::kWindow};
}

}  // namespace medakv
