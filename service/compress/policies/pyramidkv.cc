// pyramidkv (PyramidKV, Cai et al. 2024, its public implementation): SnapKV's
// selection with per-layer budgets in an arithmetic sequence, largest in
// layer 0, beta = 20, the same total as uniform budgets (kernels/cpu/budget.h).
#include "service/compress/policy.h"

namespace medakv {

PolicyPlan PyramidKVPlan() {
  return {.budget = BudgetRule::kPyramid, .scorer = Scorer::kWindowPooled, .recent = RecentRule::kWindow};
}

}  // namespace medakv
